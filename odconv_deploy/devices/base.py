"""The device contract: where artifacts run, and how a runner is started there.

A device prepares itself (:meth:`Device.check`: reachable, which runtimes it has, its CPU,
free disk), stages files onto itself (:meth:`Device.stage`), and gives the local command that
starts a runtime's runner on it (:meth:`Device.runner_command`); the runner then speaks the
device protocol (:mod:`odconv_deploy.devices.protocol`) over that command's pipes, so outputs
and on-device timings come back the same way from every device.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

#: The runtimes a device can run, by the artifact formats they take.
RUNTIMES = ("onnxruntime", "executorch")
#: The programs the runners are, shipped inside the package.
PROGRAMS = Path(__file__).resolve().parent / "programs"
ORT_RUNNER = PROGRAMS / "ort_runner.py"
PTE_RUNNER_SOURCE = PROGRAMS / "pte_runner.cpp"


@dataclass
class DeviceCheck:
    """What :meth:`Device.check` found.

    Attributes:
        device: The device's name.
        reachable: Whether the device answered at all.
        arch: Its machine architecture (``uname -m``), if known.
        runtimes: Runtime -> its version there, for those it can run.
        missing: Runtime -> why it cannot run there (and what to do).
        problems: Anything that stops the device as a whole (unreachable, not set up).
        details: CPU, free disk, transport, and other facts for the report.
    """

    device: str
    reachable: bool = True
    arch: str | None = None
    runtimes: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the device is usable for at least one runtime."""
        return self.reachable and not self.problems and bool(self.runtimes)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return {"device": self.device, "ok": self.ok, "reachable": self.reachable,
                "arch": self.arch, "runtimes": self.runtimes, "missing": self.missing,
                "problems": self.problems, "details": self.details}


class Device(abc.ABC):
    """A place artifacts run: this host, an emulated ARM CPU, a board over SSH."""

    #: ``host``, ``arm64-emu`` or ``ssh``.
    kind: str = ""
    #: Whether the device is emulated: its timings say nothing about latency.
    emulated: bool = False

    def __init__(self, name: str) -> None:
        self.name = name
        self._check: DeviceCheck | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def check(self, *, refresh: bool = False) -> DeviceCheck:
        """Probe the device (once; ``refresh`` probes again).

        Never raises for the device's own faults: they are in the returned check.
        """
        if self._check is None or refresh:
            self._check = self.check_impl()
        return self._check

    @abc.abstractmethod
    def check_impl(self) -> DeviceCheck:
        """Probe the device."""

    @abc.abstractmethod
    def stage(self, path: Path) -> str:
        """Make a local file available on the device; its path there.

        Raises:
            DeviceError: The copy failed (unreachable, disk full, ...).
        """

    @abc.abstractmethod
    def runner_command(self, runtime: str, model: str, threads: int) -> list[str]:
        """The local command that starts ``runtime``'s runner on the device for ``model``.

        ``model`` is a path on the device, from :meth:`stage`.

        Raises:
            DeviceError: The device cannot run ``runtime``.
        """

    @property
    def cpu(self) -> str:
        """The CPU model the last check found (for errors)."""
        found = self._check.details.get("cpu", {}) if self._check else {}
        return str(found.get("model", "unknown CPU")) if isinstance(found, dict) else str(found)
