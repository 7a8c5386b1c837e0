"""One status vocabulary for every result: ok, failed, or skipped (each with a reason).

The rule for failures: a function that makes or runs one thing (an exporter, a runner, a
conversion) raises an :class:`~odconv_deploy.errors.ODConvDeployError`; a sweep over many
(``export_formats``, ``validate``, the benchmark, the pipeline) records each item's failure
with its reason as ``Status.FAILED`` and goes on, and ``Status.SKIPPED`` marks an item that
cannot run on this machine (e.g. Core ML predict off macOS), never a failure in disguise.
"""

from __future__ import annotations

import enum


class Status(str, enum.Enum):
    """The outcome of one result; compares equal to its string (``Status.OK == "ok"``)."""

    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
