"""A Linux board over SSH: ``ssh://user@host[:port][?key=PATH&python=PATH&workdir=PATH]``.

Raspberry Pi, Jetson, Graviton or any x86-64 box: the runners are the same glibc programs as
on the other devices. The ONNX Runtime runner runs on the board's Python (``python=``,
default ``python3``) with its onnxruntime; the ExecuTorch runner is pushed, built for the
board's architecture (x86-64: against this host's executorch; aarch64: the emulated device's
cross-built bundle). Files go to ``workdir`` (default ``~/.cache/odconv-deploy/device``), each
under its content hash, so an artifact already there is not sent again.

Options: ``key`` (identity file), ``known_hosts`` (a known-hosts file; new host keys are
accepted once and then pinned), ``python``, ``workdir``. SSH runs with ``BatchMode``: a key
that needs a passphrase or a password prompt is refused, not waited for.
"""

from __future__ import annotations

import hashlib
import platform
import shlex
import subprocess
import tarfile
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from odconv_deploy.devices.base import ORT_RUNNER, Device, DeviceCheck
from odconv_deploy.devices.cpu import describe_cpu, parse_cpuinfo
from odconv_deploy.devices.protocol import DeviceError
from odconv_deploy.devices.provision import arm64_layout, ensure_host_bundle

OPTIONS = ("key", "known_hosts", "python", "workdir")
DEFAULT_WORKDIR = ".cache/odconv-deploy/device"
CONNECT_TIMEOUT_S = 10
#: Exit status of the probe when the work folder cannot be made.
NO_WORKDIR = 90


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class SshDevice(Device):
    """A Linux machine reached with OpenSSH's client."""

    kind = "ssh"

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ssh" or not parts.hostname:
            raise DeviceError(f"device {url!r}: expected ssh://user@host[:port][?key=PATH&"
                              "python=PATH&workdir=PATH]")
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise DeviceError(f"device {url!r}: unknown option(s) {unknown}; expected "
                              f"{', '.join(OPTIONS)}.")
        try:
            port = parts.port or 22
        except ValueError as exc:
            raise DeviceError(f"device {url!r}: the port is not a number.") from exc
        target = f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname
        super().__init__(f"ssh://{target}:{port}")
        self.python = options.get("python", "python3")
        self.workdir = options.get("workdir", DEFAULT_WORKDIR)
        self._ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                     "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR",
                     "-p", str(port)]
        if "known_hosts" in options:
            self._ssh += ["-o", f"UserKnownHostsFile={options['known_hosts']}"]
        if "key" in options:
            self._ssh += ["-i", options["key"], "-o", "IdentitiesOnly=yes"]
        self._ssh.append(target)
        self._staged: set[str] = set()

    def remote(self, script: str, *, stdin: bytes | None = None, timeout: float = 120
               ) -> subprocess.CompletedProcess:
        """Run a shell script on the device (in its work folder)."""
        folder = shlex.quote(self.workdir)
        command = f"mkdir -p {folder} && cd {folder} || exit {NO_WORKDIR}\n{script}"
        try:
            return subprocess.run([*self._ssh, command], input=stdin, capture_output=True,
                                  timeout=timeout)
        except FileNotFoundError as exc:
            raise DeviceError("the SSH device needs OpenSSH's client (ssh), which is not on "
                              "PATH. Note: apt-get install openssh-client") from exc
        except subprocess.TimeoutExpired as exc:
            raise DeviceError(f"{self.name}: no answer within {timeout:.0f} s.") from exc

    def check_impl(self) -> DeviceCheck:  # noqa: D102
        check = DeviceCheck(self.name, details={"transport": "OpenSSH"})
        probe = (f"echo arch=$(uname -m); echo os=$(uname -s); "
                 f"echo free_kb=$(df -Pk . | tail -1 | awk '{{print $4}}'); "
                 f"echo pwd=$(pwd); "
                 f"{shlex.quote(self.python)} -c 'import numpy, onnxruntime; "
                 f"print(\"ort=\" + onnxruntime.__version__)' 2>&1 | tail -1 | sed 's/^/py:/'; "
                 "echo ---; sed '/^$/q' /proc/cpuinfo 2>/dev/null")
        try:
            done = self.remote(probe, timeout=CONNECT_TIMEOUT_S + 50)
        except DeviceError as exc:
            check.reachable = False
            check.problems.append(str(exc))
            return check
        out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
        if done.returncode == 255:
            check.reachable = False
            check.problems.append(f"unreachable: {err.strip()[-300:] or 'ssh exited 255'}")
            return check
        if done.returncode == NO_WORKDIR:
            check.problems.append(f"cannot create the work folder {self.workdir!r} on the "
                                  "device. Note: pass ?workdir=PATH")
            return check
        head, _, cpuinfo = out.partition("---\n")
        facts = dict(line.split("=", 1) for line in head.splitlines() if "=" in line
                     and not line.startswith("py:"))
        check.arch = facts.get("arch")
        self.workdir = facts.get("pwd", self.workdir)
        check.details.update(os=facts.get("os"), workdir=self.workdir,
                             free_bytes=1024 * int(facts.get("free_kb") or 0),
                             cpu=describe_cpu(parse_cpuinfo(cpuinfo)))
        python_line = next((ln[3:] for ln in head.splitlines() if ln.startswith("py:")), "")
        if python_line.startswith("ort="):
            check.runtimes["onnxruntime"] = python_line[4:]
        else:
            check.missing["onnxruntime"] = (
                f"{self.python} on the device cannot import onnxruntime and numpy "
                f"({python_line.strip() or 'no output'}). Note: pip install onnxruntime numpy "
                "there, or pass ?python=PATH")
        try:
            check.runtimes["executorch"] = (self._bundle(check.arch) / "VERSION").read_text(
            ).split()[1]
        except DeviceError as exc:
            check.missing["executorch"] = str(exc)
        return check

    def _bundle(self, arch: str | None) -> Path:
        """The ExecuTorch runner bundle built for the device's architecture."""
        if arch == platform.machine() == "x86_64":
            return ensure_host_bundle()
        if arch == "aarch64":
            bundle = arm64_layout().bundle
            if (bundle / "pte_runner").exists():
                return bundle
            raise DeviceError("the aarch64 ExecuTorch runner is not built. Note: run "
                              "'odconv-deploy device setup arm64-emu' (it builds it)")
        raise DeviceError(f"no ExecuTorch runner is built for {arch or 'an unknown'} "
                          f"architecture (built: x86_64, aarch64).")

    def _put(self, local: Path, name: str, payload: bytes | None = None) -> str:
        """Copy a file (or a tar stream to unpack, for a folder) to ``workdir/name``."""
        remote = f"files/{name}"
        if remote in self._staged:
            return f"{self.workdir}/{remote}"
        quoted = shlex.quote(remote)
        if self.remote(f"test -e {quoted}").returncode == 0:  # sent before: same content hash
            self._staged.add(remote)
            return f"{self.workdir}/{remote}"
        size = len(payload) if payload is not None else local.stat().st_size
        free = self.check().details.get("free_bytes")
        if isinstance(free, int) and size > free:
            raise DeviceError(f"{self.name}: its disk is full for {local.name}: it needs "
                              f"{size / 1e6:.1f} MB and {free / 1e6:.1f} MB are free in "
                              f"{self.workdir}.")
        unpack = (f"mkdir -p {quoted}.partial && tar -C {quoted}.partial -xf -"
                  if payload is not None else f"cat > {quoted}.partial")
        script = (f"mkdir -p files && {{ {unpack} && mv {quoted}.partial {quoted}; }} || "
                  f"{{ s=$?; rm -rf {quoted}.partial; exit $s; }}")
        data = payload if payload is not None else local.read_bytes()
        done = self.remote(script, stdin=data, timeout=600)
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip()[-300:]
            full = "No space left" in said
            raise DeviceError(f"{self.name}: copying {local.name} failed"
                              + (": its disk is full" if full else "") + f" ({said}).")
        self._staged.add(remote)
        return f"{self.workdir}/{remote}"

    def stage(self, path: Path) -> str:  # noqa: D102
        path = Path(path)
        return self._put(path, f"{_sha(path)}-{path.name}")

    def _stage_folder(self, folder: Path, label: str) -> str:
        with tempfile.TemporaryFile() as buffer:
            with tarfile.open(fileobj=buffer, mode="w") as archive:
                for item in sorted(folder.iterdir()):
                    archive.add(item, arcname=item.name)
            buffer.seek(0)
            payload = buffer.read()
        return self._put(folder, f"{hashlib.sha256(payload).hexdigest()[:16]}-{label}", payload)

    def runner_command(self, runtime: str, model: str, threads: int) -> list[str]:  # noqa: D102
        if runtime == "onnxruntime":
            program = [self.python, self.stage(ORT_RUNNER)]
        else:
            bundle = self._stage_folder(self._bundle(self.check().arch), "pte-runner")
            program = [f"{bundle}/pte_runner"]
        # under a shell (not exec'd), so a runner killed by a signal comes back as 128 + n
        line = " ".join(shlex.quote(a) for a in [*program, model, str(threads)])
        return [*self._ssh, f"{line}; exit $?"]
