"""The host's side of the device protocol: one runner process on the device, over its pipes.

The runner (``programs/ort_runner.py``, ``programs/pte_runner.cpp``) loads one model, prints
``ready {json}`` (runtime, version, threads, the ``/proc/cpuinfo`` it sees), then answers
requests until ``quit``:

- ``infer N`` then N tensors -> ``ok M`` then M tensors, or ``error MESSAGE``
- ``bench WARMUP RUNS N`` then N tensors -> ``ok {"times_ms": [...]}`` timed on the device

A tensor is a line ``f4 NDIM D0 D1 ...`` then its little-endian float32 bytes. The same bytes
travel over a local pipe (host, emulated devices) or an SSH channel.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Sequence

import numpy as np

from odconv_deploy.runners.base import RunnerError


class DeviceError(RunnerError):
    """A device that cannot be reached, lacks a runtime, or whose runner failed."""


def signal_name(returncode: int) -> str | None:
    """``SIGILL (Illegal instruction)`` for a process killed by a signal, else None.

    A negative return code is a signal (Popen's convention); 128 + n is how a shell or
    QEMU reports one it passed on.
    """
    number = -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 160 \
        else None
    if number is None:
        return None
    try:
        sig = signal.Signals(number)
    except ValueError:
        return f"signal {number}"
    return f"{sig.name} ({signal.strsignal(sig) or sig.name})"


class RunnerSession:
    """One runner process: start it, wait for ``ready``, send requests, stop it.

    Args:
        argv: The local command that starts the runner (directly, under QEMU, or over SSH).
        where: How to name the device in errors (e.g. ``"arm64-emu:cortex-a55"``).
        cpu: The device's CPU model, named when the runner dies by a signal.
        timeout_s: Longest wait for one reply (an emulated od_resnet18 takes tens of seconds).
    """

    def __init__(self, argv: Sequence[str], *, where: str, cpu: str = "unknown CPU",
                 timeout_s: float = 600.0) -> None:
        self.argv, self.where, self.cpu, self.timeout_s = list(argv), where, cpu, timeout_s
        self.info: dict[str, object] = {}
        self._stderr: list[bytes] = []
        try:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            raise DeviceError(f"{where}: cannot start the runner {self.argv[0]!r}: {exc}") \
                from exc
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        line = self._reply_line("start")
        if not line.startswith("ready "):
            raise self._failure(line, "start")
        self.info = json.loads(line[len("ready "):])

    def _read_stderr(self) -> None:
        for chunk in iter(lambda: self.process.stderr.readline(), b""):
            self._stderr = (self._stderr + [chunk])[-40:]

    def stderr_tail(self, lines: int = 6) -> str:
        """The runner's last lines on stderr (runtime logs filtered out)."""
        kept = [b.decode(errors="replace").rstrip() for b in self._stderr]
        kept = [k for k in kept if k and not k.startswith(("I 00", "D 00"))]
        return " | ".join(kept[-lines:])

    def _reply_line(self, what: str) -> str:
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(self.process.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(self.timeout_s)
        if reader.is_alive():
            self.close(kill=True)
            raise DeviceError(f"{self.where}: the runner gave no reply to {what} within "
                              f"{self.timeout_s:.0f} s; it was stopped.")
        return result[0].decode(errors="replace").rstrip("\n") if result else ""

    def _failure(self, line: str, what: str) -> DeviceError:
        """The error for a reply that is not ``ok``: the runner's message, or how it died."""
        if line.startswith("error "):
            return DeviceError(f"{self.where}: {line[len('error '):]}")
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.close(kill=True)
            return DeviceError(f"{self.where}: unreadable reply to {what}: {line[:200]!r}")
        self._drain.join(timeout=2)
        died = signal_name(code)
        tail = self.stderr_tail()
        how = (f"died by {died} on {self.cpu}" if died else f"exited with status {code}")
        return DeviceError(f"{self.where}: the runner {how} during {what}"
                           + (f"; it said: {tail}" if tail else "") + ".")

    def _send(self, header: str, arrays: Sequence[np.ndarray]) -> None:
        try:
            self.process.stdin.write(f"{header} {len(arrays)}\n".encode())
            for array in arrays:
                array = np.ascontiguousarray(array, dtype="<f4")
                self.process.stdin.write(
                    f"f4 {array.ndim} {' '.join(map(str, array.shape))}\n".encode())
                self.process.stdin.write(array.tobytes())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the runner is gone: the reply (none) says how

    def infer(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run the model once on the device; its outputs in order."""
        self._send("infer", arrays)
        line = self._reply_line("infer")
        if not line.startswith("ok "):
            raise self._failure(line, "inference")
        outputs = []
        for _ in range(int(line.split()[1])):
            header = self.process.stdout.readline().decode().split()
            shape = tuple(int(d) for d in header[2:2 + int(header[1])])
            size = 4 * int(np.prod(shape, dtype=np.int64))
            data = self.process.stdout.read(size)
            if len(data) != size:
                raise self._failure("", "reading outputs")
            outputs.append(np.frombuffer(data, dtype="<f4").reshape(shape).copy())
        return outputs

    def bench(self, arrays: Sequence[np.ndarray], *, warmup: int, runs: int) -> list[float]:
        """Time ``runs`` inferences on the device after ``warmup``; milliseconds each."""
        self._send(f"bench {warmup} {runs}", arrays)
        line = self._reply_line("benchmark")
        if not line.startswith("ok "):
            raise self._failure(line, "benchmark")
        return [float(t) for t in json.loads(line[3:])["times_ms"]]

    def close(self, *, kill: bool = False) -> None:
        """Ask the runner to quit (or kill it) and reap it."""
        if self.process.poll() is None and not kill:
            try:
                self.process.stdin.write(b"quit\n")
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
