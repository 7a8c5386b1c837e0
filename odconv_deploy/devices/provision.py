"""Fetch and cache what a device needs, from the package registries only (PyPI, Debian).

The emulated ARM64 device (``arm64-emu``) needs, under ``<cache>/arm64``:

- ``qemu/qemu-aarch64``: QEMU user mode from Debian trixie's ``qemu-user`` (10.0, statically
  linked, so it runs on this bookworm host). Trixie's, because QEMU >= 8 writes the
  ``/proc/cpuinfo`` of the CPU model it emulates; 7.2 passes the host's through, and
  onnxruntime's CPU detection then crashes.
- ``sysroot/``: Debian bookworm's arm64 ``python3.11``, ``libstdc++6`` and ``libatomic1``
  with their dependencies, unpacked with ``dpkg-deb -x`` (no root, no chroot: QEMU's ``-L``).
- ``site/``: the aarch64 wheels of onnxruntime and numpy, installed by this host's pip
  (``--platform manylinux_2_28_aarch64``), at the host's versions, so the device computes
  with the same release as the host.
- ``executorch/`` and ``bundle/``: the aarch64 executorch wheel's libraries and headers, and
  the ExecuTorch runner cross-compiled against them (:mod:`odconv_deploy.devices.build`).

apt runs with its own lists, cache and status under the cache folder, so the host's package
state is never touched. Every part is written whole or not at all, and is reused once made.
The cache is ``$ODCONV_DEPLOY_CACHE``, else ``~/.cache/odconv-deploy``.
"""

from __future__ import annotations

import getpass
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from odconv_deploy._atomic import atomic_output
from odconv_deploy.devices.build import build_bundle
from odconv_deploy.devices.protocol import DeviceError

#: Debian suites: trixie for QEMU (>= 8), bookworm for the sysroot (Python 3.11, matching the
#: cp311 wheels).
QEMU_SUITE, SYSROOT_SUITE = "trixie", "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SYSROOT_PACKAGES = ("python3.11", "libstdc++6", "libatomic1")
#: The emulated device's Python and the wheels' platform tag.
DEVICE_PYTHON = "3.11"
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
#: Releases taken when the host has none installed.
FALLBACK_VERSIONS = {"onnxruntime": "1.32.0", "numpy": "2.4.6", "executorch": "1.5.1"}


def cache_root() -> Path:
    """Where device files are cached: ``$ODCONV_DEPLOY_CACHE`` or ``~/.cache/odconv-deploy``."""
    configured = os.environ.get("ODCONV_DEPLOY_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "odconv-deploy"


def host_version(package: str) -> str:
    """The host's installed release of ``package``, else the fallback release."""
    try:
        return importlib.metadata.version(package).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return FALLBACK_VERSIONS[package]


@dataclass(frozen=True)
class Arm64Layout:
    """The cached parts of the emulated ARM64 device."""

    root: Path

    @property
    def qemu(self) -> Path:
        """QEMU user mode for aarch64."""
        return self.root / "qemu" / "qemu-aarch64"

    @property
    def sysroot(self) -> Path:
        """The arm64 root QEMU loads libraries from (``-L``)."""
        return self.root / "sysroot"

    @property
    def python(self) -> Path:
        """The arm64 Python in the sysroot."""
        return self.sysroot / "usr" / "bin" / f"python{DEVICE_PYTHON}"

    @property
    def site(self) -> Path:
        """The aarch64 onnxruntime and numpy packages."""
        return self.root / "site"

    @property
    def executorch(self) -> Path:
        """The aarch64 executorch wheel's libraries and headers."""
        return self.root / "executorch"

    @property
    def bundle(self) -> Path:
        """The cross-built ExecuTorch runner and its libraries."""
        return self.root / "bundle"

    def missing(self) -> list[str]:
        """The parts not made yet."""
        parts = {"qemu": self.qemu, "sysroot": self.python, "onnxruntime wheels": self.site,
                 "ExecuTorch runner": self.bundle / "pte_runner"}
        return [name for name, path in parts.items() if not path.exists()]


def arm64_layout() -> Arm64Layout:
    """The emulated ARM64 device's cache folder."""
    return Arm64Layout(cache_root() / "arm64")


def host_bundle_path() -> Path:
    """Where the ExecuTorch runner built for this host lives."""
    return cache_root() / platform.machine() / "bundle"


@dataclass
class SetupReport:
    """What a setup made: each part with how it was got, and the disk it takes."""

    device: str
    parts: dict[str, str] = field(default_factory=dict)
    disk_bytes: int = 0
    failures: dict[str, str] = field(default_factory=dict)


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed)."""
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise DeviceError(f"{what} failed ({command[0]} exited {done.returncode}): "
                          + " | ".join(tail))


def _apt_download(packages: tuple[str, ...], *, suite: str, arch: str, into: Path,
                  with_dependencies: bool) -> list[Path]:
    """Download Debian packages with a private apt state (lists, cache, status) in a temp dir.

    Returns the ``.deb`` files. The host's apt state is not read or changed.
    """
    if shutil.which("apt-get") is None:
        raise DeviceError("fetching Debian packages needs apt-get, which this machine lacks "
                          "(a Debian or Ubuntu host is needed to set up an emulated device).")
    state = Path(tempfile.mkdtemp(prefix="apt-", dir=into))
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True)
    (state / "status").touch()
    sources = state / "sources.list"
    sources.write_text(f"deb [arch={arch} signed-by=/usr/share/keyrings/debian-archive-keyring"
                       f".gpg] {DEBIAN_MIRROR} {suite} main\n")
    options = [f"-oDir::State::Lists={state / 'lists'}", f"-oDir::Cache={state / 'cache'}",
               f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/dev/null",
               f"-oDir::State::status={state / 'status'}", f"-oAPT::Architecture={arch}",
               f"-oAPT::Architectures::={arch}", "-oDebug::NoLocking=1",
               f"-oAPT::Sandbox::User={getpass.getuser()}", "-qq"]
    _run(["apt-get", *options, "update"], f"apt-get update of Debian {suite} ({arch})")
    if with_dependencies:  # an empty status: every dependency is downloaded
        _run(["apt-get", *options, "-y", "-d", "--no-install-recommends", "install",
              *packages], f"downloading {' '.join(packages)} from Debian {suite}")
        return sorted((state / "cache" / "archives").glob("*.deb"))
    _run(["sh", "-c", f'cd "{state}" && apt-get "$@" download {" ".join(packages)}', "apt",
          *options], f"downloading {' '.join(packages)} from Debian {suite}")
    return sorted(state.glob("*.deb"))


def _pip_download(requirements: list[str], into: Path) -> list[Path]:
    """aarch64 wheels of ``requirements`` for the device's Python, by this host's pip."""
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(into),
          "--platform", WHEEL_PLATFORM, "--only-binary=:all:", "--python-version",
          DEVICE_PYTHON, "--implementation", "cp", *requirements],
         f"pip download of the aarch64 wheels {requirements}")
    return sorted(into.glob("*.whl"))


def _unzip(wheel: Path, into: Path, members: tuple[str, ...] = ()) -> None:
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if not members or n.startswith(members)]
        archive.extractall(into, names)


def setup_arm64(progress: Callable[[str], None] = lambda _: None) -> SetupReport:
    """Make every missing part of the emulated ARM64 device (see the module docstring).

    Raises:
        DeviceError: A part could not be fetched or built (the parts made are kept).
    """
    if platform.machine() != "x86_64":
        raise DeviceError(f"arm64-emu is set up on an x86-64 Linux host; this one is "
                          f"{platform.system()} {platform.machine()}. Note: on an aarch64 "
                          "Linux host use the device 'host'.")
    layout = arm64_layout()
    layout.root.mkdir(parents=True, exist_ok=True)
    report = SetupReport("arm64-emu")
    ort, numpy, et = (host_version(p) for p in ("onnxruntime", "numpy", "executorch"))
    with tempfile.TemporaryDirectory(prefix="setup-", dir=layout.root) as scratch:
        work = Path(scratch)
        if not layout.qemu.exists():
            progress(f"fetch qemu-user from Debian {QEMU_SUITE}")
            deb, = _apt_download(("qemu-user",), suite=QEMU_SUITE, arch="amd64", into=work,
                                 with_dependencies=False)
            _run(["dpkg-deb", "-x", str(deb), str(work / "qemu-user")], "unpacking qemu-user")
            with atomic_output(layout.qemu.parent, overwrite=True) as tmp:
                tmp.mkdir()
                shutil.copy2(work / "qemu-user/usr/bin/qemu-aarch64", tmp / "qemu-aarch64")
            report.parts["qemu"] = f"Debian {QEMU_SUITE} qemu-user ({deb.name})"
        if not layout.python.exists():
            progress(f"fetch the arm64 sysroot from Debian {SYSROOT_SUITE}")
            debs = _apt_download(SYSROOT_PACKAGES, suite=SYSROOT_SUITE, arch="arm64",
                                 into=work, with_dependencies=True)
            with atomic_output(layout.sysroot, overwrite=True) as tmp:
                tmp.mkdir()
                for deb in debs:
                    _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
            report.parts["sysroot"] = (f"Debian {SYSROOT_SUITE} arm64: {len(debs)} packages "
                                       f"({', '.join(SYSROOT_PACKAGES)} and dependencies)")
        if not layout.site.exists():
            progress(f"fetch aarch64 wheels onnxruntime=={ort} numpy=={numpy}")
            wheels = _pip_download([f"onnxruntime=={ort}", f"numpy=={numpy}"], work / "wheels")
            with atomic_output(layout.site, overwrite=True) as tmp:
                tmp.mkdir()
                for wheel in wheels:
                    _unzip(wheel, tmp)
            report.parts["site"] = ", ".join(w.name for w in wheels)
        if not (layout.bundle / "pte_runner").exists():
            if not layout.executorch.exists():
                progress(f"fetch the aarch64 executorch=={et} wheel (runtime libraries)")
                wheel, = _pip_download([f"executorch=={et}"], work / "et-wheel")
                with atomic_output(layout.executorch, overwrite=True) as tmp:
                    _unzip(wheel, tmp.parent / "unzipped",
                           ("executorch/lib/", "executorch/include/", "executorch/share/"))
                    (tmp.parent / "unzipped" / "executorch").rename(tmp)
                report.parts["executorch"] = wheel.name
            progress("cross-compile the ExecuTorch runner for aarch64")
            try:
                build_bundle(layout.executorch, "aarch64", layout.bundle)
                report.parts["ExecuTorch runner"] = "built with aarch64-linux-gnu-g++"
            except DeviceError as exc:
                report.failures["ExecuTorch runner"] = str(exc)
    report.disk_bytes = folder_bytes(layout.root)
    return report


def ensure_host_bundle() -> Path:
    """The ExecuTorch runner for this host, built against the installed executorch wheel.

    Raises:
        DeviceError: executorch is not installed, or the build failed.
    """
    bundle = host_bundle_path()
    version = host_version("executorch")
    stamp = bundle / "VERSION"
    if stamp.exists() and stamp.read_text().split()[1] == version:
        return bundle
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise DeviceError("the ExecuTorch runner is built against the installed executorch "
                          "package, which is missing. Note: pip install "
                          "'odconv-deploy[executorch]'")
    package = Path(next(iter(spec.submodule_search_locations))).resolve()
    return build_bundle(package, platform.machine(), bundle)
