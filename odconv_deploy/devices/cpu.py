"""What a device's CPU is, read from the ``/proc/cpuinfo`` its runtime's process saw.

On an emulated device QEMU writes that file for the CPU model it emulates, so this is the CPU
the runtime's feature detection saw, not the host's.
"""

from __future__ import annotations

#: ARM CPU part numbers (MIDR) of implementer 0x41 (Arm) -> name.
ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2", "0xd4b": "Cortex-A78C", "0xd4f": "Neoverse-V2", "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720", "0xd82": "Cortex-X4",
}

#: The features that decide the kernels ONNX Runtime (MLAS) and XNNPACK pick on ARM: NEON
#: (asimd), fp16 arithmetic, int8 dot product, int8 matrix multiply, bf16, SVE/SVE2, SME.
ARM_KERNEL_FEATURES = ("asimd", "asimdhp", "fphp", "asimddp", "i8mm", "bf16", "sve", "sve2",
                       "sme")
#: The x86 features that decide them on x86-64.
X86_KERNEL_FEATURES = ("sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                       "avx512_vnni", "avx_vnni", "amx_int8")


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor's ``key: value`` lines of ``/proc/cpuinfo`` text.

    ``programs/ort_runner.py`` keeps its own copy: it runs on devices without this package.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def describe_cpu(cpuinfo: dict[str, str]) -> dict[str, object]:
    """The CPU's model, and which of the kernel-deciding features it advertises.

    Args:
        cpuinfo: The first processor's ``key: value`` lines of ``/proc/cpuinfo``.

    Returns:
        ``model`` (e.g. ``"Cortex-A55 (r2p0)"``), ``arch`` (``aarch64``/``x86_64``/``unknown``),
        ``features`` (the kernel-deciding ones present, in a fixed order) and ``missing``
        (those absent).
    """
    if "CPU part" in cpuinfo or "Features" in cpuinfo:
        part = cpuinfo.get("CPU part", "?")
        name = ARM_PARTS.get(part, f"ARM part {part}") if cpuinfo.get(
            "CPU implementer") == "0x41" else f"implementer {cpuinfo.get('CPU implementer')} " \
                                              f"part {part}"
        variant, revision = cpuinfo.get("CPU variant", "0x?"), cpuinfo.get("CPU revision", "?")
        model = f"{name} (r{variant.removeprefix('0x')}p{revision})"
        present, wanted, arch = set(cpuinfo.get("Features", "").split()), ARM_KERNEL_FEATURES, \
            "aarch64"
    elif "flags" in cpuinfo:
        model = cpuinfo.get("model name", "x86-64")
        present, wanted, arch = set(cpuinfo["flags"].split()), X86_KERNEL_FEATURES, "x86_64"
    else:
        return {"model": "unknown (no /proc/cpuinfo)", "arch": "unknown", "features": [],
                "missing": []}
    return {"model": model, "arch": arch, "features": [f for f in wanted if f in present],
            "missing": [f for f in wanted if f not in present]}
