"""Write files and directories whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from odconv_deploy.errors import ODConvDeployError


class OutputPathError(ODConvDeployError, OSError):
    """An output path that exists (and may not be overwritten) or cannot be written."""


def check_writable(path: Path, *, overwrite: bool) -> None:
    """Refuse an existing ``path`` unless ``overwrite``; make sure its folder can be written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputPathError(
            f"{path} already exists. Note: pass overwrite=True (CLI: --overwrite) to replace "
            "it, or choose another output path."
        )
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"Cannot create the folder {parent}: {exc.strerror}.") from exc
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"The folder {parent} is not writable. Note: choose another --out.")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it into place on success.

    On any exception the temporary file or folder is removed and ``path`` is untouched, so a
    failed or interrupted write never leaves something that looks complete.

    The writer creates the yielded path itself, as a file or as a folder (``.mlpackage``).

    Args:
        path: Final location.
        overwrite: Replace an existing ``path``; otherwise raise :class:`OutputPathError`.
    """
    path = Path(path)
    created = _missing_folders(path.parent)  # made by check_writable; removed again on failure
    check_writable(path, overwrite=overwrite)
    suffix = "".join(path.suffixes)
    tmp_parent = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    tmp = Path(tmp_parent) / f"out{suffix}"
    done = False
    try:
        yield tmp
        if not tmp.exists():
            raise OutputPathError(f"Nothing was written for {path}.")
        if path.exists():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        os.replace(tmp, path)
        done = True
    finally:
        shutil.rmtree(tmp_parent, ignore_errors=True)
        if not done:
            for folder in created:  # deepest first; only while still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing
