"""Build the ExecuTorch runner for a device's architecture, as a self-contained bundle.

A bundle is a folder ``pte_runner`` + ``lib/*.so`` (the runner finds its libraries through
``$ORIGIN/lib``), compiled against the libraries and headers an executorch wheel ships for
that architecture: the host's installed wheel for x86-64, the aarch64 wheel (fetched by
:mod:`odconv_deploy.devices.provision`) with Debian's cross compiler for aarch64.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from odconv_deploy._atomic import atomic_output
from odconv_deploy.devices.base import PTE_RUNNER_SOURCE
from odconv_deploy.devices.protocol import DeviceError

#: The compiler for each architecture, and the Debian package that provides it.
COMPILERS = {"x86_64": ("g++", "g++"), "aarch64": ("aarch64-linux-gnu-g++",
                                                   "g++-aarch64-linux-gnu")}
#: The libraries a model needs at run time, in link order: CPU kernels (portable and
#: optimized), quantized kernels (int8w/int8 programs), the XNNPACK delegate.
LIBRARIES = ("executorch_kernels_optimized", "executorch_kernels_quantized",
             "executorch_backend_xnnpack", "executorch_threadpool", "executorch")
#: Defines the shipped libraries were compiled with (from the wheel's executorch-config.cmake:
#: without the first the vendored c10 headers do not compile; the second keeps class layouts
#: the same as the libraries').
DEFINES = ("C10_USING_CUSTOM_GENERATED_MACROS", "ET_EVENT_TRACER_ENABLED", "ET_USE_THREADPOOL")


def executorch_version(package: Path) -> str:
    """The version an executorch package folder was built as (its cmake version file)."""
    stamp = package / "share" / "cmake" / "executorch-config-version.cmake"
    for line in stamp.read_text().splitlines() if stamp.exists() else []:
        if line.startswith("set(EXECUTORCH_BUILD_VERSION"):
            return line.split('"')[1].split("+")[0]
    return "unknown"


def build_bundle(package: Path, arch: str, out: Path) -> Path:
    """Compile the runner for ``arch`` against the executorch package folder ``package``.

    Written whole or not at all: the bundle appears at ``out`` only once it is built.

    Raises:
        DeviceError: No compiler for ``arch`` (says which package to install), or the
            compile failed (with the compiler's first error).
    """
    compiler, debian_package = COMPILERS[arch]
    if shutil.which(compiler) is None:
        raise DeviceError(f"building the ExecuTorch runner for {arch} needs {compiler}, which "
                          f"is not on PATH. Note: apt-get install {debian_package}")
    version = executorch_version(package)
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "lib").mkdir(parents=True)
        for library in LIBRARIES:
            shutil.copy2(package / "lib" / f"lib{library}.so", tmp / "lib")
        command = [compiler, "-std=c++17", "-O2", "-Wno-deprecated-declarations",
                   *(f"-D{d}" for d in DEFINES), f'-DODCONV_ET_VERSION="{version}"',
                   f"-I{package / 'include'}",
                   f"-I{package / 'include/executorch/runtime/core/portable_type/c10'}",
                   str(PTE_RUNNER_SOURCE), "-o", str(tmp / "pte_runner"),
                   f"-L{tmp / 'lib'}", "-Wl,--no-as-needed",  # kernels register at load
                   *(f"-l{lib}" for lib in LIBRARIES), "-Wl,-rpath,$ORIGIN/lib"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln),
                         done.stderr[-400:])
            raise DeviceError(f"compiling the ExecuTorch runner for {arch} failed: {first}")
        (tmp / "VERSION").write_text(f"executorch {version} {arch}\n")
    return out
