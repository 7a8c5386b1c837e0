"""An emulated ARM64 CPU: the aarch64 runtimes under QEMU user mode, on this host.

Numerics only: QEMU translates each ARM instruction, so an emulated inference takes seconds,
and its timings say nothing about a real core's latency. What it does show is what the ARM
kernels compute (NEON, dot-product and i8mm paths in MLAS and XNNPACK, chosen by the
features the emulated CPU advertises) and crashes only ARM shows.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from odconv_deploy.devices.base import ORT_RUNNER, Device, DeviceCheck
from odconv_deploy.devices.cpu import describe_cpu, parse_cpuinfo
from odconv_deploy.devices.protocol import DeviceError
from odconv_deploy.devices.provision import arm64_layout

#: CPU models offered (QEMU's names): phone little and big cores, and server cores.
ARM64_CPUS = {
    "cortex-a53": "phone/board little core (Raspberry Pi 3), ARMv8.0, no dot product",
    "cortex-a55": "phone little core, ARMv8.2, fp16 arithmetic and int8 dot product",
    "cortex-a72": "board big core (Raspberry Pi 4), ARMv8.0",
    "cortex-a76": "phone big core (Raspberry Pi 5), ARMv8.2, fp16 and dot product",
    "cortex-a710": "phone big core, ARMv9.0, i8mm, bf16, SVE2",
    "neoverse-n1": "server core (Graviton2), ARMv8.2",
    "neoverse-v1": "server core (Graviton3), ARMv8.4, i8mm, bf16, SVE",
}
#: One phone-class core: what most users ship to.
DEFAULT_CPU = "cortex-a55"
CPUINFO_SCRIPT = ("import sys\nfor line in open('/proc/cpuinfo'):\n    if not line.strip(): "
                  "break\n    sys.stdout.write(line)\n")


class EmulatedArm64Device(Device):
    """``arm64-emu[:CPU]``: one emulated ARM64 core of the given QEMU CPU model."""

    kind = "arm64-emu"
    emulated = True

    def __init__(self, cpu: str = DEFAULT_CPU) -> None:
        if cpu not in ARM64_CPUS:
            raise DeviceError(f"unknown emulated CPU {cpu!r}; expected one of "
                              f"{', '.join(ARM64_CPUS)} (as arm64-emu:CPU).")
        super().__init__(f"arm64-emu:{cpu}")
        self.cpu_model = cpu
        self.layout = arm64_layout()

    def _qemu(self) -> list[str]:
        return [str(self.layout.qemu), "-cpu", self.cpu_model, "-L", str(self.layout.sysroot)]

    def check_impl(self) -> DeviceCheck:  # noqa: D102
        check = DeviceCheck(self.name, arch="aarch64",
                            details={"transport": f"QEMU user mode ({self.layout.root})",
                                     "emulated": True})
        missing = self.layout.missing()
        if "qemu" in missing or "sysroot" in missing:
            check.problems.append(f"not set up (missing: {', '.join(missing)}). Note: run "
                                  "'odconv-deploy device setup arm64-emu' (fetches ~140 MB "
                                  "from Debian and PyPI, ~230 MB on disk).")
            return check
        done = subprocess.run([*self._qemu(), str(self.layout.python), "-c", CPUINFO_SCRIPT],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            check.reachable = False
            check.problems.append(f"the emulated Python did not start (status "
                                  f"{done.returncode}): {done.stderr.strip()[-300:]}")
            return check
        check.details["cpu"] = describe_cpu(parse_cpuinfo(done.stdout))
        wheels = sorted(self.layout.site.glob("onnxruntime-*.dist-info"))
        if wheels:
            check.runtimes["onnxruntime"] = wheels[0].name.removesuffix(".dist-info").split("-")[1]
        else:
            check.missing["onnxruntime"] = ("its aarch64 wheels are not fetched. Note: run "
                                            "'odconv-deploy device setup arm64-emu'")
        stamp = self.layout.bundle / "VERSION"
        if stamp.exists():
            check.runtimes["executorch"] = stamp.read_text().split()[1]
        else:
            check.missing["executorch"] = ("the aarch64 ExecuTorch runner is not built (it "
                                           "needs g++-aarch64-linux-gnu). Note: apt-get install "
                                           "g++-aarch64-linux-gnu, then 'odconv-deploy device "
                                           "setup arm64-emu'")
        return check

    def stage(self, path: Path) -> str:  # noqa: D102 - QEMU user mode sees the host's files
        return str(Path(path).resolve())

    def runner_command(self, runtime: str, model: str, threads: int) -> list[str]:  # noqa: D102
        if runtime == "onnxruntime":
            return [*self._qemu(), str(self.layout.python), str(ORT_RUNNER), model,
                    str(threads), str(self.layout.site)]
        return [*self._qemu(), str(self.layout.bundle / "pte_runner"), model, str(threads)]
