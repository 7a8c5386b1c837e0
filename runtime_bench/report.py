"""Write benchmark results: JSON, CSV, a Markdown table and PNG plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from odconv_deploy._atomic import atomic_output, check_writable
from odconv_deploy.status import Status
from odconv_deploy.tables import markdown_table
from runtime_bench.bench import BenchReport, BenchRow

CSV_FIELDS = ("model", "role", "format", "batch", "threads", "resolution", "strategy", "status",
              "median_ms", "p90_ms", "p99_ms", "min_ms", "iqr_ms", "n", "throughput_ips",
              "cold_start_s", "peak_rss_mb", "artifact_mb", "achieved_gflops",
              "pct_of_gemm_peak", "floor_ms", "ratio_to_static", "ratio_q25", "ratio_q75",
              "reason", "device")


def _flat(row: BenchRow) -> dict[str, object]:
    flat = {k: getattr(row, k) for k in CSV_FIELDS if hasattr(row, k)}
    flat.update({k: row.latency.get(k) for k in ("median_ms", "p90_ms", "p99_ms", "min_ms",
                                                 "iqr_ms", "n")})
    flat["ratio_to_static"] = row.ratio_to_static.get("ratio_median")
    flat["ratio_q25"] = row.ratio_to_static.get("ratio_q25")
    flat["ratio_q75"] = row.ratio_to_static.get("ratio_q75")
    return flat


def to_csv(report: BenchReport) -> str:
    """All rows as CSV."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in report.rows:
        writer.writerow(_flat(row))
    return buf.getvalue()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(report: BenchReport) -> str:
    """A latency table (ODConv beside its static twin) with the machine and settings."""
    c, m = report.config, report.machine
    lines = [f"Machine: {m.get('cpu')} ({m.get('cores')} cores), torch {m.get('torch')}, "
             f"onnxruntime {m.get('onnxruntime')}, executorch {m.get('executorch')}.",
             f"Settings: warm-up {c.settings.warmup}, {c.settings.iterations} iterations"
             f"{f' or {c.settings.budget_s} s' if c.settings.budget_s else ''}, strategy "
             f"{c.strategy}; latency medians with the IQR; ratio = median of interleaved A/B "
             "rounds (ODConv / static) with its IQR; ONNX Runtime with several threads runs "
             "without spin-waiting pool threads.",
             "Probes: " + "; ".join(f"{t} thread(s): sgemm {p.sgemm_gflops:.0f} GFLOP/s, read "
                                    f"{p.read_gbps:.1f} GB/s" for t, p in report.probes.items()),
             ""]
    rows: list[list[object]] = []
    for r in report.rows:
        if r.status is not Status.OK:
            rows.append([r.model, r.format, r.batch, r.threads, f"{r.status}: {r.reason[:90]}"])
            continue
        ratio = r.ratio_to_static
        ratio_txt = (f"{ratio['ratio_median']:.2f} ({ratio['ratio_q25']:.2f}-"
                     f"{ratio['ratio_q75']:.2f})" if ratio else "-")
        rows.append([r.model, r.format, r.batch, r.threads, f"{r.latency['median_ms']:.2f}",
                     f"{r.latency['iqr_ms']:.2f}", f"{r.latency['p90_ms']:.2f}",
                     _fmt(r.throughput_ips, ".1f"), _fmt(r.achieved_gflops, ".1f"),
                     _fmt(r.pct_of_gemm_peak, ".0f"), _fmt(r.floor_ms, ".2f"), ratio_txt])
    lines += markdown_table(["model", "format", "batch", "threads", "median ms", "IQR ms",
                             "p90 ms", "img/s", "GFLOP/s", "% peak", "floor ms",
                             "ratio to static"], rows)
    return "\n".join(lines) + "\n"


def _plots(report: BenchReport, out: Path, overwrite: bool) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report.rows if r.status is Status.OK]
    if not ok:
        return []
    written = []
    keys = sorted({(r.format, r.batch, r.threads) for r in ok})
    labels = [f"{b}\nb{n} t{t}" for b, n, t in keys]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys)), 4))
    width = 0.4
    for offset, role in ((-width / 2, "odconv"), (width / 2, "static")):
        values = [next((r.latency["median_ms"] for r in ok if r.role == role
                        and (r.format, r.batch, r.threads) == k), 0.0) for k in keys]
        ax.bar([i + offset for i in range(len(keys))], values, width,
               label=next((r.model for r in ok if r.role == role), role))
    ax.set_xticks(range(len(keys)), labels)
    ax.set_ylabel("median latency per batch (ms)")
    ax.set_title("Latency per format (lower is better)")
    ax.legend()
    fig.tight_layout()
    with atomic_output(out / "latency.png", overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    written.append(out / "latency.png")
    plt.close(fig)
    ratios = [(f"{r.format}\nb{r.batch} t{r.threads}", r.ratio_to_static) for r in ok
              if r.ratio_to_static]
    if ratios:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ratios)), 4))
        meds = [x["ratio_median"] for _, x in ratios]
        errs = [[m - x["ratio_q25"] for m, (_, x) in zip(meds, ratios, strict=True)],
                [x["ratio_q75"] - m for m, (_, x) in zip(meds, ratios, strict=True)]]
        ax.bar(range(len(ratios)), meds, yerr=errs, capsize=4, color="tab:orange")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(ratios)), [label for label, _ in ratios])
        ax.set_ylabel("ODConv / static latency")
        ax.set_title("Cost of ODConv over its static twin (median, IQR)")
        fig.tight_layout()
        with atomic_output(out / "ratio.png", overwrite=overwrite) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        written.append(out / "ratio.png")
        plt.close(fig)
    return written


#: The files :func:`write_report` writes (the plots only when there are rows to plot).
REPORT_FILES = ("bench.json", "bench.csv", "bench.md", "latency.png", "ratio.png")


def check_report_writable(out: str | Path, *, overwrite: bool = False) -> None:
    """Refuse a folder that already holds results (unless ``overwrite``) or cannot be written.

    Called before any measurement, so a refusal loses no work.

    Raises:
        OutputPathError: One of :data:`REPORT_FILES` exists, or the folder is not writable.
    """
    for name in REPORT_FILES:
        check_writable(Path(out) / name, overwrite=overwrite)


def write_result_files(out: str | Path, stem: str, data: dict[str, object], markdown: str
                       ) -> None:
    """Write a measurement script's results, ``stem.json`` and ``stem.md``, into ``out``.

    Each file is written whole (replacing the committed one): the Markdown is the table the
    docs quote, the JSON what it is rebuilt from (``tests/test_bench.py`` checks they agree).
    """
    for name, text in ((f"{stem}.json", json.dumps(data, indent=2, default=str)),
                       (f"{stem}.md", markdown)):
        with atomic_output(Path(out) / name, overwrite=True) as tmp:
            tmp.write_text(text)


def write_report(report: BenchReport, out: str | Path, *, overwrite: bool = False
                 ) -> list[Path]:
    """Write ``bench.json``, ``bench.csv``, ``bench.md`` and plots into ``out``."""
    out = Path(out)
    written = []
    for name, text in (("bench.json", json.dumps(report.to_dict(), indent=2, default=str)),
                       ("bench.csv", to_csv(report)), ("bench.md", to_markdown(report))):
        with atomic_output(out / name, overwrite=overwrite) as tmp:
            tmp.write_text(text)
        written.append(out / name)
    return written + _plots(report, out, overwrite)
