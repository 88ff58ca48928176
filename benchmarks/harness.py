"""The harness every benchmark uses: interleaved rounds, medians, targets, Markdown, outputs."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final, Literal, TypeVar

import msgspec

T = TypeVar("T")
Status = Literal["pass", "within noise", "FAIL", "not measured"]
REPO: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = REPO / "benchmarks" / "results"
MIB: Final = 1 << 20
# How far a timed ratio of medians may pass its goal before it fails the run: the largest
# spread of such ratios across 8 quick runs on the 2-core machine, 27% (wmtp / idiom, cold
# first forward), rounded up (benchmarks/README.md, "Noise"; results/noise.md). Within it a
# miss is reported as within noise; past it the run fails.
NOISE: Final = 0.30
# Children must never reach the network, and progress bars would only pollute stderr.
QUIET: Final = {
    **dict.fromkeys(
        ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"), "1"
    ),
    "TRANSFORMERS_VERBOSITY": "error",
    "AWS_METADATA_ENDPOINT": "http://127.0.0.1:9",
}


class Target(msgspec.Struct, frozen=True):
    """A target on one model: the measured value, the goal, the limit past which the run fails."""

    model: str
    name: str
    value: float | None
    goal: float
    limit: float
    at_least: bool  # the value must be >= goal (else <=)
    status: Status
    noise: bool = True  # the limit is the goal widened by NOISE (else given: counts, memory)


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def child_env() -> dict[str, str]:
    """The environment of a child process: quiet, offline, the repository importable."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **QUIET, "PYTHONPATH": path}


def interleave(
    jobs: Mapping[str, Callable[[], T]], runs: int, warmup: int = 0
) -> dict[str, list[T]]:
    """`runs` results of every job, one of each per round, the order rotating round by round.

    Interleaving spreads the slow drifts of a shared machine over all jobs alike, and rotating
    keeps a first-in-round effect off any one job. The first `warmup` rounds are dropped.
    """
    names = list(jobs)
    out: dict[str, list[T]] = {name: [] for name in names}
    for round_no in range(warmup + runs):
        shift = round_no % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            result = jobs[name]()
            if round_no >= warmup:
                out[name].append(result)
    return out


def median(values: Iterable[float | None]) -> float | None:
    """The median of the known values, or None when there are none."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b when both are known and b is positive."""
    return a / b if a is not None and b else None


def target(
    model: str,
    name: str,
    value: float | None,
    goal: float,
    limit: float | None = None,
    *,
    at_least: bool = False,
) -> Target:
    """A `Target` with its verdict: met, within noise, past the limit, or not measured.

    The limit is the goal widened by `NOISE` (divided by 1 + NOISE for an at-least target).
    An explicit `limit` is for what load does not make noisy (counts, memory); one under the
    goal makes it an at-least target too.
    """
    widened = goal / (1 + NOISE) if at_least else goal * (1 + NOISE)
    bound = widened if limit is None else limit
    at_least = at_least or bound < goal
    sign = -1.0 if at_least else 1.0
    status: Status = "not measured"
    if value is not None:
        met, within = sign * value <= sign * goal, sign * value <= sign * bound
        status = "pass" if met else "within noise" if within else "FAIL"
    return Target(model, name, value, goal, bound, at_least, status, limit is None)


def failed(targets: Iterable[Target]) -> list[str]:
    """Why the targets fail the run: past their limit, or not measured."""
    return [
        f"{t.model}: {t.name}: {t.status} ({fmt(t.value)}, limit {fmt(t.limit)})"
        for t in targets
        if t.status in ("FAIL", "not measured")
    ]


def fmt(value: object, digits: int = 3) -> str:
    """`value` to `digits` significant digits, or a dash."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]], left: int = 2) -> str:
    """A Markdown table; floats formatted with `fmt`, the first `left` columns left-aligned."""
    cells = [[str(c) if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    align = ["---" if i < left else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [list(header), align, *cells])


def targets_table(targets: Sequence[Target]) -> str:
    """The targets with measured values and verdicts."""
    header = ["model", "target", "measured", "goal", "fails past", "verdict"]
    goal = {True: ">=", False: "<="}
    rows = [
        (t.model, t.name, t.value, f"{goal[t.at_least]} {fmt(t.goal)}", t.limit, t.status)
        for t in targets
    ]
    return table(header, rows)


def write(path: Path, data: bytes | str) -> Path:
    """Write `path` through a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return tmp.replace(path)


def write_json(path: Path, record: object) -> Path:
    """`record` (msgspec-encodable) as indented JSON."""
    return write(path, msgspec.json.format(msgspec.json.encode(record), indent=2) + b"\n")
