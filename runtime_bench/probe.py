"""What this machine can do: a GEMM probe (GFLOP/s) and a memory-read probe (GB/s)."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from odconv_deploy._version import package_versions


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
    cpu, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
        flags = set(next((ln.split(":", 1)[1].split() for ln in lines
                          if ln.startswith("flags")), []))
    except (OSError, StopIteration):
        pass
    # The vector ISA decides which GEMM kernels the runtimes pick (and so every latency):
    # hosts that share a model name can differ here.
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
           if f in flags]
    info = {"cpu": cpu, "isa": " ".join(isa) or "unknown", "cores": str(os.cpu_count()),
            "machine": platform.machine(),
            "system": platform.system(), "python": platform.python_version(),
            "numpy": np.__version__}
    return {**info, **package_versions("onnxruntime", "executorch", "coremltools", "onnx")}
