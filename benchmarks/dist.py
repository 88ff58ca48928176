"""Multi-rank loading: `wmtp.load(parallelize=)` against loading then sharding, and against
torch's broadcast from rank 0; 2 ranks under torchrun on 127.0.0.1, gloo, CPU, FSDP2.

`python -m benchmarks.dist [--quick] [--runs N] [--out PATH]`. Each sample is a fresh
torchrun. Writes `PATH.{md,json}` (default results/dist, quick results/dist-quick); exits 1
when a target is missed past its limit or a rank holds a wrong shard.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from benchmarks import harness
from benchmarks.harness import MIB, REPO, Target, median, progress, ratio, target
from benchmarks.models import SPECS, Model, ensure_model

if TYPE_CHECKING:
    import torch

WORLD: Final = 2
BLOCKS: Final = ("GPT2Block", "LlamaDecoderLayer")
SLACK_MIB: Final = 64  # private memory per rank allowed beyond model / world
LABELS: Final = {
    "a": "a: wmtp.load(parallelize=fsdp2)",
    "b": "b: wmtp.load, then fully_shard",
    "c": "c: rank 0 load_file; meta, fully_shard, to_empty; set_model_state_dict(broadcast)",
}
NOTES: Final = """\
Median of {runs} runs, a fresh torchrun each, methods interleaved (the order rotating). FSDP2:
`fully_shard` per block, then the root. wall: each rank from just before the load (imports
done, process group up, a barrier) to a barrier after it has read every element of its own
shards (a map only defers its reads: without them, a lazy load and a copying one would not
share a clock). growth: peak private memory
(`RssAnon`, sampled every 5 ms) minus `RssAnon` at the start; mapped file pages are not
private. After the clock every local shard is compared with the file, and the tie checked."""


class RankSample(msgspec.Struct, frozen=True):
    """What one rank measured in one torchrun."""

    rank: int
    wall_s: float = 0.0
    anon_start_mib: float = 0.0
    anon_peak_mib: float = 0.0
    problems: list[str] = []


class Row(msgspec.Struct, frozen=True):
    """Medians of one method on one rank over the runs with the right shards."""

    method: str
    rank: int
    runs: int
    wall_s: float | None
    growth_mib: float | None
    times_s: list[float]
    problems: list[str]


def fsdp2(model: torch.nn.Module) -> None:
    """The user's parallelism: `fully_shard` each transformer block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__ in BLOCKS:
            fully_shard(module)
    fully_shard(model)


def wmtp_load(folder: Path, parallel: bool) -> torch.nn.Module:
    """(a) each rank fills its own shards from the mapped checkpoint; (b) the whole model in
    every rank, then sharded."""
    import wmtp

    if parallel:
        return wmtp.load(str(folder), parallelize=fsdp2)
    model = wmtp.load(str(folder))
    fsdp2(model)
    return model


def broadcast(folder: Path) -> torch.nn.Module:
    """(c) torch's idiom. The file stores a tied matrix once: rank 0 adds its other names."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from benchmarks.methods import build, load_files

    with torch.device("meta"):
        model = build(folder)
    fsdp2(model)
    model.to_empty(device="cpu")
    full: dict[str, Any] = load_files(folder) if dist.get_rank() == 0 else {}
    full |= {alias: full[name] for alias, name in aliases(folder).items() if name in full}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    return model


METHODS: Final[dict[str, Callable[[Path], torch.nn.Module]]] = {
    "a": functools.partial(wmtp_load, parallel=True),
    "b": functools.partial(wmtp_load, parallel=False),
    "c": broadcast,
}


def read_shards(model: torch.nn.Module) -> None:
    """Read every element of this rank's shards (FSDP2 local shards, or whole tensors)."""
    from torch.distributed.tensor import DTensor

    for tensor in model.state_dict().values():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        float(local.float().sum())


def aliases(folder: Path) -> dict[str, str]:
    """Dropped tied name -> stored name, from the header metadata (`save_model`)."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: v for k, v in (f.metadata() or {}).items() if k != "format"}


def anon_mib() -> float:
    """This process's private resident memory (`RssAnon`), in MiB."""
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if "RssAnon" in s)
    return int(line.split()[1]) / 1024


def check(model: torch.nn.Module, folder: Path, rank: int) -> list[str]:
    """Each local shard (FSDP2: `chunk` on dim 0) against the file; the tie kept."""
    import torch
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    problems, names, trunk = [], aliases(folder), model.get_submodule("base_model")
    if trunk.get_output_embeddings().weight is not trunk.get_input_embeddings().weight:  # type: ignore[operator]
        problems.append("the LM head and the embedding are no longer one parameter")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for key, tensor in model.state_dict().items():
            want = f.get_tensor(names.get(key, key))
            if isinstance(tensor, DTensor):
                chunks = want.chunk(tensor.device_mesh.size(), dim=0)
                want = chunks[rank] if rank < len(chunks) else want[:0]
                tensor = tensor.to_local()
            if not torch.equal(tensor, want):
                problems.append(f"rank {rank}: {key}: differs from the file")
    return problems[:5]


def worker(method: str, folder: Path, out: Path) -> None:
    """One rank of one sample (under torchrun): time the method, check, write the sample."""
    import torch.distributed as dist
    import torch.distributed.checkpoint.state_dict
    import torch.distributed.fsdp  # noqa: F401

    from benchmarks.methods import import_libraries

    import_libraries()
    dist.init_process_group("gloo")
    rank, peak, done = dist.get_rank(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], anon_mib())

    dist.barrier()
    start = peak[0] = anon_mib()
    threading.Thread(target=sample, daemon=True).start()
    try:
        t0 = time.perf_counter()
        model = METHODS[method](folder)
        read_shards(model)  # one clock for all: a map defers its reads, a copy does not
        dist.barrier()
        wall = time.perf_counter() - t0
        done.set()
        problems = check(model, folder, rank)
        result = RankSample(rank, wall, start, max(peak[0], anon_mib()), problems)
    except Exception as e:  # the error itself in the report, not torchrun's summary
        result = RankSample(rank, problems=[f"rank {rank}: {type(e).__name__}: {e}"[:400]])
    harness.write(out / f"rank{rank}.json", msgspec.json.encode(result))
    dist.destroy_process_group()


def run_sample(method: str, model: Model) -> list[RankSample]:
    """One fresh torchrun of `method`: every rank's sample, or each rank's failure."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))  # a port nobody listens on now, for torchrun to take
        port = free.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="wmtp-dist-") as out:
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}"]
        where = ["--master_addr=127.0.0.1", f"--master_port={port}"]
        me = ["-m", "benchmarks.dist", "--worker", method, model.folder, out]
        env = harness.child_env()
        done = subprocess.run([*torchrun, *where, *me], cwd=REPO, env=env, capture_output=True)
        why = f"exit {done.returncode}: {done.stderr.decode(errors='replace')[-600:]}"
        files = [Path(out) / f"rank{r}.json" for r in range(WORLD)]
        got = [
            msgspec.json.decode(p.read_bytes(), type=RankSample)
            if p.exists()
            else RankSample(r, problems=[why])
            for r, p in enumerate(files)
        ]
    shown = [f"{s.wall_s:.3f} s {s.anon_peak_mib - s.anon_start_mib:,.0f} MiB" for s in got]
    wrong = [p for s in got for p in s.problems]
    progress(f"{method}: {wrong[0] if wrong else ', '.join(shown)}")
    return got


def summarise(method: str, rank: int, samples: Sequence[list[RankSample]]) -> Row:
    """The row of one method on one rank."""
    mine = [s[rank] for s in samples]
    good = [s for s in mine if not s.problems]
    growth = median(s.anon_peak_mib - s.anon_start_mib for s in good)
    times, problems = [s.wall_s for s in good], sorted({p for s in mine for p in s.problems})
    return Row(method, rank, len(good), median(times), growth, times, problems[:3])


def targets(model: Model, rows: Sequence[Row]) -> list[Target]:
    """(a) faster than (b) and (c), slowest rank against slowest; (a)'s growth on any rank."""

    def worst(method: str, field: str) -> float | None:
        values = [getattr(r, field) for r in rows if r.method == method]
        return None if None in values else max(values)

    name, wall_a, goal = model.spec.name, worst("a", "wall_s"), model.weight_bytes / MIB / WORLD
    memory = f"a: RssAnon growth per rank (MiB) <= model / {WORLD} + {SLACK_MIB}"
    # a / b is reported (the table's x b), not a target: b is wmtp too, and on the CPU it does
    # a's work (README); the peer a user would pick instead of wmtp is torch's idiom, c.
    return [
        target(name, "wall a / c", ratio(wall_a, worst("c", "wall_s")), 1.0),
        # Memory keeps its own limit: a machine's load does not move it, NOISE does not apply.
        target(name, memory, worst("a", "growth_mib"), goal + SLACK_MIB, 1.25 * (goal + SLACK_MIB)),
    ]


def markdown(head: str, model: Model, runs: int, rows: list[Row], found: list[Target]) -> str:
    """The report: what was run, the table, the targets, failures."""
    share, by = model.weight_bytes / MIB / WORLD, {(r.method, r.rank): r for r in rows}
    cells = [
        [LABELS[r.method], r.rank, r.wall_s, *(ratio(r.wall_s, by[m, r.rank].wall_s) for m in "bc"),
         r.growth_mib, share, r.runs]
        for r in rows
    ]  # fmt: skip
    header = ["method", "rank", "wall s", "x b", "x c", "RssAnon growth MiB", "model/world MiB"]
    size = f"`{model.spec.name}` ({model.weight_bytes / MIB:,.0f} MiB fp32)"
    parts = [
        f"{head}: model {size}, {WORLD} ranks (torchrun, 127.0.0.1, gloo, CPU).",
        NOTES.format(runs=runs),
        harness.table([*header, "runs"], cells, left=1),
        "### Targets\n\n" + harness.targets_table(found),
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with `--worker`, one rank); 0 when every target holds."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        worker(argv[1], Path(argv[2]), Path(argv[3]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dist", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI: the small model, 2 runs")
    parser.add_argument("--runs", type=int, help="runs per method (default 5, quick 2)")
    parser.add_argument("--workdir", type=Path, help="keep generated models here, reuse them")
    parser.add_argument("--out", type=Path, help="results path, without suffix")
    args = parser.parse_args(argv)
    mode, runs = "quick" if args.quick else "full", args.runs or (2 if args.quick else 5)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="wmtp-bench-"))
    try:
        model = ensure_model(SPECS["small" if args.quick else "198m"], root)
        progress(f"model {model.spec.name}: {model.weight_bytes / MIB:,.0f} MiB, {WORLD} ranks")
        jobs = {m: lambda m=m: run_sample(m, model) for m in METHODS}
        samples = harness.interleave(jobs, runs)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    rows = [summarise(m, r, samples[m]) for m in METHODS for r in range(WORLD)]
    found = targets(model, rows)
    failures = harness.failed(found) + [f"{r.method}: {p}" for r in rows for p in r.problems]
    import torch

    machine = f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, torch {torch.__version__}"
    created, command = time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python -m benchmarks.dist"
    command = " ".join([command, *argv])
    head = f"## Multi-rank load benchmark ({mode}, {created})\n\n`{command}` on {machine}"
    text = markdown(head, model, runs, rows, found)
    if failures:
        text += "\n### Failures\n\n" + "".join(f"- {f}\n" for f in failures)
    print(text)
    record: dict[str, object] = {"mode": mode, "created": created, "command": command}
    record |= {"machine": machine, "model": model, "world": WORLD, "runs": runs, "rows": rows}
    out = args.out or harness.RESULTS / ("dist" if mode == "full" else "dist-quick")
    harness.write_json(out.with_suffix(".json"), record | {"targets": found, "failures": failures})
    harness.write(out.with_suffix(".md"), text)
    progress(f"wrote {out}.{{json,md}}; {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
