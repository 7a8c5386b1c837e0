"""The one Markdown table builder of every report (validation, pipeline, benchmarks)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a Markdown table; a row shorter than ``header`` is padded with empty cells.

    Pipes and newlines inside cells are escaped, so an error message cannot break the table.
    """
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_cell(v) for v in row] + [""] * (len(header) - len(row))
        lines.append("| " + " | ".join(cells) + " |")
    return lines
