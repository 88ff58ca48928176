"""Training checkpoints: `wmtp.save_checkpoint` / `load_checkpoint` against the old trainer's
method and the floor, in 1 process and 2 ranks (torchrun, 127.0.0.1, gloo, CPU, FSDP2), and
through the S3 test server against boto3.

`python -m benchmarks.checkpoint [--quick] [--runs N] [--no-bucket] [--workdir D] [--out PATH]`.

Each sample is a fresh process (a fresh torchrun for 2 ranks) that loads the model (FSDP2
`fully_shard` per block at 2 ranks), takes one AdamW step (so the optimizer has its state), then
times a save and a resume into a fresh model and optimizer, each rank from a barrier to a
barrier, sampling its private memory (`RssAnon`, every 5 ms). Methods, interleaved:

- wmtp: `save_checkpoint` (DCP: every rank its own shards, fsynced) and `load_checkpoint`; also
  the time a `background=True` save blocks the loop.
- old: the replaced trainer: the full state dict gathered to rank 0 (`get_state_dict(
  full_state_dict=True, cpu_offload=True)`), one `torch.save` (then fsync, as wmtp's files
  are); on resume every rank `torch.load`s the file and `set_state_dict(full_state_dict=True)`.
- floor: every rank writes the bytes of its own tensors with 4 threads of `pwrite` and fsyncs,
  then reads them back with `pread` into new tensors: no format, no planning.
- bucket (1 process): wmtp to `s3://` against `torch.save` + boto3 `upload_file`, and boto3
  `download_file` + `torch.load` + `load_state_dict` on resume.

After the clock, every resumed tensor is compared with the saved one (`torch.equal`). Writes
`PATH.{md,json}` (default results/checkpoint, quick results/checkpoint-quick); exits 1 when a
target is missed past its limit or a resume is wrong.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from benchmarks import harness
from benchmarks.harness import MIB, REPO, Target, median, progress, ratio, target
from benchmarks.models import SPECS, Model, ensure_model

if TYPE_CHECKING:
    import torch

BLOCKS: Final = ("GPT2Block", "LlamaDecoderLayer")
SLACK_MIB: Final = 64  # private memory per rank allowed beyond the rank's share of the state
THREADS: Final = 4  # the floor's writers and readers per rank
METHODS: Final = ("wmtp", "old", "floor")
# 1 process, wmtp / floor. The aim is 1.3 for both; a resume is 5-9x today (5 on 198m, 6-9 on
# small: DCP deserialises every tensor into new memory, then copies it into the model's), so
# its target only guards against it getting worse until that is solved: not the aim (README).
FLOOR_GOALS: Final = {"save": 1.3, "resume": 10.0}
LABELS: Final = {
    "wmtp": "wmtp: save_checkpoint / load_checkpoint (DCP)",
    "old": "old: full state to rank 0, torch.save / torch.load, load_state_dict",
    "floor": "floor: pwrite + fsync / pread of each rank's bytes (4 threads)",
    "bucket-wmtp": "bucket, wmtp: save_checkpoint / load_checkpoint to s3://",
    "bucket-old": "bucket, old: torch.save + boto3 upload / boto3 download + torch.load",
}


class RankSample(msgspec.Struct, frozen=True):
    """What one rank measured in one fresh process."""

    rank: int
    share_mib: float = 0.0  # this rank's model + optimizer state
    save_s: float = 0.0
    resume_s: float = 0.0
    blocked_s: float | None = None  # how long a background save held the loop
    save_growth_mib: float = 0.0
    resume_growth_mib: float = 0.0
    problems: list[str] = []


class Row(msgspec.Struct, frozen=True):
    """Medians of one method at one world size on one rank."""

    method: str
    world: int
    rank: int
    runs: int
    save_s: float | None
    resume_s: float | None
    blocked_s: float | None
    save_growth_mib: float | None
    resume_growth_mib: float | None
    share_mib: float | None
    problems: list[str]


def anon_mib() -> float:
    """This process's private resident memory (`RssAnon`), in MiB."""
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if "RssAnon" in s)
    return int(line.split()[1]) / 1024


class Peak:
    """The highest `RssAnon` while a block runs, sampled every 5 ms, less the start."""

    def __enter__(self) -> Peak:
        self.start = self.peak = anon_mib()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, anon_mib())

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.growth = max(self.peak, anon_mib()) - self.start


def fsdp2(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__ in BLOCKS:
            fully_shard(module)
    fully_shard(model)


def fresh(folder: Path, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model as training holds it, and its optimizer (no state yet)."""
    import torch

    import wmtp

    model = wmtp.load(str(folder), parallelize=fsdp2 if world > 1 else None).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def local_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's tensors of the model and the optimizer state (a DTensor's local shard), each
    once (tied weights share one), as views of their own memory."""
    import torch
    from torch.distributed.tensor import DTensor

    seen, out = set(), []
    states = [state[k] for state in optimizer.state.values() for k in sorted(state)]  # by name
    for tensor in [*model.state_dict().values(), *states]:
        if isinstance(tensor, torch.Tensor):
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            if (key := (local.data_ptr(), local.numel())) not in seen:
                seen.add(key)
                out.append(local)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def timed(work: Callable[[], object]) -> tuple[float, float]:
    """Seconds (barrier to barrier) and the private memory added meanwhile."""
    barrier()
    with Peak() as peak:
        start = time.perf_counter()
        work()
        barrier()
        seconds = time.perf_counter() - start
    return seconds, peak.growth


# Each method: save(model, optimizer, where) and resume(model, optimizer, where).


def wmtp_save(model: Any, optimizer: Any, where: Path, options: Any = None) -> None:
    import wmtp

    wmtp.save_checkpoint(
        _url(where, options), model, optimizer, step=1, storage_options=_s3(options)
    )


def wmtp_resume(model: Any, optimizer: Any, where: Path, options: Any = None) -> None:
    import wmtp

    wmtp.load_checkpoint(_url(where, options), model, optimizer, storage_options=_s3(options))


def _url(where: Path, options: Any) -> str:
    return str(where) if options is None else f"{options['bucket_url']}/{where.parent.name}"


def _s3(options: Any) -> Any:
    """obstore's options of the benchmark's (which also name the bucket and prefix)."""
    ours = ("bucket", "prefix", "bucket_url")
    return None if options is None else {k: v for k, v in options.items() if k not in ours}


def old_save(model: Any, optimizer: Any, where: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if dist.is_initialized():
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
    else:
        model_state, optim_state = model.state_dict(), optimizer.state_dict()
    if not dist.is_initialized() or dist.get_rank() == 0:
        path = where.with_suffix(".pt")
        state = {
            "model": model_state,
            "optimizer": optim_state,
            "epoch": 0,
            "step": 1,
            "mlflow_run_id": "bench",
        }
        with path.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def old_resume(model: Any, optimizer: Any, where: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(where.with_suffix(".pt"), map_location="cpu", weights_only=True)
    if dist.is_initialized():
        options = StateDictOptions(full_state_dict=True)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=options,
        )
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


def floor_save(model: Any, optimizer: Any, where: Path) -> None:
    """Each rank's bytes with `THREADS` threads of `pwrite`, then fsync; its layout beside."""
    tensors = local_tensors(model, optimizer)
    layout = [(list(t.shape), str(t.dtype)[6:]) for t in tensors]
    _rank_file(where).with_suffix(".json").write_bytes(msgspec.json.encode(layout))
    _transfer(_rank_file(where), tensors, write=True)


def floor_resume(model: Any, optimizer: Any, where: Path) -> None:
    """The model's bytes read in place, the optimizer's into new tensors, by `pread`."""
    import torch

    layout = msgspec.json.decode(_rank_file(where).with_suffix(".json").read_bytes())
    mine = local_tensors(model, optimizer)  # the model's (a fresh optimizer has no state)
    states = [torch.empty(shape, dtype=getattr(torch, kind)) for shape, kind in layout[len(mine) :]]
    _transfer(_rank_file(where), [*mine, *states], write=False)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = len(states) // len(params)  # AdamW's, sorted as `local_tensors` lists them
    for i, param in enumerate(params):
        chunk = states[i * names : (i + 1) * names]
        optimizer.state[param] = dict(zip(("exp_avg", "exp_avg_sq", "step"), chunk, strict=True))


def _transfer(path: Path, tensors: list[torch.Tensor], write: bool) -> None:
    views = [memoryview(t.view(-1).view(_u8()).numpy().data) for t in tensors if t.numel()]
    offsets = [0]
    for view in views:
        offsets.append(offsets[-1] + len(view))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC if write else os.O_RDONLY
    fd = os.open(path, flags, 0o644)
    try:

        def one(i: int) -> None:
            if write:
                os.pwrite(fd, views[i], offsets[i])
            else:
                os.preadv(fd, [views[i]], offsets[i])

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(one, range(len(views))))
        if write:
            os.fsync(fd)
    finally:
        os.close(fd)


def _u8() -> Any:
    import torch

    return torch.uint8


def _rank_file(where: Path) -> Path:
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    where.mkdir(parents=True, exist_ok=True)
    return where / f"rank{rank}.bin"


def bucket_old_save(model: Any, optimizer: Any, where: Path, options: Any) -> None:
    old_save(model, optimizer, where)
    _boto3(options).upload_file(
        str(where.with_suffix(".pt")), options["bucket"], _key(where, options)
    )


def bucket_old_resume(model: Any, optimizer: Any, where: Path, options: Any) -> None:
    where.with_suffix(".pt").unlink()
    _boto3(options).download_file(
        options["bucket"], _key(where, options), str(where.with_suffix(".pt"))
    )
    old_resume(model, optimizer, where)


def _key(where: Path, options: Any) -> str:
    return f"{options['prefix']}/{where.parent.name}.pt"


def _boto3(options: Any) -> Any:
    import boto3  # type: ignore[import-untyped]
    from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]

    client = boto3.client(
        "s3",
        endpoint_url=options["endpoint"],
        region_name=options["region"],
        aws_access_key_id=options["access_key_id"],
        aws_secret_access_key=options["secret_access_key"],
    )
    config = TransferConfig(multipart_chunksize=25 * MIB, max_concurrency=10)

    class Client:
        def upload_file(self, path: str, bucket: str, key: str) -> None:
            client.upload_file(path, bucket, key, Config=config)

        def download_file(self, bucket: str, key: str, path: str) -> None:
            client.download_file(bucket, key, path, Config=config)

    return Client()


SAVES: Final[dict[str, Callable[..., None]]] = {
    "wmtp": wmtp_save,
    "old": old_save,
    "floor": floor_save,
    "bucket-wmtp": wmtp_save,
    "bucket-old": bucket_old_save,
}
RESUMES: Final[dict[str, Callable[..., None]]] = {
    "wmtp": wmtp_resume,
    "old": old_resume,
    "floor": floor_resume,
    "bucket-wmtp": wmtp_resume,
    "bucket-old": bucket_old_resume,
}


def same(a: tuple[Any, Any], b: tuple[Any, Any], rank: int) -> list[str]:
    """The resumed local tensors against the saved ones, bitwise."""
    import torch

    pairs = zip(local_tensors(*a), local_tensors(*b), strict=False)
    wrong = sum(not torch.equal(x, y) for x, y in pairs)
    count = (len(local_tensors(*a)), len(local_tensors(*b)))
    return (
        [f"rank {rank}: {wrong} tensors differ, counts {count}"]
        if wrong or count[0] != count[1]
        else []
    )


def worker(
    method: str, world: int, folder: Path, out: Path, options: dict[str, str] | None
) -> None:
    """One rank of one sample: load, one step, timed save, timed resume, check."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint.state_dict
    import torch.distributed.fsdp

    from benchmarks.methods import import_libraries

    import_libraries()
    # What the methods import, before the clock: imports are not what is measured.
    import torch.distributed.checkpoint.filesystem
    import torch.distributed.checkpoint.state_dict_loader
    import torch.distributed.checkpoint.state_dict_saver
    import torch.distributed.tensor

    import wmtp.checkpoint

    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    extra = (options,) if method.startswith("bucket") else ()
    where = out / "ckpt"
    os.environ["WMTP_CACHE_DIR"] = str(out / "cache")  # a bucket resume downloads every time
    try:
        model, optimizer = fresh(folder, world)
        torch.manual_seed(0)
        ids = torch.randint(0, 1000, (2, 32))
        model(input_ids=ids, labels=ids)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        share = sum(t.numel() * t.element_size() for t in local_tensors(model, optimizer)) / MIB
        save_s, save_growth = timed(lambda: SAVES[method](model, optimizer, where, *extra))
        again, opt_again = fresh(folder, world)
        resume_s, resume_growth = timed(lambda: RESUMES[method](again, opt_again, where, *extra))
        blocked = None
        if method == "wmtp":  # last: its staging copy would be reused memory for a resume
            import wmtp

            barrier()
            start = time.perf_counter()
            future = wmtp.save_checkpoint(
                out / "ckpt-bg", model, optimizer, step=1, background=True
            )
            blocked = time.perf_counter() - start
            future.result()
        problems = same((model, optimizer), (again, opt_again), rank)
        sample = RankSample(
            rank, share, save_s, resume_s, blocked, save_growth, resume_growth, problems
        )
    except Exception as e:  # the error itself in the report
        sample = RankSample(rank, problems=[f"rank {rank}: {type(e).__name__}: {e}"[:400]])
    harness.write(out / f"rank{rank}.json", msgspec.json.encode(sample))
    if world > 1:
        dist.destroy_process_group()


def run_sample(
    method: str, world: int, model: Model, options: dict[str, str] | None
) -> list[RankSample]:
    """One fresh process (or torchrun) of `method`: every rank's sample, or why it failed."""
    with tempfile.TemporaryDirectory(
        prefix="wmtp-bench-ckpt-", dir=os.environ.get("WMTP_BENCH_TMP")
    ) as out:
        me = ["-m", "benchmarks.checkpoint", "--worker", method, str(world), model.folder, out]
        if options is not None:
            me.append(msgspec.json.encode(options).decode())
        if world > 1:
            with socket.socket() as free:
                free.bind(("127.0.0.1", 0))
                port = free.getsockname()[1]
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={world}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                *me,
            ]
        else:
            command = [sys.executable, *me]
        done = subprocess.run(
            command, cwd=REPO, env=harness.child_env(), capture_output=True, timeout=1800
        )
        why = f"exit {done.returncode}: {done.stderr.decode(errors='replace')[-600:]}"
        files = [Path(out) / f"rank{r}.json" for r in range(world)]
        got = [
            msgspec.json.decode(p.read_bytes(), type=RankSample)
            if p.exists()
            else RankSample(r, problems=[why])
            for r, p in enumerate(files)
        ]
    wrong = [p for s in got for p in s.problems]
    shown = [f"save {s.save_s:.2f} s resume {s.resume_s:.2f} s" for s in got]
    progress(f"{method} x{world}: {wrong[0] if wrong else ', '.join(shown)}")
    return got


def summarise(method: str, world: int, rank: int, samples: Sequence[list[RankSample]]) -> Row:
    mine = [s[rank] for s in samples]
    good = [s for s in mine if not s.problems]
    problems = sorted({p for s in mine for p in s.problems})[:3]
    return Row(
        method,
        world,
        rank,
        len(good),
        median(s.save_s for s in good),
        median(s.resume_s for s in good),
        median(s.blocked_s for s in good),
        median(s.save_growth_mib for s in good),
        median(s.resume_growth_mib for s in good),
        median(s.share_mib for s in good),
        problems,
    )


def targets(name: str, rows: Sequence[Row], quick: bool) -> list[Target]:
    """2 ranks: wmtp <= 0.6x old (slowest rank), memory <= share + slack; 1 process: wmtp
    against the floor (`FLOOR_GOALS`). Times fail past the harness's NOISE margin."""

    def worst(method: str, world: int, field: str) -> float | None:
        values = [getattr(r, field) for r in rows if (r.method, r.world) == (method, world)]
        return None if not values or None in values else max(values)

    found = []
    for phase in ("save_s", "resume_s"):
        word = phase.removesuffix("_s")
        value = ratio(worst("wmtp", 2, phase), worst("old", 2, phase))
        found.append(target(name, f"2 ranks: wmtp / old, {word}", value, 0.6))
        value = ratio(worst("wmtp", 1, phase), worst("floor", 1, phase))
        what, goal = f"1 process: wmtp / floor, {word}", FLOOR_GOALS[word]
        what += " (a guard: aim 1.3)" if goal > 1.3 else ""
        found.append(target(name, what, value, goal))
    # Memory keeps its own limits, as they were: a machine's load does not move it, so the
    # NOISE margin measured on timed ratios does not apply.
    loose = 4.0 if quick else 2.0
    for phase in ("save_growth_mib", "resume_growth_mib"):
        over = [
            r.__getattribute__(phase) - (r.share_mib or 0)
            for r in rows
            if (r.method, r.world) == ("wmtp", 2) and r.__getattribute__(phase) is not None
        ]
        what = f"2 ranks: wmtp {phase.split('_')[0]}, RssAnon growth - share (MiB)"
        found.append(target(name, what, max(over) if over else None, SLACK_MIB, SLACK_MIB * loose))
    return found


def markdown(head: str, model: Model, runs: int, rows: list[Row], found: list[Target]) -> str:
    by = {(r.method, r.world, r.rank): r for r in rows}
    cells = []
    for r in rows:
        old = by.get(
            ("old" if not r.method.startswith("bucket") else "bucket-old", r.world, r.rank)
        )
        floor = by.get(("floor", r.world, r.rank))
        cells.append(
            [
                LABELS[r.method],
                r.world,
                r.rank,
                r.save_s,
                r.resume_s,
                r.blocked_s,
                ratio(r.save_s, old.save_s if old else None),
                ratio(r.resume_s, old.resume_s if old else None),
                ratio(r.save_s, floor.save_s if floor else None),
                ratio(r.resume_s, floor.resume_s if floor else None),
                r.save_growth_mib,
                r.resume_growth_mib,
                r.share_mib,
                r.runs,
            ]
        )
    header = [
        "method",
        "ranks",
        "rank",
        "save s",
        "resume s",
        "background: blocked s",
        "save x old",
        "resume x old",
        "save x floor",
        "resume x floor",
        "save: RssAnon growth MiB",
        "resume: RssAnon growth MiB",
        "rank's share MiB",
        "runs",
    ]
    size = f"`{model.spec.name}` ({model.weight_bytes / MIB:,.0f} MiB fp32 weights, AdamW)"
    parts = [
        f"{head}: model {size}; median of {runs} fresh runs per method, interleaved.",
        harness.table(header, cells, left=1),
        "### Targets\n\n" + harness.targets_table(found),
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        options = msgspec.json.decode(argv[5]) if len(argv) > 5 else None
        worker(argv[1], int(argv[2]), Path(argv[3]), Path(argv[4]), options)
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI: the small model, 3 runs")
    parser.add_argument("--runs", type=int, help="runs per method (default 3, quick 3)")
    parser.add_argument("--no-bucket", action="store_true", help="skip the S3 rows")
    parser.add_argument("--only", help="these methods alone, comma-separated (e.g. bucket-wmtp)")
    parser.add_argument("--workdir", type=Path, help="keep generated models here, reuse them")
    parser.add_argument("--out", type=Path, help="results path, without suffix")
    args = parser.parse_args(argv)
    # Quick runs take medians of 3 as well: one sample is too noisy to gate on.
    mode, runs = "quick" if args.quick else "full", args.runs or 3
    root = args.workdir or Path(tempfile.mkdtemp(prefix="wmtp-bench-"))
    server = None
    try:
        model = ensure_model(SPECS["small" if args.quick else "198m"], root)
        progress(f"model {model.spec.name}: {model.weight_bytes / MIB:,.0f} MiB")
        plan: list[tuple[str, int, dict[str, str] | None]]
        plan = [(m, world, None) for world in (1, 2) for m in METHODS]
        if not args.no_bucket:
            from tests.s3server import start_gateway, storage_options

            server = start_gateway(root / "s3")
            opts = storage_options(server) | {
                "bucket": server.bucket,
                "prefix": "bench-ckpt",
                "bucket_url": f"s3://{server.bucket}/bench-ckpt",
            }
            plan += [("bucket-wmtp", 1, opts), ("bucket-old", 1, opts)]
        plan = [job for job in plan if not args.only or job[0] in args.only.split(",")]
        jobs = {f"{m}/{w}": functools.partial(run_sample, m, w, model, o) for m, w, o in plan}
        samples = harness.interleave(jobs, runs)
    finally:
        if server is not None:
            from tests.s3server import stop_gateway

            stop_gateway(server)
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    rows = [summarise(m, w, r, samples[f"{m}/{w}"]) for m, w, _ in plan for r in range(w)]
    found = targets(model.spec.name, rows, args.quick)
    found = [t for t in found if not args.only or t.status != "not measured"]
    failures = harness.failed(found) + [f"{r.method}: {p}" for r in rows for p in r.problems]
    import torch

    machine = f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, torch {torch.__version__}"
    created, command = (
        time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        " ".join(["python -m benchmarks.checkpoint", *argv]),
    )
    head = f"## Checkpoint benchmark ({mode}, {created})\n\n`{command}` on {machine}"
    text = markdown(head, model, runs, rows, found)
    if failures:
        text += "\n### Failures\n\n" + "".join(f"- {f}\n" for f in failures)
    print(text)
    record: dict[str, object] = {
        "mode": mode,
        "created": created,
        "command": command,
        "machine": machine,
        "model": model,
        "runs": runs,
        "rows": rows,
    }
    out = args.out or harness.RESULTS / ("checkpoint" if mode == "full" else "checkpoint-quick")
    harness.write_json(out.with_suffix(".json"), record | {"targets": found, "failures": failures})
    harness.write(out.with_suffix(".md"), text)
    progress(f"wrote {out}.{{json,md}}; {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
