"""The package version, and the one versions stamp put into every artifact and report."""

from __future__ import annotations

import importlib.metadata

__version__ = "0.1.0"


def package_versions(*packages: str) -> dict[str, str]:
    """odconv-deploy's and torch's versions, then each of ``packages`` ("not installed")."""
    versions = {"odconv_deploy": __version__}
    for package in ("torch", *packages):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
