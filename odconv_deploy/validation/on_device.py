"""The "on device" section of a validation: what each device's runtime saw and computed.

Per device, what its check found (reachable, runtimes, the CPU and the kernel-deciding
features it advertises); per artifact run there, the runtime's own report (version, the CPU
its process saw) and its outputs against the same artifact in the same runtime on this host.
The comparison with PyTorch is the validation itself, at the same rules as on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from odconv_deploy.devices import Device, DeviceRunner
from odconv_deploy.runners.base import Runner
from odconv_deploy.tables import markdown_table


@dataclass
class OnDeviceRow:
    """One artifact on one device.

    Attributes:
        device, artifact, runtime: Where, what, with which runtime.
        version: The runtime's version on the device (from its runner).
        cpu: The CPU model its process saw; ``features``: the kernel-deciding features it
            advertised.
        batches: The batch sizes it ran.
        max_abs_vs_host: Largest ``|device - host|`` over those runs (the same artifact in the
            same runtime release on this host); ``host_peak``: ``max|host|`` for scale.
        error: Why it did not run, or why the host comparison could not be made.
    """

    device: str
    artifact: str
    runtime: str
    version: str | None = None
    cpu: str | None = None
    features: list[str] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    max_abs_vs_host: float | None = None
    host_peak: float | None = None
    error: str | None = None


@dataclass
class OnDeviceReport:
    """Every device's check and every artifact run on a device."""

    devices: list[dict[str, object]] = field(default_factory=list)
    rows: list[OnDeviceRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return {"devices": self.devices, "rows": [asdict(r) for r in self.rows]}

    def to_markdown(self) -> str:
        """The section: devices, then artifacts on them."""
        lines = ["On device:", ""]
        for check in self.devices:
            cpu = check.get("details", {}).get("cpu") or {}
            state = ("ok" if check["ok"] else "FAILED: " + "; ".join(
                check["problems"] or ["no runtime"]))
            emulated = " (emulated: numerics only, no latency)" if check.get(
                "details", {}).get("emulated") else ""
            lines.append(f"- {check['device']}{emulated}: {state}; CPU "
                         f"{cpu.get('model', '?')}, features "
                         f"{' '.join(cpu.get('features', [])) or '-'}; runtimes "
                         + (", ".join(f"{k} {v}" for k, v in check["runtimes"].items()) or "-")
                         + "".join(f"; {k} missing: {v}" for k, v in check["missing"].items()))
        rows = [[r.device, r.artifact, f"{r.runtime} {r.version or '?'}", r.cpu or "-",
                 " ".join(r.features) or "-", ",".join(map(str, r.batches)) or "-",
                 "-" if r.max_abs_vs_host is None else f"{r.max_abs_vs_host:.2e}",
                 "-" if r.host_peak is None else f"{r.host_peak:.3g}",
                 r.error or "ran"] for r in self.rows]
        lines += ["", *markdown_table(["device", "artifact", "runtime", "CPU seen", "features",
                                       "batches", "max|device - host|", "max|host|", "note"],
                                      rows)]
        return "\n".join(lines) + "\n"


def merge_on_device(reports: Sequence[OnDeviceReport | None]) -> OnDeviceReport | None:
    """One section from several (device checks listed once)."""
    present = [r for r in reports if r is not None]
    if not present:
        return None
    merged = OnDeviceReport()
    for report in present:
        merged.devices += [d for d in report.devices if d not in merged.devices]
        merged.rows += report.rows
    return merged


def compare_with_host(runner: DeviceRunner, host: Runner) -> tuple[float, float]:
    """``max|device - host|`` and ``max|host|`` over the inputs ``runner`` ran."""
    worst, peak = 0.0, 0.0
    with host:
        for feed, got in runner.record:
            expected = host.infer(feed)
            for name, value in got.items():
                worst = max(worst, float(np.abs(value - expected[name]).max(initial=0.0)))
                peak = max(peak, float(np.abs(expected[name]).max(initial=0.0)))
    return worst, peak


def on_device_report(devices: Sequence[Device], runners: Sequence[DeviceRunner],
                     host_twin: Callable[[DeviceRunner], Runner | None]) -> OnDeviceReport:
    """The section for ``devices`` after ``runners`` (their device runners) were validated.

    Args:
        devices: The devices asked for (each one's check is listed).
        runners: The device runners the validation ran (their records are compared).
        host_twin: The host runner of a device runner's artifact (same runtime), or None.
    """
    report = OnDeviceReport(devices=[d.check().to_dict() for d in devices])
    for runner in runners:
        info = runner.last_info
        cpu = info.get("cpu") or {}
        row = OnDeviceRow(runner.device.name, runner.path.name, runner.runtime,
                          version=info.get("version"), cpu=cpu.get("model"),
                          features=list(cpu.get("features", [])),
                          batches=sorted({next(iter(f.values())).shape[0]
                                          for f, _ in runner.record}))
        if not runner.record:
            row.error = runner.last_error or "did not run"
        else:
            host = host_twin(runner)
            try:
                if host is not None:
                    row.max_abs_vs_host, row.host_peak = compare_with_host(runner, host)
            except Exception as exc:  # noqa: BLE001 - the host side is a note here
                row.error = f"host comparison failed: {type(exc).__name__}: {exc}"
        report.rows.append(row)
    return report
