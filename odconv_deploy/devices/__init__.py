"""Devices: where artifacts run (this host, an emulated ARM64 CPU, a board over SSH).

``parse_device("arm64-emu:cortex-a76")`` gives a :class:`Device`; a
:class:`DeviceRunner` runs an artifact there under the runner contract. Each device speaks
the same protocol (:mod:`odconv_deploy.devices.protocol`), so outputs and on-device timings
come back alike from all of them.
"""

from __future__ import annotations

from odconv_deploy.devices.base import RUNTIMES, Device, DeviceCheck
from odconv_deploy.devices.emulated import ARM64_CPUS, DEFAULT_CPU, EmulatedArm64Device
from odconv_deploy.devices.host import HostDevice
from odconv_deploy.devices.protocol import DeviceError, RunnerSession
from odconv_deploy.devices.runner import RUNTIME_OF_SUFFIX, DeviceRunner
from odconv_deploy.devices.ssh import SshDevice

#: Device kinds designed for the same contract but not built here, and why.
PLANNED = {
    "adb": "Android over adb (push, shell): not built yet. The contract fits (stage = adb "
           "push, runner command = adb shell); it needs runtime binaries built for Android "
           "(the NDK's bionic, not glibc), which this project does not ship. Use an SSH "
           "device for Linux boards meanwhile.",
    "mac": "a macOS host for Core ML predict: not built yet. Over ssh:// a Mac runs the "
           "ONNX Runtime runner (its python3 with onnxruntime); a Core ML runner (coremltools "
           "predict behind the same protocol) is the missing part.",
}


def parse_device(spec: str) -> Device:
    """The device a ``--device`` value names.

    ``host``; ``arm64-emu`` or ``arm64-emu:CPU`` (CPU: one of :data:`ARM64_CPUS`, default
    :data:`DEFAULT_CPU`); ``ssh://user@host[:port][?key=&python=&workdir=&known_hosts=]``.

    Raises:
        DeviceError: An unknown kind or CPU, a planned kind, or a malformed URL.
    """
    kind, _, rest = spec.partition(":")
    if spec == "host":
        return HostDevice()
    if kind == "arm64-emu":
        return EmulatedArm64Device(rest or DEFAULT_CPU)
    if spec.startswith("ssh://"):
        return SshDevice(spec)
    if kind in PLANNED:
        raise DeviceError(f"device {spec!r}: {PLANNED[kind]}")
    raise DeviceError(f"unknown device {spec!r}; expected host, arm64-emu[:CPU] (CPU: "
                      f"{', '.join(ARM64_CPUS)}) or ssh://user@host[:port].")


__all__ = ["ARM64_CPUS", "DEFAULT_CPU", "PLANNED", "RUNTIMES", "RUNTIME_OF_SUFFIX", "Device",
           "DeviceCheck", "DeviceError", "DeviceRunner", "EmulatedArm64Device", "HostDevice",
           "RunnerSession", "SshDevice", "parse_device"]
