"""The measured methods (`METHODS`), what runs after each load (`AFTER`), and the processes
that time them.

`python -m benchmarks.methods serve` imports the libraries once, then forks a fresh child per
JSON `Job` line of stdin; the child times the load and then the job's `after` work (every
weight read, a first forward pass or a first training step) on one clock, reads its peak
memory, checks every tensor against the files (or, after a step, records the loss), and the
server prints its `Sample` line. Forking a server that only imported gives every sample the
same start without ~8 s of imports each. `python -m benchmarks.methods JOB` runs one job in
this fresh process (end-to-end rows).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib
import importlib.util
import json
import mmap
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

import msgspec

if TYPE_CHECKING:
    import torch

PAGE: Final = 4096
# The cold bytes floor's readers (threads, chunk): which is fastest depends on the disk, so
# both run and the faster median is the floor (run.py).
PREADS: Final = {"pread8": (8, 16 << 20), "pread2": (2, 64 << 20)}
TOKENS: Final = 16  # the forward pass's and the training step's sequence length
Cache = Literal["warm", "cold", "e2e"]
After = Literal["none", "read", "forward", "step", "touch"]
# The pread floors' buffers, made by the server: a forked child starts with its own copy of
# them (`copy_heap`), so a floor times reading, not first-touching 128 MiB of buffers.
PREAD_BUFFERS: Final[dict[str, list[bytearray]]] = {}


class Job(msgspec.Struct, frozen=True):
    """One measurement: a method on a model folder, then `after` on the model it returned, one
    clock; cold evicts the files from the page cache first, e2e times a fresh `python`."""

    method: str
    folder: str
    after: After = "none"
    cache: Cache = "warm"


class Sample(msgspec.Struct, frozen=True):
    """What one child measured. Seconds; resident memory in MiB."""

    load_s: float = 0.0  # the method until it returns (0 for a method loaded before the clock)
    after_s: float = 0.0  # then the job's `after` work
    rss_start_mib: float = 0.0  # RSS when the clock started (libraries imported)
    rss_peak_mib: float = 0.0  # peak RSS at the end of the measured part
    wall_end: float = 0.0  # time.time() at the end, for the end-to-end rows
    cached: float | None = None  # share of the weight pages still cached after eviction
    loss: float | None = None  # the loss of a first training step
    problems: list[str] = []  # wrong weights, or the error that stopped the method


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of `folder`: the shards its index lists, else `model.safetensors`."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / "model.safetensors"]


def floor_mmap(folder: Path) -> None:
    """Bytes floor, warm: map the weight files and read one byte per page."""
    for path in weight_files(folder):
        with (
            path.open("rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
            memoryview(mapped) as view,
        ):
            view[::PAGE].tobytes()  # a strided copy in C faults every page in


def floor_pread(folder: Path, reader: str) -> None:
    """Bytes floor, cold: `PREADS[reader]` threads of `preadv` in chunks, each into its own
    reused buffer, allocated before the clock (`PREAD_BUFFERS`)."""
    threads, chunk = PREADS[reader]
    fds = [os.open(path, os.O_RDONLY) for path in weight_files(folder)]
    try:
        chunks = [(fd, at) for fd in fds for at in range(0, os.fstat(fd).st_size, chunk)]
        buffers = PREAD_BUFFERS.get(reader) or [bytearray(chunk) for _ in range(threads)]

        def worker(first: int) -> int:
            buffer, done = buffers[first], 0
            for fd, at in chunks[first::threads]:
                done += os.preadv(fd, [buffer], at)
            return done

        with ThreadPoolExecutor(threads) as pool:
            done = sum(pool.map(worker, range(threads)))
        assert done == sum(os.fstat(fd).st_size for fd in fds), "short read"
    finally:
        for fd in fds:
            os.close(fd)


def wmtp_load(folder: Path, dtype: str | None = None, train: bool = False) -> torch.nn.Module:
    """`wmtp.load` on the folder."""
    import wmtp

    return wmtp.load(str(folder), dtype=dtype, train=train)


def build(folder: Path) -> torch.nn.Module:
    """The folder's model class built from its config, as a user would write it."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(folder)
    strategy = json.loads((folder / "metadata.json").read_text())["loading_strategy"]
    if strategy["loader_type"] == "huggingface":
        model: torch.nn.Module = transformers.AutoModelForCausalLM.from_config(cfg)  # type: ignore[no-untyped-call]
        return model
    spec = importlib.util.spec_from_file_location("bench_modeling", folder / "modeling.py")
    assert spec is not None and spec.loader is not None  # a .py file has a loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built: torch.nn.Module = getattr(module, strategy["model_class_name"])(cfg)
    return built


def load_files(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder with `safetensors.torch.load_file`, file by file."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        state.update(load_file(path))
    return state


def stream_files(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder with the Run:ai Model Streamer."""
    streamer = importlib.import_module("runai_model_streamer")
    with streamer.SafetensorsStreamer() as s:
        s.stream_files([str(p) for p in weight_files(folder)])
        state: dict[str, torch.Tensor] = dict(s.get_tensors())
    return state


def old_method(folder: Path) -> torch.nn.Module:
    """The replaced loader: random-init model, `load_file`, copying `load_state_dict`."""
    model = build(folder)
    model.load_state_dict(load_files(folder), strict=False)
    return model


def idiom(
    folder: Path, read: Callable[[Path], dict[str, torch.Tensor]] = load_files
) -> torch.nn.Module:
    """What a user writes instead of wmtp: build on meta, load the files, assign, re-tie.

    The file stores a tied matrix once, so `strict=False` and the LM head and the embedding are
    pointed back at the one matrix, whichever side the file kept.
    """
    import torch

    with torch.device("meta"):
        model = build(folder)
    model.load_state_dict(read(folder), strict=False, assign=True)
    trunk: Any = model if hasattr(model, "get_output_embeddings") else model.base_model
    head, embedding = trunk.get_output_embeddings(), trunk.get_input_embeddings()
    if head.weight.is_meta:
        head.weight = embedding.weight
    else:
        embedding.weight = head.weight
    return model


def hf_load(folder: Path) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained` on the folder."""
    import transformers

    model: torch.nn.Module = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return model


def idiom_bf16(folder: Path) -> torch.nn.Module:
    """The idiom, then `model.to(torch.bfloat16)`: what a user writes for a bf16 model."""
    import torch

    return idiom(folder).to(torch.bfloat16)


def resident(folder: Path) -> torch.nn.Module:
    """The compute baseline, loaded before the clock: the idiom's model with every tensor
    cloned into fresh anonymous memory (a tie stays one tensor) and every byte read once, so
    the timed work meets no file, no page fault on a weight and no copy-on-write."""
    import torch

    model, clones = idiom(folder), dict[int, torch.Tensor]()
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.data_ptr() not in clones:
                clones[tensor.data_ptr()] = tensor.detach().clone()
            tensor.data = clones[tensor.data_ptr()]  # the same Parameter: ties and grads kept
    read_weights(model)
    return model


class Method(NamedTuple):
    """How a job loads: a function of the folder (floors return no model)."""

    load: Callable[[Path], torch.nn.Module | None]
    dtype: str | None = None  # the dtype its weights must have, when it casts
    clocked: bool = True  # False: loaded before the clock, only the `after` work is timed


METHODS: Final[dict[str, Method]] = {
    "mmap": Method(floor_mmap),
    **{name: Method(functools.partial(floor_pread, reader=name)) for name in PREADS},
    "resident": Method(resident, clocked=False),
    "wmtp": Method(wmtp_load),
    "wmtp-bf16": Method(functools.partial(wmtp_load, dtype="bfloat16"), "bfloat16"),
    "wmtp-train": Method(functools.partial(wmtp_load, train=True)),
    "idiom": Method(idiom),
    "idiom-bf16": Method(idiom_bf16, "bfloat16"),
    "runai": Method(functools.partial(idiom, read=stream_files)),
    "old": Method(old_method),
    "hf": Method(hf_load),
}


def import_libraries() -> None:
    """What every method may use, imported before the clock (the same cost for all)."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401

    for optional in ("wmtp", "runai_model_streamer"):
        # A wmtp that does not import fails its own jobs with its error, not the server.
        with contextlib.suppress(Exception):
            importlib.import_module(optional)


def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> float:
    """Reset the peak RSS (VmHWM) to the current RSS where Linux allows; the RSS to count from."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return status_mib("VmHWM")  # peak since exec: count from it
    return status_mib("VmRSS")


def resident_share(paths: list[Path]) -> float:
    """The share of the files' pages in the page cache (`mincore` on a map of each)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    total = cached = 0
    for path in paths:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            pages = -(-len(mapped) // PAGE)
            vector = (ctypes.c_ubyte * pages)()
            anchor = ctypes.c_char.from_buffer(mapped)  # the map's address; no page is faulted
            failed = libc.mincore(ctypes.addressof(anchor), len(mapped), vector)
            del anchor  # the map cannot close while exported
            if failed:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            total, cached = total + pages, cached + pages - bytes(vector).count(0)
    return cached / max(total, 1)


def evict(folder: Path) -> float:
    """Drop the folder's files from the page cache; the share of weight pages still cached."""
    for path in filter(Path.is_file, folder.iterdir()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a model just written) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_share(weight_files(folder))


def distinct(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Each tensor of the model's state dict once: the names of a tie share one."""
    seen: set[int] = set()
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            yield tensor


def read_weights(model: torch.nn.Module) -> None:
    """Read every byte of every weight once."""
    for tensor in distinct(model):
        float(tensor.float().sum())


def forward(model: torch.nn.Module) -> None:
    """One forward pass on `TOKENS` tokens, without gradients, in eval mode."""
    import torch

    model.eval()  # every method alike: a model built by hand is in train mode (dropout on)
    with torch.no_grad():
        model(input_ids=torch.arange(TOKENS).unsqueeze(0))


def step(model: torch.nn.Module) -> float:
    """A first training step on `TOKENS` tokens: AdamW made, forward with labels, backward,
    the optimizer's step (which writes every weight); the loss."""
    import torch

    ids = torch.arange(TOKENS).unsqueeze(0)
    torch.manual_seed(0)  # the same dropout masks in every method: first losses compare bitwise
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss = model(input_ids=ids, labels=ids)["loss"]
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def touch(model: torch.nn.Module) -> None:
    """Diagnostic only: read one element per 4 KiB page of every weight (no target uses it)."""
    for tensor in distinct(model):
        float(tensor.reshape(-1)[:: max(1, PAGE // tensor.element_size())].float().sum())


def nothing(model: torch.nn.Module) -> None:
    """No work after the load."""


# What a job times after its load, on the same clock; a step returns its loss.
AFTER: Final[dict[After, Callable[[torch.nn.Module], float | None]]] = {
    "none": nothing,
    "read": read_weights,
    "forward": forward,
    "step": step,
    "touch": touch,
}


def verify(model: torch.nn.Module, folder: Path, dtype: str | None) -> list[str]:
    """Every tensor of the model against the files (torch.equal); what is wrong.

    A name the files do not hold must share memory with one they do (a tied matrix).
    """
    import torch
    from safetensors import safe_open

    where: dict[str, Path] = {}
    aliases: dict[str, str] = {}
    for path in weight_files(folder):
        with safe_open(str(path), "pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
            aliases.update({k: v for k, v in (f.metadata() or {}).items() if k != "format"})
    state = model.state_dict()
    stored_pointers = {t.data_ptr() for k, t in state.items() if k in where}
    problems = []
    for key, tensor in state.items():
        name = key if key in where else aliases.get(key)
        if name is None:
            if tensor.data_ptr() not in stored_pointers:
                problems.append(f"{key}: not in the files and not tied to a stored tensor")
            continue
        with safe_open(str(where[name]), "pt") as f:
            expected = f.get_tensor(name)
        expected = expected.to(getattr(torch, dtype)) if dtype else expected
        if tensor.device.type != "cpu" or tensor.dtype != expected.dtype:
            problems.append(f"{key}: {tensor.dtype} on {tensor.device}, want {expected.dtype}")
        elif not torch.equal(tensor, expected):
            problems.append(f"{key}: differs from the file's {name}")
    return problems[:5]


def measure(job: Job) -> Sample:
    """Time the job's load and its `after` work on one clock, then check the weights (a step
    changed them: its loss is compared across methods instead)."""
    folder, method = Path(job.folder), METHODS[job.method]
    ready = None if method.clocked else method.load(folder)
    cached = evict(folder) if job.cache == "cold" else None
    start_rss = reset_peak()
    t0 = time.perf_counter()
    model = method.load(folder) if method.clocked else ready
    t1 = time.perf_counter()
    loss = None if model is None else AFTER[job.after](model)
    t2 = time.perf_counter()
    wall_end, peak = time.time(), status_mib("VmHWM")  # before the check, which reads again
    problems = [] if model is None or job.after == "step" else verify(model, folder, method.dtype)
    return Sample(t1 - t0, t2 - t1, start_rss, peak, wall_end, cached, loss, problems)


def run(job: Job) -> bytes:
    """The job's `Sample` as a JSON line; a failure becomes a sample that says what went wrong."""
    try:
        sample = measure(job)
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        sample = Sample(problems=[f"{e!r} at {where.filename}:{where.lineno}"])
    return msgspec.json.encode(sample) + b"\n"


def copy_heap() -> None:
    """Give this forked child its own copy of every writable page before any clock starts.

    Else the first write to each page shared with the server (Python writes reference counts
    everywhere) copies it inside the measurement. MADV_POPULATE_WRITE (Linux 5.14) copies
    without changing a byte; where the kernel lacks it, the call fails and nothing changes.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, perms = line.split()[:2]
        if perms[1] == "w" and perms[3] == "p":
            low, high = (int(x, 16) for x in span.split("-"))
            libc.madvise(low, high - low, 23)  # MADV_POPULATE_WRITE


def serve() -> None:
    """Import the libraries, then run each job line of stdin in a forked child."""
    import_libraries()
    PREAD_BUFFERS.update({k: [bytearray(c) for _ in range(n)] for k, (n, c) in PREADS.items()})
    gc.freeze()  # a collection in a child would otherwise touch, and copy, the whole heap
    for line in sys.stdin.buffer:
        job = msgspec.json.decode(line, type=Job)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            copy_heap()
            with os.fdopen(write_end, "wb") as out:
                out.write(run(job))
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as result:
            data = result.read()
        _, status = os.waitpid(pid, 0)
        lost = msgspec.json.encode(Sample(problems=[f"child died: wait status {status}"]))
        sys.stdout.buffer.write(data or lost + b"\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        sys.stdout.buffer.write(run(msgspec.json.decode(sys.argv[1], type=Job)))
