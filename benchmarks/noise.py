"""How much a timed ratio moves between runs, to size `harness.NOISE`.

`python -m benchmarks.noise RESULT.json RESULT.json ...`: the JSON of repeated runs of one
benchmark (`benchmarks.run --quick --out DIR`, one DIR per run). For every ratio target
gated by NOISE: its value in each run, their median, and its spread, the largest relative
distance of one run's value from that median. A ratio whose true value sits at its goal
fails a run by chance when that run's value lands past the goal by more than NOISE, so NOISE
must cover the largest spread.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from benchmarks import harness
from benchmarks.harness import Target, median


class Result(msgspec.Struct):
    """The part of a benchmark's JSON read here."""

    targets: list[Target]


def spreads(results: Sequence[Result]) -> list[list[object]]:
    """Per ratio target: model, name, each run's value, their median, the spread."""
    values: dict[tuple[str, str], list[float | None]] = {}
    for i, result in enumerate(results):
        for t in result.targets:
            if t.noise and " / " in t.name:  # ratios: a difference of seconds is no ratio
                values.setdefault((t.model, t.name), [None] * len(results))[i] = t.value
    out: list[list[object]] = []
    for (model, name), got in values.items():
        middle = median(got)
        known = [v for v in got if v is not None]
        spread = max(abs(v / middle - 1) for v in known) if middle else None
        out.append([model, name, *got, middle, spread])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table and the largest spread against NOISE; 1 when NOISE is smaller."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.noise", description=__doc__)
    parser.add_argument("results", nargs="+", type=Path, help="JSON of repeated runs")
    args = parser.parse_args(argv)
    results = [msgspec.json.decode(p.read_bytes(), type=Result) for p in args.results]
    rows = spreads(results)
    runs = [f"run {i + 1}" for i in range(len(results))]
    print(harness.table(["model", "target", *runs, "median", "spread"], rows))
    largest = max((r[-1] for r in rows if isinstance(r[-1], float)), default=0.0)
    print(f"\nlargest spread {largest:.1%} over {len(results)} runs; NOISE = {harness.NOISE:.0%}")
    return int(largest > harness.NOISE)


if __name__ == "__main__":
    sys.exit(main())
