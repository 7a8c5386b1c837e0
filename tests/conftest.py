"""Suite-wide settings: parallel workers (pytest-xdist) that share the machine's cores."""

import os

import pytest

#: Most workers the suite starts with ``-n auto``: each holds a few GB at its peak (exports of
#: the larger zoo models), so more would trade memory for little time.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, at most :data:`MAX_WORKERS`."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def pytest_configure(config: pytest.Config) -> None:
    """In a worker, give torch its share of the cores instead of all of them each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
