"""Golden outputs: a real runtime's outputs, recorded where it runs, checked anywhere.

Core ML ``predict`` runs only on macOS. There, ``validate --coreml M --record-golden DIR``
stores the inputs validation feeds and the outputs ``predict`` returned; on any machine,
``validate --coreml M --golden DIR`` checks the MIL executor (and ``predict`` where it runs)
against those outputs, which closes the gap between "the program computes the PyTorch
function as modelled" and "Core ML computed this".

A golden folder holds ``golden.npz`` (per batch: every input and output, exact) and
``golden.json`` (who produced it, for which artifact, the artifact's digest, the precision
and the batches). It is written whole or not at all; one recorded for another artifact, or
with other inputs, is refused with what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from odconv_deploy._atomic import atomic_output
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.runners.base import Runner, RunnerError, TensorMeta

GOLDEN_ARRAYS = "golden.npz"
GOLDEN_META = "golden.json"
FORMAT_VERSION = 1


class GoldenError(ODConvDeployError, ValueError):
    """A golden folder that is missing, unreadable, or recorded for something else."""


@dataclass
class Golden:
    """Recorded inputs and outputs per batch size, with where they came from."""

    producer: str  # the runner that computed the outputs, e.g. "coreml fp16 (predict)"
    artifact: str  # the artifact's file name
    digest: str  # sha256 of the artifact's bytes (see artifact_digest)
    precision: str
    feeds: dict[int, dict[str, np.ndarray]]
    outputs: dict[int, dict[str, np.ndarray]]
    environment: dict[str, str]

    @property
    def batches(self) -> list[int]:
        """The recorded batch sizes, ascending."""
        return sorted(self.feeds)


def artifact_digest(path: str | os.PathLike) -> str:
    """sha256 over an artifact's files (a folder such as ``.mlpackage``: names and bytes)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def record_golden(runner: Runner, feeds: dict[int, dict[str, np.ndarray]], artifact: str,
                  *, precision: str, environment: dict[str, str] | None = None) -> Golden:
    """Run ``runner`` on every feed and keep its outputs as the golden ones."""
    with runner:
        outputs = {b: {k: np.asarray(v) for k, v in runner.infer(f).items()}
                   for b, f in feeds.items()}
    return Golden(runner.name, Path(artifact).name, artifact_digest(artifact), precision,
                  feeds, outputs, dict(environment or {}))


def write_golden(golden: Golden, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``golden`` to ``folder`` (whole or not at all); returns the folder."""
    arrays = {f"b{b}/{kind}/{name}": value
              for b in golden.batches
              for kind, table in (("input", golden.feeds[b]), ("output", golden.outputs[b]))
              for name, value in table.items()}
    meta = {"format_version": FORMAT_VERSION, "producer": golden.producer,
            "artifact": golden.artifact, "digest": golden.digest,
            "precision": golden.precision, "batches": golden.batches,
            "environment": golden.environment}
    with atomic_output(folder, overwrite=overwrite) as tmp:
        tmp.mkdir()
        np.savez(tmp / GOLDEN_ARRAYS, **arrays)
        (tmp / GOLDEN_META).write_text(json.dumps(meta, indent=2))
    return Path(folder)


def read_golden(folder: str | os.PathLike) -> Golden:
    """Read a golden folder written by :func:`write_golden`.

    Raises:
        GoldenError: The folder or its files are missing or unreadable.
    """
    folder = Path(folder)
    meta_path, arrays_path = folder / GOLDEN_META, folder / GOLDEN_ARRAYS
    if not meta_path.is_file() or not arrays_path.is_file():
        raise GoldenError(f"{folder} is not a golden folder: expected {GOLDEN_META} and "
                          f"{GOLDEN_ARRAYS} in it. Note: record one with validate --coreml M "
                          "--record-golden DIR on a Mac.")
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(arrays_path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        version = meta["format_version"]
        producer, artifact = meta["producer"], meta["artifact"]
        digest, precision = meta["digest"], meta["precision"]
        batches = [int(b) for b in meta["batches"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GoldenError(f"The golden folder {folder} is unreadable ({type(exc).__name__}: "
                          f"{exc}). Note: record it again.") from exc
    if version != FORMAT_VERSION:
        raise GoldenError(f"{folder} holds golden format {version}; this version reads "
                          f"{FORMAT_VERSION}. Note: record it again.")
    feeds: dict[int, dict[str, np.ndarray]] = {b: {} for b in batches}
    outputs: dict[int, dict[str, np.ndarray]] = {b: {} for b in batches}
    for key, value in arrays.items():
        batch, kind, name = key.split("/", 2)
        (feeds if kind == "input" else outputs)[int(batch[1:])][name] = value
    if any(not feeds[b] or not outputs[b] for b in batches):
        raise GoldenError(f"The golden folder {folder} lacks inputs or outputs for some of "
                          f"the batches {batches}. Note: record it again.")
    return Golden(producer, artifact, digest, precision, feeds, outputs,
                  dict(meta.get("environment", {})))


def check_golden_artifact(golden: Golden, artifact: str | os.PathLike) -> None:
    """Refuse a golden recorded for another artifact (compared by digest)."""
    digest = artifact_digest(artifact)
    if digest != golden.digest:
        raise GoldenError(f"The golden outputs were recorded for {golden.artifact} (sha256 "
                          f"{golden.digest[:12]}...), not for {artifact} (sha256 "
                          f"{digest[:12]}...). Note: check the artifact they were recorded "
                          "for, or record them again for this one.")


class GoldenRunner(Runner):
    """Replays recorded outputs: the reference of a check against golden outputs.

    ``infer`` returns the outputs recorded for exactly this input and refuses any other, so a
    comparison can never pair outputs with the wrong inputs.
    """

    backend = "golden"

    def __init__(self, golden: Golden) -> None:
        super().__init__(name=f"golden: {golden.producer}")
        self.golden = golden

    def activate_impl(self) -> None:  # noqa: D102
        pass

    def get_input_metadata_impl(self) -> list[TensorMeta]:  # noqa: D102
        first = self.golden.feeds[self.golden.batches[0]]
        return [TensorMeta(name, (None, *value.shape[1:]), value.dtype)
                for name, value in first.items()]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: D102
        batch = int(next(iter(feed.values())).shape[0])
        recorded = self.golden.feeds.get(batch)
        if recorded is None:
            raise RunnerError(f"No golden outputs for batch {batch}; recorded batches: "
                              f"{self.golden.batches}.")
        if sorted(recorded) != sorted(feed) or any(
                not np.array_equal(recorded[k], np.asarray(feed[k])) for k in recorded):
            raise RunnerError(f"The inputs at batch {batch} differ from the recorded ones. "
                              "Note: check with the golden's own inputs.")
        return self.golden.outputs[batch]
