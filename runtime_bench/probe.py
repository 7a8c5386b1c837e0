"""What this machine can do: a GEMM probe (GFLOP/s) and a memory-read probe (GB/s)."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MachineProbe:
    """Measured peak figures used as the floor for benchmark results."""

    threads: int
    sgemm_gflops: float
    read_gbps: float

    def to_dict(self) -> dict[str, float]:
        """JSON-ready view."""
        return asdict(self)


def _best_of(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def probe_machine(threads: int = 1, *, size: int = 1024, read_mb: int = 256,
                  repeats: int = 5) -> MachineProbe:
    """Measure fp32 GEMM throughput and memory read bandwidth with ``threads`` threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        gemm = _best_of(lambda: torch.mm(a, b), repeats)
        big = torch.ones(read_mb * 1024 * 1024 // 4)
        big.sum()
        read = _best_of(lambda: big.sum(), repeats)
    finally:
        torch.set_num_threads(saved)
    return MachineProbe(threads=threads, sgemm_gflops=2 * size**3 / gemm / 1e9,
                        read_gbps=big.numel() * 4 / read / 1e9)


def machine_info() -> dict[str, str]:
    """CPU, cores and library versions, stamped into every result."""
    import importlib.metadata

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "machine": platform.machine(),
            "system": platform.system(), "python": platform.python_version(),
            "numpy": np.__version__}
    for package in ("torch", "onnxruntime", "executorch", "coremltools", "onnx"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info
