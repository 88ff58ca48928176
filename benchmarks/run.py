"""What a trainer waits for: a load and then every weight read, a first forward pass or a
first training step, on one clock, for `wmtp.load` against floors (bytes + the work's own
compute), the idiom a user would write, the loader it replaces and `from_pretrained`; memory,
import time and lines.

`python -m benchmarks.run` (full) or `--quick` (CI). Prints Markdown and writes
`benchmarks/results/<full|quick>.{json,md,png}`; exits 1 when a target fails (past its goal
widened by `harness.NOISE`, or not measured), a method fails, a loaded model has wrong weights,
or a first training step's loss differs from the reference method's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import itertools
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, NamedTuple

import msgspec

from benchmarks import harness, lines
from benchmarks.harness import MIB, REPO, Target, median, progress, ratio, target
from benchmarks.methods import METHODS, PREADS, After, Cache, Job, Sample
from benchmarks.models import SPECS, Model, ensure_model

QUICK: Final = ("198m", "hf-small")
FULL: Final = ("small", "198m", "198m-sharded", "1b", "hf-distilgpt2")
E2E_MODEL: Final = "198m"
METRICS: Final[tuple[After, ...]] = ("read", "forward", "step")
TRAIN: Final[tuple[After, ...]] = ("forward", "step")
FORWARD: Final[tuple[After, ...]] = ("forward",)
STEP: Final[tuple[After, ...]] = ("step",)
BOTH: Final[tuple[Cache, ...]] = ("warm", "cold")


class Plan(NamedTuple):
    """The jobs of one method on one family of models: each `after` in each cache mode."""

    family: str
    method: str
    afters: tuple[After, ...]
    caches: tuple[Cache, ...]
    needs: str = ""  # a module the method needs: full runs only, when it is installed


PLANS: Final = (
    Plan("mtp", "pread8", ("none",), ("cold",)),
    Plan("mtp", "pread2", ("none",), ("cold",)),
    Plan("mtp", "mmap", ("none",), ("warm",)),
    Plan("mtp", "resident", METRICS, ("warm",)),
    Plan("mtp", "wmtp", METRICS, BOTH),
    Plan("mtp", "idiom", METRICS, BOTH),
    Plan("mtp", "wmtp-train", ("step",), BOTH),
    Plan("mtp", "wmtp-bf16", TRAIN, BOTH),
    Plan("mtp", "idiom-bf16", TRAIN, BOTH),
    Plan("mtp", "old", TRAIN, ("warm",)),
    Plan("mtp", "runai", TRAIN, BOTH, needs="runai_model_streamer"),
    Plan("mtp", "wmtp", ("forward",), ("e2e",)),
    Plan("mtp", "old", ("forward",), ("e2e",)),
    Plan("hf", "wmtp", TRAIN, BOTH),
    Plan("hf", "hf", TRAIN, BOTH),
    Plan("hf", "idiom", TRAIN, BOTH),
)
# Quick runs (CI) keep these jobs per family: a first forward cold and warm, a first step
# warm, what their targets divide by, and the jobs of the memory targets (with bf16's ratio).
# E2e jobs run where `--e2e` asks (full runs: on E2E_MODEL).
QUICK_JOBS: Final = {
    "mtp": frozenset(
        (
            "pread8 cold",
            "pread2 cold",
            "mmap warm",
            *(f"resident {a} warm" for a in TRAIN),
            *(f"{m} forward {c}" for m in ("wmtp", "idiom") for c in BOTH),
            *(f"{m} step warm" for m in ("wmtp", "wmtp-train", "idiom")),
            "wmtp read warm",
            *(f"{m} forward warm" for m in ("wmtp-bf16", "idiom-bf16")),
        )
    ),
    "hf": frozenset(f"{m} {a} warm" for m in ("wmtp", "hf", "idiom") for a in TRAIN),
}
LABELS: Final = {
    "pread8": "cold reader: 8 threads of preadv, 16 MiB chunks, buffers made before the clock",
    "pread2": "cold reader: 2 threads of preadv, 64 MiB chunks, buffers made before the clock",
    "pread": "bytes floor, cold: the faster cold reader's median",
    "mmap": "bytes floor, warm: mmap, touch every page",
    "floor": "**floor**: bytes floor + resident compute",
    "resident": "resident: weights cloned into anonymous memory before the clock",
    "wmtp": "wmtp.load",
    "wmtp-train": "wmtp.load train=True: pages copied private up front",
    "wmtp-bf16": "wmtp.load dtype=bf16",
    "idiom": "idiom: meta build, load_file, load_state_dict(assign=True), re-tie",
    "idiom-bf16": "idiom, then model.to(bfloat16)",
    "runai": "idiom with the Run:ai Model Streamer",
    "old": "old method: random init, load_file, load_state_dict",
    "hf": "from_pretrained",
}
BYTES_FLOOR: Final = {"warm": "mmap warm", "cold": "pread cold"}
IDIOM: Final = {"wmtp-bf16": "idiom-bf16", "idiom-bf16": "idiom-bf16"}  # else "idiom"
# Whose first-step loss the others on the same model and dtype must equal: the first present.
REFERENCE: Final = ("resident", "idiom", "idiom-bf16")


class Ratio(NamedTuple):
    """A timed target: one job's median total over the sum of others' (a floor: bytes floor +
    resident compute), for each after and cache listed ({after} and {cache} in the names)."""

    family: str
    numerator: str
    denominator: tuple[str, ...]
    goal: float
    afters: tuple[After, ...] = TRAIN
    caches: tuple[Cache, ...] = ("warm",)
    at_least: bool = False


# A first step is timed for `wmtp.load(train=True)`, what a trainer on the CPU calls (README).
RATIOS: Final = (
    Ratio("mtp", "wmtp forward {cache}", ("idiom forward {cache}",), 1.0, FORWARD, BOTH),
    Ratio("mtp", "wmtp-train step {cache}", ("idiom step {cache}",), 1.0, STEP, BOTH),
    Ratio("mtp", "wmtp forward cold", ("pread cold", "resident forward warm"), 1.15, FORWARD),
    Ratio("mtp", "wmtp-train step cold", ("pread cold", "resident step warm"), 1.15, STEP),
    Ratio("mtp", "wmtp-bf16 {after} {cache}", ("idiom-bf16 {after} {cache}",), 1.0, caches=BOTH),
    Ratio("mtp", "old forward warm", ("wmtp forward warm",), 3.0, at_least=True),
    Ratio("mtp", "old step warm", ("wmtp-train step warm",), 1.0, at_least=True),
    Ratio("hf", "wmtp {after} {cache}", ("hf {after} {cache}",), 1.05, caches=BOTH),
)
MEMORY_JOBS: Final = ("wmtp read", "wmtp-bf16 forward")  # added RSS <= model + 300 MiB
NOTES: Final = """\
- Median of {runs} runs per job, in rounds: by metric and cache, each group after an untimed
  sample of one of its jobs, its jobs in a new random order (`rounds`). Each run is a fresh
  process forked from a server that imported torch, transformers (GPT-2), safetensors and wmtp
  before any clock; e2e rows are a fresh `python` timed from spawn, imports included.
- One clock per sample: the load, then its metric: *read* (every weight summed), *forward*
  (one forward pass, 16 tokens, eval mode, no grad) or *step* (a first training step: AdamW
  made, forward with labels, backward, `step()`, which writes every weight). *load s*, until
  the load returned, is information only: no target uses it.
- After the clock every tensor is compared with the files; after a step, whose weights
  changed, its loss is compared with the reference's (resident, else the idiom) bitwise.
- Warm: the files in the page cache. Cold: evicted just before the clock (`posix_fadvise`
  DONTNEED, checked with `mincore`). *resident*: the idiom's weights cloned into anonymous
  memory before the clock, only the metric timed: the work's own compute. *floor*: the bytes
  floor (warm: mmap and touch every page; cold: 8-thread preadv) plus that compute.
- x idiom: against the idiom (bf16 rows: idiom then `.to(bfloat16)`), same metric and cache.
  added RSS: peak RSS (VmHWM) minus RSS when the clock started."""


class Row(msgspec.Struct, frozen=True):
    """Medians of one job on one model over the runs with the right weights."""

    model: str
    job: str
    method: str
    after: str
    cache: str
    dtype: str
    label: str
    runs: int
    load_s: float | None  # until the load returned (0 where it ran before the clock)
    total_s: float | None  # load + after, one clock (e2e: from spawn)
    rss_peak_mib: float | None
    rss_added_mib: float | None
    cached_after_evict: float | None  # the most of any run, for cold jobs
    losses: list[float]  # a step's loss, per run
    totals_s: list[float | None]  # per round; None where the sample failed
    problems: list[str]


class Record(msgspec.Struct, frozen=True):
    """Everything one run measured, as written to `results/<mode>.json`."""

    mode: str
    created: str
    command: str
    machine: str
    runs: int
    noise: float
    models: list[Model]
    rows: list[Row]
    import_s: dict[str, float | None]  # bare interpreter, with `import wmtp`, the difference
    targets: list[Target]
    lines: list[lines.LineCount]
    failures: list[str]


def job_name(method: str, after: str, cache: str) -> str:
    """'METHOD [AFTER] CACHE': a floor has no after."""
    return " ".join(word for word in (method, after, cache) if word != "none")


def plan(model: Model, quick: bool, e2e: bool) -> dict[str, Job]:
    """The jobs measured on a model, by name, in `PLANS` order."""
    jobs = {}
    for p in PLANS:
        wanted = p.family == model.spec.family
        if p.needs:  # full runs only, when installed
            wanted = wanted and not quick and importlib.util.find_spec(p.needs) is not None
        for after, cache in itertools.product(p.afters, p.caches) if wanted else ():
            name = job_name(p.method, after, cache)
            if {"e2e": e2e}.get(cache, not quick or name in QUICK_JOBS[p.family]):
                jobs[name] = Job(p.method, model.folder, after, cache)
    return jobs


def end_to_end(job: Job) -> Sample:
    """One job in a fresh `python`, timed from spawn: imports count."""
    start, code = time.time(), msgspec.json.encode(job).decode()
    command, env = [sys.executable, "-m", "benchmarks.methods", code], harness.child_env()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True)
    if done.returncode:
        return Sample(problems=[f"exit {done.returncode}: {done.stderr.decode()[-300:]}"])
    sample = msgspec.json.decode(done.stdout, type=Sample)
    return msgspec.structs.replace(sample, load_s=sample.wall_end - start, after_s=0.0)


def ask(server: subprocess.Popen[bytes], job: Job) -> Sample:
    """One job in a child forked by the measuring server (`methods.serve`)."""
    if job.cache == "e2e":
        return end_to_end(job)
    assert server.stdin is not None and server.stdout is not None  # opened as pipes
    try:
        server.stdin.write(msgspec.json.encode(job) + b"\n")
        server.stdin.flush()
        line = server.stdout.readline()
    except BrokenPipeError:
        line = b""
    return msgspec.json.decode(line, type=Sample) if line else Sample(problems=["server died"])


def warm(folder: Path) -> None:
    """Read every file of the folder, so that warm jobs find it all in the page cache."""
    for path in filter(Path.is_file, folder.iterdir()):
        with path.open("rb", buffering=0) as f:
            while f.read(64 * MIB):
                pass


def run_job(server: subprocess.Popen[bytes], model: Model, name: str, job: Job) -> Sample:
    """One sample of one job, with a progress line."""
    sample = ask(server, job)
    if job.cache == "cold":
        warm(Path(model.folder))  # a cold job that failed half way left it partly cold
    shown = sample.problems[0] if sample.problems else f"{sample.load_s + sample.after_s:.3f} s"
    progress(f"{model.spec.name}: {name}: {shown}")
    return sample


def rounds(
    run: Mapping[str, Callable[[], Sample]], jobs: Mapping[str, Job], runs: int
) -> dict[str, list[Sample]]:
    """`runs` samples of every job, round by round, in groups of one metric and cache; each
    group after an untimed sample of one of its jobs, its jobs in a new random order.

    A sample runs faster right after one like it (a first step on the 198M model: 2.0-2.3 s
    right after another, 3.0-3.2 s after 8 s idle, on the 2-core machine). Rotating a fixed
    order (`harness.interleave`) keeps each job behind the same neighbour, a bias that no
    spread across runs shows; here every timed sample follows one of its own kind.
    """
    out: dict[str, list[Sample]] = {name: [] for name in run}
    groups: dict[tuple[str, str], list[str]] = {}
    for name, job in jobs.items():
        groups.setdefault((job.after, job.cache), []).append(name)
    for _ in range(runs):
        for (after, cache), names in groups.items():
            order = random.sample(names, len(names))
            progress(f"untimed, so that every {after} {cache} sample follows one like it:")
            run[order[0]]()
            for name in order:
                out[name].append(run[name]())
    return out


def summarise(model: Model, name: str, job: Job, samples: Sequence[Sample]) -> Row:
    """The row of one job."""
    good = [s for s in samples if not s.problems]
    cached = [s.cached for s in samples if s.cached is not None]
    return Row(
        model=model.spec.name,
        job=name,
        method=job.method,
        after=job.after,
        cache=job.cache,
        dtype=METHODS[job.method].dtype or "float32",
        label=LABELS[job.method],
        runs=len(good),
        load_s=median(s.load_s for s in good) if METHODS[job.method].clocked else None,
        total_s=median(s.load_s + s.after_s for s in good),
        rss_peak_mib=median(s.rss_peak_mib for s in good),
        rss_added_mib=median(s.rss_peak_mib - s.rss_start_mib for s in good),
        cached_after_evict=max(cached, default=None),
        losses=[s.loss for s in good if s.loss is not None],
        totals_s=[None if s.problems else s.load_s + s.after_s for s in samples],
        problems=sorted({p for s in samples for p in s.problems})[:5],
    )


def total(rows: Mapping[str, Row], names: Sequence[str]) -> float | None:
    """The sum of the jobs' median totals; None when one is unknown."""
    values = [rows[name].total_s for name in names]
    return None if None in values else sum(v for v in values if v is not None)


def ratio_targets(model: Model, rows: Mapping[str, Row]) -> list[Target]:
    """The timed targets (`RATIOS`) whose jobs were all planned on the model, named by them."""
    out = {}
    for r in (r for r in RATIOS if r.family == model.spec.family):
        for after, cache in itertools.product(r.afters, r.caches):
            top, *bottom = (
                n.format(after=after, cache=cache) for n in (r.numerator, *r.denominator)
            )
            if top in rows and all(name in rows for name in bottom):
                under = " + ".join(bottom)
                what = f"{top} / ({under})" if len(bottom) > 1 else f"{top} / {under}"
                value = ratio(rows[top].total_s, total(rows, bottom))
                out[what] = target(model.spec.name, what, value, r.goal, at_least=r.at_least)
    return list(out.values())


def model_targets(model: Model, rows: Mapping[str, Row]) -> list[Target]:
    """The targets that apply to what was measured on the model."""
    name, out = model.spec.name, ratio_targets(model, rows)
    allowed = model.weight_bytes / MIB + 300
    for row in rows.values():
        if f"{row.method} {row.after}" in MEMORY_JOBS and row.cache != "e2e":
            # Peak RSS counts pages, which a busy machine does not add: the 300 MiB in the goal
            # is the only slack, no NOISE margin.
            what = f"RSS added by {row.job} (MiB) <= model + 300 MiB"
            out.append(target(name, what, row.rss_added_mib, allowed, allowed))
    cold = [r.cached_after_evict for r in rows.values() if r.cache == "cold"]
    if cold:  # not measured when every cold job failed before its clock
        # A goal of 0 widens to 0: any page still cached makes a cold row partly warm.
        most = max((c for c in cold if c is not None), default=None)
        out.append(target(name, "share of weight pages cached after eviction", most, 0))
    return out


def loss_problems(rows: Sequence[Row]) -> list[str]:
    """First-step losses that are not bitwise the reference's (`REFERENCE`) on the same model
    and dtype: the same weights must give the same loss whichever way they were loaded."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if row.losses:
            groups.setdefault((row.model, row.dtype), []).append(row)
    rank, out = {method: i for i, method in enumerate(REFERENCE)}, []
    for group in groups.values():
        reference = min(group, key=lambda r: rank.get(r.method, len(rank)))
        want = reference.losses[0]
        for row in group:
            if any(loss != want for loss in row.losses):
                got = sorted(set(row.losses))
                out.append(
                    f"{row.model}: {row.job}: first-step loss {got} != {reference.job}'s {want!r}"
                )
    return out


def import_wmtp_s(runs: int) -> tuple[float | None, float | None]:
    """Median seconds of `python -c pass` and of `python -c "import wmtp"`, from spawn to exit."""

    def interpreter(code: str) -> float | None:
        start, env = time.perf_counter(), harness.child_env()
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True)
        return None if done.returncode else time.perf_counter() - start

    codes = ("pass", "import wmtp")
    got = harness.interleave({code: functools.partial(interpreter, code) for code in codes}, runs)
    return median(got["pass"]), None if None in got["import wmtp"] else median(got["import wmtp"])


def results_table(model: Model, rows: Sequence[Row]) -> str:
    """One model's jobs: the bytes floors, then by metric and cache the floor and each method:
    load and total medians, x idiom and x floor, memory."""
    by = {r.job: r for r in rows}

    def seconds(row: Row | None) -> float | None:
        return row.total_s if row else None

    def line(r: Row, idiom: Row | None, floor: float | None) -> list[object]:
        what = r.label + (f" (**{r.problems[0]}**)" if r.problems else "")
        over = [ratio(r.total_s, seconds(idiom)), ratio(r.total_s, floor)]
        memory = [r.rss_peak_mib, r.rss_added_mib, r.runs]
        return [r.after.replace("none", "-"), r.cache, what, r.load_s, r.total_s, *over, *memory]

    out = [line(r, None, None) for r in rows if r.after == "none"]
    groups = dict.fromkeys((r.after, r.cache) for r in rows if r.after != "none")
    for after, cache in sorted(groups, key=lambda g: (METRICS.index(g[0]), g[1] != "warm")):
        names = (BYTES_FLOOR.get(cache, ""), job_name("resident", after, "warm"))
        floor = total(by, names) if all(n in by for n in names) else None
        if floor is not None:
            over = ratio(floor, seconds(by.get(job_name("idiom", after, cache))))
            out.append([after, cache, LABELS["floor"], None, floor, over, 1.0, None, None, None])
        for r in (r for r in rows if (r.after, r.cache) == (after, cache)):
            peer = by.get(job_name(IDIOM.get(r.method, "idiom"), after, cache))
            out.append(line(r, peer, floor if r.dtype == "float32" else None))
    header = ["metric", "cache", "method", "load s", "total s", "x idiom", "x floor"]
    size = f"### {model.spec.name} ({model.weight_bytes / MIB:,.0f} MiB)"
    return size + "\n\n" + harness.table([*header, "peak RSS MiB", "added RSS MiB", "runs"], out, 3)


def chart(models: Sequence[Model], rows: Sequence[Row], path: Path) -> Path:
    """First-forward medians (load + forward) against weight size, per method and cache, on
    the single-file MTP models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = {m.spec.name: m.weight_bytes / MIB for m in models if m.spec.family == "mtp"}
    fig, ax = plt.subplots(figsize=(9, 6))
    for job in dict.fromkeys(r.job for r in rows if r.after == "forward" and r.cache != "e2e"):
        mine = [r for r in rows if r.job == job and r.total_s and r.model in size]
        points = sorted((size[r.model], r.total_s) for r in mine if not SPECS[r.model].shard_mib)
        if points:
            style = "--" if job.endswith("cold") else "-"
            ax.plot(*zip(*points, strict=True), marker="o", linestyle=style, label=job)
    ax.set(xscale="log", yscale="log", xlabel="weights, MiB", ylabel="median s, load + forward")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:  # a run of HF models only plots nothing
        ax.legend(fontsize=8)
    fig.savefig(path.with_suffix(".tmp"), format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.with_suffix(".tmp").replace(path)


def markdown(record: Record, lines_table: str) -> str:
    """The report: notes, results per model, import time, targets, lines, failures."""
    imports = {k: harness.fmt(v) for k, v in record.import_s.items()}
    parts = [
        f"## wmtp load benchmark ({record.mode}, {record.created})",
        f"`{record.command}` on {record.machine}",
        NOTES.format(runs=record.runs),
        *(
            results_table(m, [r for r in record.rows if r.model == m.spec.name])
            for m in record.models
        ),
        f"`import wmtp`: {imports['wmtp']} s, a bare interpreter {imports['bare']} s: "
        f"adds {imports['adds']} s.",
        f"### Targets\n\nA timed target fails past its goal widened by NOISE = {record.noise:.0%} "
        "(within noise: missed, not failed); memory, eviction and lines have their own limit.\n\n"
        + harness.targets_table(record.targets),
        "### Lines\n\n" + lines_table,
    ]
    if record.failures:
        parts.append("### Failures\n\n" + "\n".join(f"- {f}" for f in record.failures))
    return "\n\n".join(parts) + "\n"


def fastest_reader(rows: Sequence[Row]) -> list[Row]:
    """The cold bytes floor: a row `pread cold`, the cold reader row with the least median."""
    readers = [r for r in rows if r.method in PREADS and r.total_s is not None]
    if not readers:
        return []
    best = min(readers, key=lambda r: r.total_s or 0.0)
    what = f"{LABELS['pread']} ({best.method})"
    return [msgspec.structs.replace(best, job="pread cold", method="pread", label=what)]


def measure(
    args: argparse.Namespace, sizes: Sequence[str], runs: int
) -> tuple[list[Model], list[Row]]:
    """Generate the models and measure their jobs, in children of one measuring server."""
    e2e = not args.quick if args.e2e is None else args.e2e
    root = args.workdir or Path(tempfile.mkdtemp(prefix="wmtp-bench-"))
    command, pipe = [sys.executable, "-m", "benchmarks.methods", "serve"], subprocess.PIPE
    server = subprocess.Popen(command, cwd=REPO, env=harness.child_env(), stdin=pipe, stdout=pipe)
    models, rows = [], []
    try:
        for name in sizes:
            models.append(model := ensure_model(SPECS[name], root))
            progress(f"model {name}: {model.weight_bytes / MIB:,.0f} MiB in {model.folder}")
            jobs = plan(model, args.quick, e2e and name == E2E_MODEL)
            warm(Path(model.folder))
            run = {k: functools.partial(run_job, server, model, k, job) for k, job in jobs.items()}
            samples = rounds(run, jobs, runs)
            mine = [summarise(model, k, job, samples[k]) for k, job in jobs.items()]
            rows += mine + fastest_reader(mine)
    finally:
        assert server.stdin is not None  # opened as a pipe
        with contextlib.suppress(BrokenPipeError):
            server.stdin.close()  # the server exits at the end of its input
        server.wait()
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return models, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when no target fails, no method fails and every check holds."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"CI: {', '.join(QUICK)}, 3 runs")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SPECS), metavar="NAME")
    parser.add_argument("--runs", type=int, help="runs per job (default 5, quick 3)")
    parser.add_argument("--e2e", action=argparse.BooleanOptionalAction, help="end-to-end rows")
    parser.add_argument("--workdir", type=Path, help="keep generated models here, reuse them")
    parser.add_argument("--out", type=Path, default=harness.RESULTS, help="results folder")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    mode, runs = "quick" if args.quick else "full", args.runs or (3 if args.quick else 5)
    models, rows = measure(args, args.sizes or (QUICK if args.quick else FULL), runs)
    bare, wmtp = import_wmtp_s(max(runs, 5))
    adds = None if bare is None or wmtp is None else wmtp - bare
    try:
        core, others = lines.counts()
    except RuntimeError as e:  # wmtp does not import or load: reported as not measured
        progress(str(e))
        core, others = [], []
    by_model = {m.spec.name: {r.job: r for r in rows if r.model == m.spec.name} for m in models}
    found = [t for m in models for t in model_targets(m, by_model[m.spec.name])]
    found.append(target("-", "import wmtp over bare python (s)", adds, 0.15))
    core_lines = lines.total("core", core).lines if core else None
    # A count: nothing makes it noisy, so no margin.
    found.append(
        target("-", "lines of the loading core", core_lines, lines.CORE_LIMIT, lines.CORE_LIMIT)
    )
    failures = harness.failed(found) + loss_problems(rows)
    failures += [f"{r.model}: {r.job}: {r.problems[0]}" for r in rows if r.problems]
    packages = ("torch", "transformers", "safetensors")
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)
    record = Record(
        mode=mode,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=" ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)]),
        machine=f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {versions}",
        runs=runs,
        noise=harness.NOISE,
        models=models,
        rows=rows,
        import_s={"bare": bare, "wmtp": wmtp, "adds": adds},
        targets=found,
        lines=core + others,
        failures=failures,
    )
    text = markdown(record, lines.markdown(core, others))
    print(text)
    harness.write_json(args.out / f"{mode}.json", record)
    harness.write(args.out / f"{mode}.md", text)
    chart(models, rows, args.out / f"{mode}.png")
    progress(f"wrote {args.out}/{mode}.{{json,md,png}}; {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
