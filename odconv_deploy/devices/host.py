"""The host itself as a device: the runners run as local processes.

Validating on ``host`` checks the device runners and protocol against the in-process
runtimes on the same CPU, and times an artifact the way a device does.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from pathlib import Path

from odconv_deploy.devices.base import ORT_RUNNER, Device, DeviceCheck
from odconv_deploy.devices.cpu import describe_cpu, parse_cpuinfo
from odconv_deploy.devices.protocol import DeviceError
from odconv_deploy.devices.provision import ensure_host_bundle


def read_cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's ``key: value`` lines of a cpuinfo file (empty if unreadable)."""
    try:
        return parse_cpuinfo(Path(path).read_text())
    except OSError:
        return {}


class HostDevice(Device):
    """The host, through the same runner programs a remote device runs."""

    kind = "host"

    def __init__(self) -> None:
        super().__init__("host")

    def check_impl(self) -> DeviceCheck:  # noqa: D102
        check = DeviceCheck(self.name, arch=platform.machine(),
                            details={"cpu": describe_cpu(read_cpuinfo()),
                                     "transport": "local process"})
        try:
            check.runtimes["onnxruntime"] = importlib.metadata.version("onnxruntime")
        except importlib.metadata.PackageNotFoundError:
            check.missing["onnxruntime"] = ("onnxruntime is not installed here. Note: pip "
                                            "install 'odconv-deploy[onnx]'")
        try:
            check.runtimes["executorch"] = (ensure_host_bundle() / "VERSION").read_text(
            ).split()[1]
        except DeviceError as exc:
            check.missing["executorch"] = str(exc)
        return check

    def stage(self, path: Path) -> str:  # noqa: D102
        return str(Path(path).resolve())

    def runner_command(self, runtime: str, model: str, threads: int) -> list[str]:  # noqa: D102
        if runtime == "onnxruntime":
            return [sys.executable, str(ORT_RUNNER), model, str(threads)]
        return [str(ensure_host_bundle() / "pte_runner"), model, str(threads)]
