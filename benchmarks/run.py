"""Load time, memory and lines of `wmtp.load` against floors and other ways to load a model.

`python -m benchmarks.run` (full) or `--quick` (CI). Prints Markdown and writes
`benchmarks/results/<full|quick>.{json,md,png}`; exits 1 when a target is missed past its
limit, a method fails, or a loaded model has wrong weights.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, cast

import msgspec

from benchmarks import harness, lines
from benchmarks.harness import MIB, REPO, Target, median, progress, ratio, target
from benchmarks.methods import Job, Mode, Sample
from benchmarks.models import SPECS, Model, Spec, ensure_model

QUICK: Final = ("small", "hf-small")
FULL: Final = ("small", "198m", "198m-sharded", "1b", "hf-distilgpt2")
MTP_JOBS: Final = ("read", "mmap", "pread8", "wmtp", "wmtp-bf16", "idiom", "old")
COLD_JOBS: Final = ("pread8 cold", "wmtp cold", "idiom cold")
HF_QUICK: Final = ("read", "mmap", "wmtp", "hf")
HF_FULL: Final = (*HF_QUICK, "idiom", "old", "wmtp forward", "hf forward")
LABELS: Final = {
    "read": "floor: read the files into a buffer",
    "mmap": "floor: mmap, touch every page",
    "pread8": "floor: 8-thread pread, 16 MiB chunks",
    "wmtp": "wmtp.load",
    "wmtp-bf16": "wmtp.load dtype=bf16",
    "idiom": "idiom: meta build, load_file, load_state_dict(assign=True), re-tie",
    "runai": "idiom with the Run:ai Model Streamer",
    "old": "old method: random init, load_file, load_state_dict",
    "hf": "from_pretrained",
}
FLOORS: Final = {"": "read", "forward": "read", "cold": "pread8 cold"}
SUFFIX: Final = {"": "", "cold": ", cold cache", "forward": " + first forward", "e2e": ", e2e"}
# Median ratios: (name, numerator, denominator, goal, limit); 'JOB' is until materialised,
# 'JOB returns' until the call returned; a limit under the goal makes it an at-least target.
RATIOS: Final = (
    ("materialised wmtp.load / read floor", "wmtp", "read", 1.25, 2.5),
    ("old method / materialised wmtp.load", "old", "wmtp", 3.0, 1.5),
    ("wmtp.load until it returns / old method", "wmtp returns", "old", 0.1, 0.2),
    ("materialised wmtp.load / idiom", "wmtp", "idiom", 1.0, 2.0),
    ("cold: materialised wmtp.load / idiom", "wmtp cold", "idiom cold", 1.0, 2.0),
    ("cold: materialised wmtp.load / 8-thread pread", "wmtp cold", "pread8 cold", 1.15, 2.3),
    ("wmtp.load / from_pretrained, materialised", "wmtp", "hf", 1.05, 1.5),
    ("wmtp.load / from_pretrained, until return", "wmtp returns", "hf returns", 1.05, 1.5),
    ("wmtp.load / from_pretrained, first forward", "wmtp forward", "hf forward", 1.05, 1.5),
)
NOTES: Final = """\
- Median of {runs} runs per job, jobs interleaved (the order rotating). Each run is a fresh
  process forked from a server that imported torch, transformers (GPT-2), safetensors and wmtp
  before any clock; e2e rows are a fresh `python` timed from spawn, imports included.
- returns: until the call returned; materialised: until one element per 4 KiB page of every
  weight was read as well. Every tensor is compared with the files after the clock stops.
- Warm: the files in the page cache. Cold: evicted just before the clock (`posix_fadvise`
  DONTNEED, checked with `mincore`). x floor: warm rows against the read floor, cold rows
  against cold 8-thread pread. added RSS: peak RSS (VmHWM) minus RSS when the clock started."""


class Row(msgspec.Struct, frozen=True):
    """Medians of one job on one model over the runs with the right weights."""

    model: str
    job: str
    label: str
    runs: int
    returns_s: float | None
    total_s: float | None  # until materialised (or the first forward pass, or end to end)
    rss_peak_mib: float | None
    rss_added_mib: float | None
    cached_after_evict: float | None  # the most of any run, for cold jobs
    times_s: list[float]
    problems: list[str]


class Record(msgspec.Struct, frozen=True):
    """Everything one run measured, as written to `results/<mode>.json`."""

    mode: str
    created: str
    command: str
    machine: str
    runs: int
    models: list[Model]
    rows: list[Row]
    import_s: dict[str, float | None]  # bare interpreter, with `import wmtp`, the difference
    targets: list[Target]
    lines: list[lines.LineCount]
    failures: list[str]


def plan(spec: Spec, quick: bool, e2e: bool) -> list[str]:
    """The jobs measured on a model: 'METHOD' or 'METHOD MODE'."""
    if spec.family == "hf":
        return list(HF_QUICK if quick else HF_FULL)
    runai = not quick and importlib.util.find_spec("runai_model_streamer") is not None
    return [
        *MTP_JOBS,
        *COLD_JOBS,
        *(["runai", "runai cold"] if runai else []),
        *(["wmtp e2e", "old e2e"] if e2e else []),
    ]


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
    if job.mode == "e2e":
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


def run_job(server: subprocess.Popen[bytes], model: Model, key: str) -> Sample:
    """One sample of one job, with a progress line."""
    method, _, mode = key.partition(" ")
    sample = ask(server, Job(method, model.folder, cast(Mode, mode or "warm")))
    if mode == "cold":
        warm(Path(model.folder))  # a cold job that failed half way left it partly cold
    shown = sample.problems[0] if sample.problems else f"{sample.load_s + sample.after_s:.3f} s"
    progress(f"{model.spec.name}: {key}: {shown}")
    return sample


def summarise(model: Model, key: str, samples: Sequence[Sample]) -> Row:
    """The row of one job."""
    method, _, mode = key.partition(" ")
    good = [s for s in samples if not s.problems]
    totals = [s.load_s + s.after_s for s in good]
    cached = [s.resident for s in samples if s.resident is not None]
    return Row(
        model=model.spec.name,
        job=key,
        label=LABELS[method] + SUFFIX[mode],
        runs=len(good),
        returns_s=None if mode == "e2e" else median(s.load_s for s in good),
        total_s=median(totals),
        rss_peak_mib=median(s.rss_peak_mib for s in good),
        rss_added_mib=median(s.rss_peak_mib - s.rss_start_mib for s in good),
        cached_after_evict=max(cached, default=None),
        times_s=totals,
        problems=sorted({p for s in samples for p in s.problems})[:5],
    )


def model_targets(model: Model, rows: dict[str, Row]) -> list[Target]:
    """The targets that apply to what was measured on the model."""

    def seconds(key: str) -> float | None:
        row = rows[key.removesuffix(" returns")]
        return row.returns_s if key.endswith(" returns") else row.total_s

    name, out = model.spec.name, []
    for what, a, b, goal, limit in RATIOS:
        if a.removesuffix(" returns") in rows and b.removesuffix(" returns") in rows:
            out.append(target(name, what, ratio(seconds(a), seconds(b)), goal, limit))
    allowed = model.weight_bytes / MIB + 300
    for job in ("wmtp", "wmtp-bf16"):
        if job in rows:
            what = f"RSS added by {job} + touch (MiB) <= model + 300 MiB"
            out.append(target(name, what, rows[job].rss_added_mib, allowed, 1.25 * allowed))
    cold = [r.cached_after_evict for r in rows.values() if r.job.endswith(" cold")]
    if cold:  # not measured when every cold job failed before its clock
        most = max((c for c in cold if c is not None), default=None)
        out.append(target(name, "share of weight pages cached after eviction", most, 0, 0.05))
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


def results_table(models: Sequence[Model], rows: Sequence[Row]) -> str:
    """Per model and job: medians, ratios to the floor, the idiom and the old method, memory."""
    by = {(r.model, r.job): r.total_s for r in rows}
    size = {m.spec.name: f"{m.spec.name} ({m.weight_bytes / MIB:,.0f} MiB)" for m in models}
    out = []
    for r in rows:
        mode = r.job.partition(" ")[2]
        # Against the same mode of the idiom and the old method: cold with cold, e2e with e2e.
        others = (FLOORS.get(mode, ""), f"idiom {mode}".strip(), f"old {mode}".strip())
        ratios = [ratio(r.total_s, by.get((r.model, other))) for other in others]
        memory = [r.rss_peak_mib, r.rss_added_mib, r.runs]
        what = r.label + (f" (**{r.problems[0]}**)" if r.problems else "")
        out.append([size[r.model], what, r.returns_s, r.total_s, *ratios, *memory])
    header = ["model", "method", "returns s", "materialised s", "x floor", "x idiom", "x old"]
    return harness.table([*header, "peak RSS MiB", "added RSS MiB", "runs"], out)


def chart(models: Sequence[Model], rows: Sequence[Row], path: Path) -> Path:
    """Materialised medians against weight size, per job, on the single-file MTP models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = {m.spec.name: m.weight_bytes / MIB for m in models if m.spec.family == "mtp"}
    fig, ax = plt.subplots(figsize=(9, 6))
    for job in dict.fromkeys(r.job for r in rows if not r.job.endswith("e2e")):
        mine = [r for r in rows if r.job == job and r.total_s and r.model in size]
        points = sorted((size[r.model], r.total_s) for r in mine if not SPECS[r.model].shard_mib)
        if points:
            style = "--" if "cold" in job else "-"
            ax.plot(*zip(*points, strict=True), marker="o", linestyle=style, label=job)
    ax.set(xscale="log", yscale="log", xlabel="weights, MiB", ylabel="median s, materialised")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path.with_suffix(".tmp"), format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.with_suffix(".tmp").replace(path)


def markdown(record: Record, lines_table: str) -> str:
    """The report: notes, results, import time, targets, lines, failures."""
    imports = {k: harness.fmt(v) for k, v in record.import_s.items()}
    parts = [
        f"## wmtp load benchmark ({record.mode}, {record.created})",
        f"`{record.command}` on {record.machine}",
        NOTES.format(runs=record.runs),
        results_table(record.models, record.rows),
        f"`import wmtp`: {imports['wmtp']} s, a bare interpreter {imports['bare']} s: "
        f"adds {imports['adds']} s.",
        "### Targets\n\n" + harness.targets_table(record.targets),
        "### Lines\n\n" + lines_table,
    ]
    if record.failures:
        parts.append("### Failures\n\n" + "\n".join(f"- {f}" for f in record.failures))
    return "\n\n".join(parts) + "\n"


def measure(
    args: argparse.Namespace, sizes: Sequence[str], runs: int
) -> tuple[list[Model], list[Row]]:
    """Generate the models and measure their jobs, in children of one measuring server."""
    e2e = not args.quick if args.e2e is None else args.e2e
    e2e_model = next((s for s in ("198m", *sizes) if s in sizes and SPECS[s].family == "mtp"), "")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="wmtp-bench-"))
    command, pipe = [sys.executable, "-m", "benchmarks.methods", "serve"], subprocess.PIPE
    server = subprocess.Popen(command, cwd=REPO, env=harness.child_env(), stdin=pipe, stdout=pipe)
    models, rows = [], []
    try:
        for name in sizes:
            models.append(model := ensure_model(SPECS[name], root))
            progress(f"model {name}: {model.weight_bytes / MIB:,.0f} MiB in {model.folder}")
            jobs = plan(model.spec, args.quick, e2e and name == e2e_model)
            warm(Path(model.folder))
            run = {key: functools.partial(run_job, server, model, key) for key in jobs}
            samples = harness.interleave(run, runs)
            rows += [summarise(model, key, samples[key]) for key in jobs]
    finally:
        assert server.stdin is not None  # opened as a pipe
        with contextlib.suppress(BrokenPipeError):
            server.stdin.close()  # the server exits at the end of its input
        server.wait()
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return models, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every target holds within its limit."""
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
    found.append(target("-", "import wmtp over bare python (s)", adds, 0.15, 0.3))
    core_lines = lines.total("core", core).lines if core else None
    found.append(
        target("-", "lines of the loading core", core_lines, lines.CORE_AIM, lines.CORE_LIMIT)
    )
    failures = harness.failed(found)
    failures += [f"{r.model}: {r.label}: {r.problems[0]}" for r in rows if r.problems]
    packages = ("torch", "transformers", "safetensors")
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)
    record = Record(
        mode=mode,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=" ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)]),
        machine=f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {versions}",
        runs=runs,
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
