"""Training checkpoints: `save_checkpoint`, `load_checkpoint`, `latest_checkpoint` and
`export_checkpoint`, on `torch.distributed.checkpoint` (DCP), in one process or under torchrun.

A checkpoint is a folder (or bucket prefix) of DCP files, each rank writing and reading only its
own shards (a checkpoint saved at one world size loads at another), with `get_state_dict` /
`set_state_dict` for the model and optimizer state under FSDP2, plus `checkpoint.json`, written
last by rank 0 once every rank's files are durable: a folder without it is not a checkpoint.

Buckets go through the same obstore stack as `load`: DCP writes each rank's files into a local
staging folder under `$TMPDIR`, each rank uploads its own (multipart, as `wmtp.save` does), then
rank 0 uploads DCP's `.metadata` and `checkpoint.json` last. A load downloads the files through
wmtp's cache (`wmtp.store.fetch`) and reads them with DCP's `FileSystemReader`.

Nothing in a checkpoint runs as code: DCP's `.metadata` (a pickle) is read by an unpickler
that builds only DCP's own record classes and torch's dtypes and sizes, values that are not
tensors by `torch.load(weights_only=True)`, and so is a single-file `.pt` checkpoint of the
old trainer. Everything that can be checked is checked before the model or the optimizer is
changed: keys, shapes, dtypes, the optimizer's kind, and every file's presence and size.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import obstore

from wmtp.dcp import (
    DCP_METADATA,
    MARKER,
    NO_GROUP,
    CheckpointInfo,
    dcp_errors,
    dcp_reader,
    fetch_files,
    read_dcp_metadata,
    read_info,
    safe_planner,
    signature,
    stored_keys,
)
from wmtp.errors import (
    MetadataError,
    ModelFileError,
    OptionError,
    WeightsError,
    WmtpError,
)  # fmt: skip
from wmtp.gather import sync_folder
from wmtp.location import StorageOptions, join, local_root, translate
from wmtp.store import open_store

if TYPE_CHECKING:
    import torch
    from obstore.store import ObjectStore
    from torch.distributed.checkpoint.metadata import Metadata as DcpMetadata

__all__ = [
    "TrainingState", "export_checkpoint", "latest_checkpoint", "load_checkpoint", "save_checkpoint"
]  # fmt: skip
WRITE_THREADS: Final = 2  # files per rank DCP writes at once
OLD_SUFFIXES: Final = (".pt", ".pth")
LISTED: Final = 8  # keys named in an error before "... and N more"


class TrainingState(msgspec.Struct, frozen=True):
    """Where a resumed run goes on: its `step`, `epoch`, and the `extra` saved with them (for
    a checkpoint of the old trainer: `mlflow_run_id` and every other key of its file)."""

    step: int
    epoch: int = 0
    extra: dict[str, Any] = {}


_pending: list[Future[str]] = []  # the background save in flight, if any
_groups: list[Any] = []  # (default process group, the gloo group of checkpoint collectives)


def save_checkpoint(
    location: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int,
    epoch: int = 0,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    background: bool = False,
    storage_options: StorageOptions | None = None,
) -> Any:
    """Write a training checkpoint of `model` (and `optimizer`) into the folder `location`.

    Under torchrun every rank calls it (a collective): each writes only its own shards, in
    parallel (DCP), and rank 0 writes `checkpoint.json` last, after every rank's files are
    durable (fsynced, or uploaded), so a save that dies half way is never taken for a
    checkpoint. Without a process group it runs in this process alone. A local `location` must
    be a folder every rank sees (one node, or a shared file system); a bucket URL is written
    through a local staging folder (`$TMPDIR`), each rank uploading its own files, and rank 0
    `.metadata` and `checkpoint.json` last.

    Args:
        location: the checkpoint folder: a path, `file://` or any URL `wmtp.load` takes;
            one folder per checkpoint (e.g. `ckpt/step-001000`).
        model: the model (plain, or FSDP2 / DTensor parameters from `load(parallelize=...)`).
        optimizer: its optimizer, or None to save the model alone.
        step, epoch: where training is; `latest_checkpoint` picks the highest step.
        extra: JSON-able values kept with it, e.g. `{"mlflow_run_id": ..., "loss": 2.1}`.
        overwrite: replace a complete checkpoint already in `location` (its `checkpoint.json`
            is deleted first, so a replacement cut short is never taken for a checkpoint).
        background: return once the state is copied (DCP's `async_save`) and write while
            training goes on; the answer is then a `concurrent.futures.Future` of the
            location. The next save or load waits for it.
        storage_options: obstore options for a bucket, as for `wmtp.load`.

    Returns:
        `location` as given (a string), or a Future of it with `background=True`.

    Raises:
        OptionError: `location` holds a complete checkpoint and `overwrite` is False; `step`
            or `epoch` is not a non-negative int, or `extra` is not JSON-able.
        FetchError / StoreAccessError: a file could not be written or uploaded.
        WmtpError: another rank failed (named), or DCP failed to save.

    Example:
        >>> wmtp.save_checkpoint(f"ckpt/step-{step:06d}", model, optimizer, step=step,
        ...                      epoch=epoch, extra={"mlflow_run_id": run.info.run_id})
        'ckpt/step-000100'
    """
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import async_save, save

    where = os.fspath(location)
    _wait_pending()
    for name, value in (("step", step), ("epoch", epoch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise OptionError(f"save_checkpoint({name}={value!r}): give a non-negative int")
    try:
        kept = msgspec.json.decode(msgspec.json.encode(dict(extra or {})))
    except (TypeError, ValueError, msgspec.MsgspecError) as e:
        raise OptionError(f"save_checkpoint(extra=...) must be JSON-able: {e}") from None
    group, rank, world = _ranks()
    root = local_root(where)
    store = None if root else open_store(where, storage_options)
    with _agreed(group, "prepare the checkpoint folder"):
        if rank == 0:
            _clear(where, root, store, overwrite, storage_options)
    state = _state(model, optimizer)
    staging = root or Path(tempfile.mkdtemp(prefix="wmtp-ckpt-"))
    with _agreed(group, "create the checkpoint folder"), translate(str(staging)):
        staging.mkdir(parents=True, exist_ok=True)
    # A staging folder needs no fsync: the upload, not the local copy, is what lasts.
    writer = FileSystemWriter(str(staging), sync_files=root is not None, thread_count=WRITE_THREADS)
    kind = None if optimizer is None else type(optimizer).__name__
    info = CheckpointInfo(step=step, epoch=epoch, extra=kept, world_size=world,
                          model=_class_name(model), optimizer=kind, files={})  # fmt: skip

    def finish(saved: DcpMetadata) -> str:
        try:
            _finish(where, root, store, staging, saved, info, group, rank)
        finally:
            if root is None:
                shutil.rmtree(staging, ignore_errors=True)
        return where

    options: dict[str, Any] = {"storage_writer": writer, "process_group": group}
    options["no_dist"] = group is None
    try:
        if group is None and background:  # DCP warns from its thread, where no filter reaches
            warnings.filterwarnings("ignore", NO_GROUP, UserWarning)
        with dcp_errors(f"saving checkpoint {where}"):
            writing: Any = async_save(state, **options) if background else save(state, **options)
    except BaseException:
        if root is None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if not background:
        return finish(writing)
    done: Future[str] = Future()

    def complete() -> None:
        try:
            with dcp_errors(f"saving checkpoint {where}"):
                saved = writing.result()
            done.set_result(finish(saved))
        except BaseException as e:  # the caller sees it in the future
            done.set_exception(e)

    threading.Thread(target=complete, name="wmtp-checkpoint", daemon=True).start()
    _pending.append(done)
    return done


def load_checkpoint(
    location: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    storage_options: StorageOptions | None = None,
) -> TrainingState:
    """Fill `model` (and `optimizer`) in place from the checkpoint at `location`, resharded to
    this world size and parallelism, and say where training stopped.

    Everything is checked before anything changes: the model's keys, shapes and dtypes against
    the checkpoint's, the optimizer's kind and state keys, every file present at its size.
    On any mismatch the model and the optimizer are left as they were. Under torchrun every
    rank calls it (a collective). A bucket checkpoint is downloaded through wmtp's cache
    (one download per node) and read from there.

    The old trainer's single-file checkpoints (`.pt`, a dict of "model", "optimizer", "epoch",
    "step", "mlflow_run_id", ...) load too, with `torch.load(weights_only=True)`: their
    "model" and "optimizer" fill the model and optimizer, "step" and "epoch" are returned, and
    every other key lands in `extra`. A pickle that would run code is refused and nothing runs.

    Args:
        location: the checkpoint folder (path, `file://` or URL), or an old `.pt` file.
        model: the model to fill, built as it was saved (any world size, FSDP2 or not).
        optimizer: the optimizer to fill (of the same kind as the one saved), or None.
        storage_options: obstore options for a bucket, as for `wmtp.load`.

    Returns:
        A frozen `TrainingState(step, epoch, extra)`.

    Raises:
        ModelFileError: no checkpoint there (no `checkpoint.json`: a save that did not finish),
            or one of its files is missing.
        IntegrityError: a file is shorter than `checkpoint.json` says (truncated).
        WeightsError: keys, shapes or dtypes that do not fit the model, an optimizer of
            another kind, or no optimizer state saved; the checkpoint and keys are named.
        MetadataError: `checkpoint.json` or `.metadata` is not valid, or a `.pt` file would
            run code or is not a checkpoint dict.
        WmtpError: another rank failed (named), or DCP failed to read.

    Example:
        >>> if (resume := wmtp.latest_checkpoint("ckpt")) is not None:
        ...     state = wmtp.load_checkpoint(resume, model, optimizer)
        ...     start = state.step + 1
    """
    where = os.fspath(location)
    _wait_pending()
    group, _, _ = _ranks()
    if where.rstrip("/").endswith(OLD_SUFFIXES) or ((p := local_root(where)) and p.is_file()):
        return _load_old(where, model, optimizer, group, storage_options)
    with _agreed(group, f"read checkpoint {where}"):
        info, folder, links = fetch_files(where, storage_options)
    try:
        return _load_dcp(where, info, folder, model, optimizer, group)
    finally:
        if links is not None:
            shutil.rmtree(links, ignore_errors=True)


def latest_checkpoint(
    root: str | os.PathLike[str], *, storage_options: StorageOptions | None = None
) -> str | None:
    """The complete checkpoint folder directly under `root` (a path or URL) with the highest
    step, or None when there is none (or `root` does not exist yet). Folders without a valid
    `checkpoint.json` (a save that did not finish) are passed over.

    Args:
        root: the folder holding one folder per checkpoint.
        storage_options: obstore options for a bucket, as for `wmtp.load`.

    Raises:
        FetchError / StoreAccessError: the store could not be listed.

    Example:
        >>> resume = wmtp.latest_checkpoint("s3://bucket/run-7/ckpt")
        's3://bucket/run-7/ckpt/step-000300'
    """
    where = os.fspath(root).rstrip("/") or "/"
    if (folder := local_root(where)) is not None:
        if not folder.is_dir():
            return None
        names = sorted(p.name for p in folder.iterdir() if (p / MARKER).is_file())
    else:
        store = open_store(where, storage_options)
        with translate(where):
            listed = obstore.list_with_delimiter(store)
        names = sorted(p.rstrip("/").rpartition("/")[2] for p in listed["common_prefixes"])

    def step_of(name: str) -> tuple[int, str] | None:
        try:
            info = read_info(join(where, name), storage_options)
        except WmtpError:
            return None
        return None if info is None else (info.step, name)

    with ThreadPoolExecutor(8) as pool:
        found = [s for s in pool.map(step_of, names) if s is not None]
    return join(where, max(found)[1]) if found else None


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    like: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    storage_options: StorageOptions | None = None,
) -> str:
    """Write the trained weights of `checkpoint` as a model folder that `wmtp.load` reads
    back: the model's tensors as `model.safetensors` (tied weights once), and `config.json`,
    the module file, the tokenizer files and the metadata (`wmtp_type`,
    `algorithm_compatibility`...) of the model folder `like`, with an integrity manifest.

    The model is never built: the tensors are read from the checkpoint one at a time and
    streamed into the file, so memory holds the largest tensor, not the model. The file uses
    the model's own key names, and the metadata an identity key mapping.

    Args:
        checkpoint: a checkpoint folder `save_checkpoint` wrote (path or URL).
        dest: the model folder to write (path or URL; a URL is written locally, then uploaded
            with `metadata.json` last).
        like: the model folder the checkpoint was trained from (path or URL).
        dtype: cast floating tensors to this ("bf16", `torch.float16`...); None keeps them.
        storage_options: obstore options for URLs, as for `wmtp.load`.

    Returns:
        `dest` as given.

    Raises:
        ModelFileError: no checkpoint, or no `like` folder.
        WeightsError: the checkpoint's tensors do not fit the model of `like` (keys, shapes).
        OptionError: a bad `dtype`.

    Example:
        >>> wmtp.export_checkpoint("ckpt/step-000300", "models/mtp-trained",
        ...                        like="models/distilgpt2-mtp", dtype="bf16")
        'models/mtp-trained'
    """
    from wmtp.export import export

    return export(os.fspath(checkpoint), os.fspath(dest), os.fspath(like), dtype, storage_options)


def _wait_pending() -> None:
    """Let the background save in flight finish first (DCP saves one at a time)."""
    while _pending:
        with suppress(Exception):  # its caller sees its error through its future
            _pending.pop().result()


def _ranks() -> tuple[Any, int, int]:
    """The gloo group of checkpoint collectives (None without a process group), this rank
    and the world size. A group apart from the training's: a background save talks on it from
    its own thread while training runs collectives on the default group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    default = dist.group.WORLD
    if not _groups or _groups[0] is not default:
        _groups[:] = [default, dist.new_group(backend="gloo")]  # every rank: a collective
    return _groups[1], dist.get_rank(), dist.get_world_size()


@contextmanager
def _agreed(group: Any, what: str) -> Iterator[None]:
    """Run the block, then have every rank learn whether any rank failed: all raise, the
    failing rank its own error and the others one naming it. So no rank goes on into a
    collective that a failed rank will never join."""
    failure: Exception | None = None
    try:
        yield
    except Exception as e:  # told to every rank below, then raised
        failure = e
    if group is not None:
        import torch.distributed as dist

        said: list[Any] = [None] * dist.get_world_size(group)
        text = None if failure is None else f"{type(failure).__name__}: {failure}"
        dist.all_gather_object(said, text, group=group)
        if failure is None and (other := next(((r, m) for r, m in enumerate(said) if m), None)):
            raise WmtpError(f"rank {other[0]} failed to {what}: {other[1]}")
    if failure is not None:
        raise failure


def _class_name(model: torch.nn.Module) -> str:
    from wmtp.gather import original_class

    return original_class(model).__name__


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """What DCP saves: the model's state dict and the optimizer's, flattened to one key per
    tensor (`state.<param>.exp_avg`, `param_groups.<param>.lr`), as `get_state_dict` gives
    them for this parallelism (DTensor shards under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        try:
            state["optim"] = get_optimizer_state_dict(model, optimizer, options=_flat())
        except (KeyError, ValueError, RuntimeError) as e:
            raise OptionError(f"the optimizer does not belong to this model: {e!r}") from None
    return state


def _flat() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _clear(
    location: str,
    root: Path | None,
    store: ObjectStore | None,
    overwrite: bool,
    options: StorageOptions | None,
) -> None:
    """Refuse to replace a complete checkpoint unless `overwrite`; then delete what an earlier
    save left (`checkpoint.json` first), so old files never mix with the new ones."""
    if (info := read_info(location, options)) is not None and not overwrite:
        raise OptionError(
            f"{location} already holds a complete checkpoint (step {info.step}); pass "
            "overwrite=True to replace it, or save each checkpoint in a folder of its own"
        )
    if root is not None:
        with translate(str(root)):
            root.mkdir(parents=True, exist_ok=True)
            if (root / MARKER).exists():
                (root / MARKER).unlink()
                sync_folder(root)
            for old in root.iterdir():
                if old.name == DCP_METADATA or old.name.endswith((".distcp", ".tmp")):
                    old.unlink()
        return
    assert store is not None
    if info is not None:
        with translate(join(location, MARKER)):
            obstore.delete(store, MARKER)
    with translate(location):
        listed = obstore.list_with_delimiter(store)
        paths = [str(o["path"]) for o in listed["objects"]]
        if left := [p for p in paths if p == DCP_METADATA or p.endswith(".distcp")]:
            obstore.delete(store, left)


def _finish(
    location: str,
    root: Path | None,
    store: ObjectStore | None,
    staging: Path,
    saved: DcpMetadata,
    info: CheckpointInfo,
    group: Any,
    rank: int,
) -> None:
    """After DCP's save (every rank's files written and fsynced, `.metadata` by rank 0): each
    rank uploads its own files to a bucket; then rank 0 writes `checkpoint.json`, last."""
    from wmtp.save import _upload

    sizes: dict[str, int] = {}
    for item in saved.storage_data.values():
        sizes[item.relative_path] = max(sizes.get(item.relative_path, 0), item.offset + item.length)
    with _agreed(group, "upload its checkpoint files"):
        if store is not None:  # this rank's files, at once
            with ThreadPoolExecutor(WRITE_THREADS) as pool:
                names = sorted(p.name for p in staging.glob("*.distcp"))
                list(pool.map(lambda name: _upload(store, location, staging, name), names))
    with _agreed(group, f"write {join(location, MARKER)}"), translate(location):
        if rank != 0:
            return
        sizes[DCP_METADATA] = (staging / DCP_METADATA).stat().st_size
        data = msgspec.json.format(
            msgspec.json.encode(msgspec.structs.replace(info, files=sizes)), indent=2
        )
        if store is not None:
            _upload(store, location, staging, DCP_METADATA)
            with translate(join(location, MARKER)):
                obstore.put(store, MARKER, data + b"\n")
        else:
            assert root is not None
            sync_folder(root)  # the names of DCP's files, durable before the marker's
            tmp = root / f".{MARKER}.{os.getpid()}.tmp"
            with tmp.open("wb") as f:
                f.write(data + b"\n")
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(root / MARKER)
            sync_folder(root)


def _mismatch(
    source: str,
    what: str,
    expected: Mapping[str, tuple[Any, ...] | None],
    found: Mapping[str, tuple[Any, ...] | None],
    optional: Sequence[str] = (),
) -> WeightsError | None:
    """A `WeightsError` naming `source` and every key that differs between the model's
    `expected` and the checkpoint's `found` ((shape, dtype), or None for a value), or None.
    Keys in `optional` may be missing (a tied name stored under another)."""
    missing = sorted(k for k in expected if k not in found and k not in optional)
    unexpected = sorted(k for k in found if k not in expected)
    shapes = sorted(k for k in expected if k in found and expected[k] != found[k])
    if not (missing or unexpected or shapes):
        return None

    def named(keys: Sequence[str]) -> str:
        shown = ", ".join(repr(k) for k in keys[:LISTED])
        return shown + (f", … and {len(keys) - LISTED} more" if len(keys) > LISTED else "")

    lines = [f"checkpoint {source} does not fit {what}; nothing was changed:"]
    if missing:
        lines.append(f"  {len(missing)} missing (in the model, not in the checkpoint): ")
        lines[-1] += named(missing)
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected (in the checkpoint, not in the model): ")
        lines[-1] += named(unexpected)
    for key in shapes[:LISTED]:
        theirs, mine = _shown(found[key]), _shown(expected[key])
        lines.append(f"  {key!r}: the checkpoint has {theirs}, the model {mine}")
    if len(shapes) > LISTED:
        lines.append(f"  … and {len(shapes) - LISTED} more of another shape or dtype")
    lines.append("hint: resume with the model (and optimizer) built as they were when saved")
    return WeightsError("\n".join(lines))  # fmt: skip


def _shown(sig: tuple[Any, ...] | None) -> str:
    return "a value (not a tensor)" if sig is None else f"{sig[1]} {list(sig[0])}"


def _tied_aliases(model: torch.nn.Module, keys: Sequence[str]) -> list[str]:
    """Names among `keys` that share their tensor with another of `keys` (tied weights)."""
    import torch

    first: dict[int, str] = {}
    aliases = []
    state = model.state_dict(keep_vars=True)
    for key in keys:
        tensor = state.get(key)
        if isinstance(tensor, torch.Tensor):
            if id(tensor) in first:
                aliases.append(key)
            first.setdefault(id(tensor), key)
    return aliases


def _load_dcp(
    location: str,
    info: CheckpointInfo,
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    group: Any,
) -> TrainingState:
    import torch
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load
    from torch.distributed.tensor import DTensor

    with _agreed(group, f"check checkpoint {location}"):  # nothing changed yet
        saved = read_dcp_metadata(folder / DCP_METADATA, join(location, DCP_METADATA))
        if unknown := {i.relative_path for i in saved.storage_data.values()} - info.files.keys():
            raise MetadataError(f"{join(location, DCP_METADATA)} names files that {MARKER} "
                                f"does not list: {sorted(unknown)}")  # fmt: skip
        own = get_model_state_dict(model)
        want = {k: signature(v) for k, v in own.items()}
        what = f"{_class_name(model)} (saved from {info.model})"
        if error := _mismatch(location, what, want, stored_keys(saved, "model.")):
            raise error
        if optimizer is not None:
            _check_kind(location, info, optimizer)
    # Read into tensors of the model's own layout (DTensor shards alike), applied once all
    # is read; a fresh optimizer's state is made here and dropped again if anything fails.
    buffers = {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v for k, v in own.items()}
    state: dict[str, Any] = {"model": buffers}
    stored = stored_keys(saved, "optim.")
    plain = None if optimizer is None else _optimizer_buffers(location, model, optimizer, stored)
    fresh = optimizer is not None and not optimizer.state and plain is None
    try:
        with _agreed(group, f"check the optimizer state of checkpoint {location}"):
            if plain is not None:
                state["optim"] = plain[0]
            elif optimizer is not None:
                osd = get_optimizer_state_dict(model, optimizer, options=_flat())  # fresh: inits
                have = {k: signature(v) for k, v in osd.items()}
                kind = type(optimizer).__name__
                if error := _mismatch(location, f"{kind} state", have, stored):
                    raise error
                if not fresh:  # its own state stays as it is until all is read
                    osd = {
                        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in osd.items()
                    }
                state["optim"] = osd
        with dcp_errors(f"reading checkpoint {location}"):
            load(state, storage_reader=dcp_reader(folder, location), planner=safe_planner(),
                     process_group=group, no_dist=group is None)  # fmt: skip
    except BaseException:
        if fresh and optimizer is not None:
            optimizer.state.clear()
        raise
    named: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    named |= dict(model.named_buffers(remove_duplicate=False))
    rest = {}
    with torch.no_grad():
        for key, tensor in buffers.items():
            target = named.get(key)
            if (
                isinstance(target, torch.Tensor)
                and isinstance(tensor, torch.Tensor)
                and not isinstance(target, DTensor)
                and signature(target) == signature(tensor)
                and target.device == tensor.device
            ):
                target.data = tensor  # the read tensor itself: no copy (the Parameter is kept)
            else:
                rest[key] = tensor
    if rest:  # DTensor shards (FSDP2) and names a wrapper renames: copied in by torch
        set_model_state_dict(model, rest, options=_options(strict=False))
    if plain is not None and optimizer is not None:
        optimizer.load_state_dict(plain[1](state["optim"]))
    elif optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_flat())
    return TrainingState(info.step, info.epoch, dict(info.extra))


def _optimizer_buffers(
    location: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stored: Mapping[str, tuple[Any, ...] | None],
) -> tuple[dict[str, Any], Callable[[dict[str, Any]], dict[str, Any]]] | None:
    """Tensors to read the optimizer's saved state into, made from the checkpoint's metadata
    (a parameter's own layout for a state of its shape: DTensor shards alike), and how to turn
    them into the state dict `optimizer.load_state_dict` takes. `get_optimizer_state_dict` /
    `set_optimizer_state_dict` would first run a step of a fresh optimizer with zero gradients
    to make its state, writing every weight (copying each mapped page of a model from
    `wmtp.load`; DTensor arithmetic under FSDP2) for nothing. None for names this path does not
    know (a wrapper's): the caller uses torch's. Raises `WeightsError` when the saved state does
    not fit (settings of another kind, shapes)."""
    import torch

    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(id(p) not in names for p in params):
        return None
    fqns = [names[id(p)] for p in params]
    saved: dict[str, dict[str, tuple[Any, ...] | None]] = {}
    for key, sig in stored.items():
        part, _, rest = key.partition(".")
        fqn, _, name = rest.rpartition(".")
        saved.setdefault(f"{part}.{fqn}", {})[name] = sig
    if not all(f"param_groups.{fqn}" in saved for fqn in fqns):
        return None  # names a wrapper changes: torch's path maps them
    kind, wrong = type(optimizer).__name__, []
    for group in optimizer.param_groups:
        settings = set(group) - {"params"}
        for param in group["params"]:
            fqn = names[id(param)]
            if set(saved[f"param_groups.{fqn}"]) != settings:
                theirs = sorted(set(saved[f"param_groups.{fqn}"]) ^ settings)
                raise WeightsError(f"checkpoint {location} holds the state of an optimizer of "
                                   f"another kind than {kind} (settings {', '.join(theirs)} "
                                   "differ); build the optimizer it was saved with")  # fmt: skip
            for name, sig in saved.get(f"state.{fqn}", {}).items():
                if sig is None or (sig[0] and tuple(sig[0]) != tuple(param.shape)):
                    wrong.append(f"state.{fqn}.{name}")
    if unknown := sorted(k for k in saved if k.partition(".")[2] not in fqns):
        wrong += unknown
    if wrong:
        raise WeightsError(
            f"checkpoint {location}: {kind} state that does not fit the model's parameters: "
            f"{', '.join(wrong[:LISTED])}; nothing was changed"
        )
    by_name = {names[id(p)]: p for p in params}

    def buffer(key: str, sig: tuple[Any, ...] | None) -> Any:
        if sig is None:
            return None  # a setting, filled by the reader
        param, kind = by_name[key.partition(".")[2].rpartition(".")[0]], getattr(torch, sig[1])
        if key.startswith("state.") and tuple(sig[0]) == tuple(param.shape):
            return torch.empty_like(param, dtype=kind)  # its layout: a DTensor's shards too
        return torch.empty(sig[0], dtype=kind)

    buffers = {key: buffer(key, sig) for key, sig in stored.items()}

    def as_state_dict(read: dict[str, Any]) -> dict[str, Any]:
        index = {fqn: i for i, fqn in enumerate(fqns)}
        state = {index[fqn]: {n: read[f"state.{fqn}.{n}"] for n in saved.get(f"state.{fqn}", {})}
                 for fqn in fqns if f"state.{fqn}" in saved}  # fmt: skip
        groups = []
        for group in optimizer.param_groups:
            first = names[id(group["params"][0])]
            settings = {
                n: read[f"param_groups.{first}.{n}"] for n in saved[f"param_groups.{first}"]
            }
            groups.append(settings | {"params": [index[names[id(p)]] for p in group["params"]]})
        return {"state": state, "param_groups": groups}

    return buffers, as_state_dict


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def _check_kind(location: str, info: CheckpointInfo, optimizer: torch.optim.Optimizer) -> None:
    kind = type(optimizer).__name__
    if info.optimizer is None:
        raise WeightsError(f"checkpoint {location} holds no optimizer state (it was saved with "
                           f"the model alone); load it without the {kind}, or resume from "
                           "another checkpoint")  # fmt: skip
    if info.optimizer != kind:
        raise WeightsError(f"checkpoint {location} holds {info.optimizer} state, not {kind} "
                           f"state; build a {info.optimizer} to resume, or load the model "
                           "alone (optimizer=None)")  # fmt: skip


# The old trainer's single-file checkpoints.


def _torch_load(path: Path, source: str) -> Any:
    """`torch.load(weights_only=True)` of an old checkpoint file: tensors and plain values
    only; a pickle that would run code is a `MetadataError` and never runs."""
    import torch

    try:
        with translate(source):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # the legacy (not zip) format cannot be mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MetadataError(
            f"{source}: this file holds a pickle that would run code when loaded, refused "
            f"(nothing ran): {first}. A checkpoint holds tensors and plain values only; if you "
            "trust the file, convert it yourself and save it with wmtp.save_checkpoint"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise MetadataError(f"{source}: not a readable torch checkpoint: {e}") from None


def _load_old(
    location: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    group: Any,
    options: StorageOptions | None,
) -> TrainingState:
    import torch
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    with _agreed(group, f"read checkpoint {location}"):
        if (path := local_root(location)) is None:
            from wmtp.store import fetch

            parent, _, name = location.rstrip("/").rpartition("/")
            path = fetch(parent, [name], storage_options=options)[name]
        elif not path.is_file():
            raise ModelFileError(f"checkpoint file {location} does not exist")
        data = _torch_load(path, location)
        if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
            raise MetadataError(f"{location}: not a checkpoint dict with a 'model' state dict")
        tensors = dict(data["model"])
        own = get_model_state_dict(model)
        want = {k: signature(v) for k, v in own.items()}
        found = {k: signature(v) for k, v in tensors.items()}
        optional = _tied_aliases(model, list(own))
        if error := _mismatch(location, _class_name(model), want, found, optional):
            raise error
        for alias in optional:  # a tied name the file stores once, under the other name
            if alias not in tensors:
                state = model.state_dict(keep_vars=True)
                twin = next(k for k in own if state[k] is state[alias] and k in tensors)
                tensors[alias] = tensors[twin]
        moved = None
        if optimizer is not None:
            if not isinstance(data.get("optimizer"), Mapping):
                raise WeightsError(f"checkpoint {location} holds no optimizer state; load it "
                                   "without the optimizer (optimizer=None)")  # fmt: skip
            moved = _old_optimizer(location, model, optimizer, data["optimizer"])
    set_model_state_dict(model, tensors, options=_options(full_state_dict=True, strict=True))
    if moved is not None and optimizer is not None:
        from wmtp.gather import is_sharded

        numbered = all(isinstance(k, int) for k in data["optimizer"]["state"])
        if numbered and not is_sharded(model):  # as it was saved: types kept (betas a tuple)
            optimizer.load_state_dict(data["optimizer"])
        else:  # by parameter name, each rank taking its shards
            set_optimizer_state_dict(
                model, optimizer, moved, options=_options(full_state_dict=True)
            )
    known = ("model", "optimizer", "step", "epoch")
    extra = {k: v for k, v in data.items() if k not in known}
    step, epoch = data.get("step", 0), data.get("epoch", 0)
    as_int = [int(v) if isinstance(v, int | float | torch.Tensor) else 0 for v in (step, epoch)]
    return TrainingState(as_int[0], as_int[1], extra)


def _old_optimizer(
    location: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: Any
) -> dict[str, Any]:
    """The old file's optimizer state, keyed by parameter names as `set_optimizer_state_dict`
    takes it (a plain `optimizer.state_dict()` numbers the parameters in group order), once it
    fits `optimizer`: the same kind (hyperparameter names) and every tensor the shape of its
    parameter."""
    import torch

    groups, states = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, Sequence) or not isinstance(states, Mapping):
        raise MetadataError(f"{location}: 'optimizer' has no 'state' and 'param_groups'")
    kind = type(optimizer).__name__
    names = {id(p): n for n, p in model.named_parameters()}
    mine = [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]
    theirs = [list(g.get("params", [])) for g in groups]
    if [len(g) for g in theirs] != [len(g) for g in mine]:
        raise WeightsError(
            f"checkpoint {location}: its optimizer has parameter groups of "
            f"{[len(g) for g in theirs]} parameters, the {kind} {[len(g) for g in mine]}; build "
            "the optimizer over the same parameters, in the same groups"
        )
    hyper = {k for g in optimizer.param_groups for k in g} - {"params"}
    if other := sorted({k for g in groups for k in g} - {"params"} - hyper):
        raise WeightsError(
            f"checkpoint {location} holds the state of an optimizer of another kind than "
            f"{kind} (its settings {', '.join(other)} are not {kind}'s); build the optimizer "
            "it was saved with, or load the model alone (optimizer=None)"
        )
    rename = {old: new for g_old, g_new in zip(theirs, mine, strict=True)
              for old, new in zip(g_old, g_new, strict=True)}  # fmt: skip
    params = dict(model.named_parameters())
    full = {n: tuple(p.shape) for n, p in params.items()}  # a DTensor's: the global shape
    out_state, wrong = {}, []
    for old, entry in states.items():
        name = str(rename.get(old, old))
        for key, value in dict(entry).items():
            if (
                isinstance(value, torch.Tensor)
                and value.dim()
                and tuple(value.shape) != full.get(name)
            ):
                wrong.append(f"{name}.{key}")
        out_state[name] = entry
    if unknown := sorted(str(n) for n in out_state if n not in params):
        wrong += unknown
    if wrong:
        raise WeightsError(
            f"checkpoint {location}: optimizer state that does not fit the model's parameters: "
            f"{', '.join(wrong[:LISTED])}; nothing was changed"
        )
    out_groups = [dict(g) | {"params": names_} for g, names_ in zip(groups, mine, strict=True)]
    return {"state": out_state, "param_groups": out_groups}
