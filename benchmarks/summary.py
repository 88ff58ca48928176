"""From raw samples to table rows: medians per model and method, and ratios between them."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Final, Literal

import msgspec

from benchmarks.child import ChildResult
from benchmarks.harness import Sample
from benchmarks.models import Generated

Part = Literal["load", "total", "e2e"]
MIB: Final = 1 << 20


class Method(msgspec.Struct, frozen=True):
    """A table row kind: which child mode, and which part of its timing.

    `load`: the loading call until it returns; `total`: plus touching every weight (or the
    first forward pass); `e2e`: from spawning `python` until the weights are touched.
    """

    key: str
    label: str
    mode: str
    part: Part


METHODS: Final = (
    Method("floor-read", "floor: read files into a buffer", "floor-read", "total"),
    Method("floor-mmap", "floor: mmap, touch every page", "floor-mmap", "total"),
    Method("wmtp", "wmtp.load, until it returns", "wmtp", "load"),
    Method("wmtp-touch", "wmtp.load + touch (materialised)", "wmtp", "total"),
    Method("wmtp-bf16-touch", "wmtp.load dtype=bf16 + touch", "wmtp-bf16", "total"),
    Method("old", "old method, until it returns", "old", "load"),
    Method("old-touch", "old method + touch", "old", "total"),
    Method("hf", "from_pretrained, until it returns", "hf", "load"),
    Method("hf-touch", "from_pretrained + touch", "hf", "total"),
    Method("wmtp-forward", "wmtp.load + first forward", "wmtp-forward", "total"),
    Method("hf-forward", "from_pretrained + first forward", "hf-forward", "total"),
    Method("e2e-wmtp", "end to end: python, import, wmtp.load, touch", "e2e-wmtp", "e2e"),
    Method("e2e-old", "end to end: python, import, old method, touch", "e2e-old", "e2e"),
)


class Row(msgspec.Struct, frozen=True):
    """Median figures of one method on one model; ratios are of medians from the same run."""

    model: str
    weight_bytes: int
    parameters: int
    method: str
    label: str
    runs: int  # runs that completed with the right weights
    times_s: list[float]
    median_s: float | None
    vs_floor: float | None  # against reading the files into a buffer
    vs_mmap_floor: float | None  # against touching every page of a map of the files
    vs_old: float | None  # against the old method (+ touch; end to end against end to end)
    rss_peak_mib: float | None
    rss_added_mib: float | None  # peak RSS minus RSS before the clock started
    problems: list[str]
    error: str


class ImportRow(msgspec.Struct, frozen=True):
    """`python -c "import wmtp"` against `python -c "pass"`, medians in seconds."""

    bare_s: float | None
    wmtp_s: float | None
    overhead_s: float | None
    runs: int
    error: str


def seconds(result: ChildResult, part: Part, spawn_to_end: float) -> float:
    """The time of `part` in one sample."""
    if part == "load":
        return result.load_s
    if part == "total":
        return result.load_s + result.after_s
    return spawn_to_end


def rss(result: ChildResult, part: Part) -> tuple[float, float]:
    """Peak RSS at the end of `part`, and how much of it the measured part added (MiB)."""
    peak = result.rss_load_mb if part == "load" else result.rss_peak_mb
    return peak, peak - result.rss_start_mb


def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b when both are known and b is positive."""
    return a / b if a is not None and b else None


def method_row(method: Method, model: Generated, samples: Sequence[Sample]) -> Row | None:
    """The row of `method` on `model`, or None if that mode was not run on it."""
    mine = [s for s in samples if s.model == model.spec.name and s.result.mode == method.mode]
    if not mine:
        return None
    good = [s for s in mine if not s.result.error and not s.result.problems]
    times = [seconds(s.result, method.part, s.spawn_to_end_s) for s in good]
    memory = [rss(s.result, method.part) for s in good]
    problems = sorted({p for s in mine for p in s.result.problems})
    errors = sorted({s.result.error for s in mine if s.result.error})
    return Row(
        model=model.spec.name,
        weight_bytes=model.weight_bytes,
        parameters=model.parameters,
        method=method.key,
        label=method.label,
        runs=len(good),
        times_s=times,
        median_s=median(times),
        vs_floor=None,
        vs_mmap_floor=None,
        vs_old=None,
        rss_peak_mib=median([peak for peak, _ in memory]),
        rss_added_mib=median([added for _, added in memory]),
        problems=problems[:5],
        error="; ".join(errors),
    )


def with_ratios(rows: list[Row]) -> list[Row]:
    """`rows` with their ratios to the floors and the old method of the same model."""
    by_key = {(r.model, r.method): r.median_s for r in rows}
    out = []
    for r in rows:
        e2e = r.method.startswith("e2e-")
        floor = None if e2e else by_key.get((r.model, "floor-read"))
        mmap_floor = None if e2e else by_key.get((r.model, "floor-mmap"))
        old = by_key.get((r.model, "e2e-old" if e2e else "old-touch"))
        out.append(
            msgspec.structs.replace(
                r,
                vs_floor=ratio(r.median_s, floor),
                vs_mmap_floor=ratio(r.median_s, mmap_floor),
                vs_old=ratio(r.median_s, old),
            )
        )
    return out


def summarise(models: Sequence[Generated], samples: Sequence[Sample]) -> list[Row]:
    """Every (model, method) row that was measured, models in the given order."""
    rows = [
        row
        for model in models
        for method in METHODS
        if (row := method_row(method, model, samples)) is not None
    ]
    return with_ratios(rows)


def import_row(bare: Sequence[float], with_wmtp: Sequence[float], error: str) -> ImportRow:
    """Medians of the interpreter timings and their difference."""
    b, w = median(bare), median(with_wmtp)
    overhead = w - b if w is not None and b is not None else None
    return ImportRow(bare_s=b, wmtp_s=w, overhead_s=overhead, runs=len(with_wmtp), error=error)
