"""The outputs of a run: Markdown tables, the JSON record and the chart."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec

from benchmarks.checks import Check
from benchmarks.harness import Sample
from benchmarks.lines import LineCount
from benchmarks.lines import markdown as lines_markdown
from benchmarks.models import Generated
from benchmarks.summary import MIB, ImportRow, Row

CHART_METHODS: Final = (
    "floor-read",
    "floor-mmap",
    "wmtp",
    "wmtp-touch",
    "wmtp-bf16-touch",
    "old-touch",
    "hf-touch",
)


class Report(msgspec.Struct, frozen=True):
    """Everything one run measured, as written to `benchmarks/results/<mode>.json`."""

    mode: str
    created: str
    command: str
    machine: dict[str, str]
    runs: int
    notes: list[str]
    models: list[Generated]
    rows: list[Row]
    imports: ImportRow
    checks: list[Check]
    lines: list[LineCount]
    failures: list[str]
    samples: list[Sample]


def fmt(value: float | None, digits: int = 3) -> str:
    """`value` to `digits` significant digits, or a dash."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"


def model_label(model: Generated) -> str:
    """`198m` (198M params, 754 MiB, 5 shards)-style description of a model."""
    shards = f", shards of <= {model.spec.shard_mb} MiB" if model.spec.shard_mb else ""
    kind = "HF GPT-2" if model.spec.family == "hf" else "GPT2-MTP"
    size = f"{model.parameters / 1e6:.0f}M params, {model.weight_bytes / MIB:,.0f} MiB"
    return f"{model.spec.name} ({kind}, {size}{shards})"


def results_table(models: Sequence[Generated], rows: Sequence[Row]) -> str:
    """The main table: per model and method, median time, ratios and memory."""
    labels = {m.spec.name: model_label(m) for m in models}
    out = [
        "| model | method | median s | x read floor | x mmap floor | x old method "
        "| peak RSS MiB | added RSS MiB | runs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        why = (
            f" ({r.error})"
            if r.error
            else (f" (wrong weights: {r.problems[0]})" if r.problems else "")
        )
        out.append(
            f"| {labels[r.model]} | {r.label}{why} | {fmt(r.median_s)} | {fmt(r.vs_floor)} "
            f"| {fmt(r.vs_mmap_floor)} | {fmt(r.vs_old)} | {fmt(r.rss_peak_mib, 4)} "
            f"| {fmt(r.rss_added_mib, 4)} | {r.runs} |"
        )
    return "\n".join(out)


def imports_table(imports: ImportRow) -> str:
    """`import wmtp` against a bare interpreter."""
    why = f" ({imports.error})" if imports.error else ""
    return "\n".join(
        [
            "| interpreter | median s |",
            "| --- | ---: |",
            f"| `python -c pass` | {fmt(imports.bare_s)} |",
            f"| `python -c 'import wmtp'`{why} | {fmt(imports.wmtp_s)} |",
            f"| **import wmtp adds** | {fmt(imports.overhead_s)} |",
        ]
    )


def checks_table(checks: Sequence[Check]) -> str:
    """The targets with measured values and verdicts."""
    out = [
        "| model | target | measured | target | fails past | verdict |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for c in checks:
        sign = ">=" if c.at_least else "<="
        limit = "-" if math.isinf(c.limit) else fmt(c.limit)
        out.append(
            f"| {c.model} | {c.name} | {fmt(c.value)} | {sign} {fmt(c.target)} "
            f"| {limit} | {c.status} |"
        )
    return "\n".join(out)


def markdown(report: Report) -> str:
    """The whole report as Markdown: notes, results, imports, checks, line counts."""
    parts = [
        f"## wmtp load benchmark ({report.mode}, {report.created})",
        f"`{report.command}` on {report.machine.get('summary', '')}",
        "\n".join(f"- {note}" for note in report.notes),
        results_table(report.models, report.rows),
        "### import wmtp",
        imports_table(report.imports),
        "### Targets",
        checks_table(report.checks),
        "### Lines",
        lines_markdown(report.lines),
    ]
    if report.failures:
        parts += ["### Failures", "\n".join(f"- {f}" for f in report.failures)]
    return "\n\n".join(parts) + "\n"


def chart(models: Sequence[Generated], rows: Sequence[Row], path: Path) -> None:
    """Median load time against weight size per method (log-log), written as a PNG.

    Lines join the single-file MTP models; squares are sharded, triangles Hugging Face models.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = {m.spec.name: "sharded" if m.spec.shard_mb else m.spec.family for m in models}
    styles = {"mtp": ("o", "-"), "sharded": ("s", "none"), "hf": ("^", "none")}
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, method in enumerate(CHART_METHODS):
        mine = [r for r in rows if r.method == method and r.median_s]
        labelled = False
        for k, (marker, line) in styles.items():
            points = sorted(
                (r.weight_bytes / MIB, r.median_s or 0.0) for r in mine if kind[r.model] == k
            )
            if points:
                xs, ys = zip(*points, strict=True)
                label = None if labelled else mine[0].label
                ax.plot(xs, ys, marker=marker, linestyle=line, color=f"C{i}", label=label)
                labelled = True
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weights (MiB, float32)")
    ax.set_ylabel("median seconds (libraries imported beforehand; warm page cache)")
    ax.set_title("Load time against model size (o: GPT2-MTP, s: sharded, ^: HF GPT-2)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_text(path: Path, text: str | bytes) -> None:
    """Write `path` through a temporary file, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(text, str):
        tmp.write_text(text)
    else:
        tmp.write_bytes(text)
    tmp.replace(path)


def write_outputs(report: Report, markdown_text: str, directory: Path) -> list[Path]:
    """`<mode>.json`, `<mode>.md` and `<mode>.png` in `directory`; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{report.mode}.json"
    md_path = directory / f"{report.mode}.md"
    png_path = directory / f"{report.mode}.png"
    write_text(json_path, msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    write_text(md_path, markdown_text)
    chart(report.models, report.rows, png_path)
    return [json_path, md_path, png_path]
