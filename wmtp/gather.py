"""Safetensors files written tensor by tensor: shards with a `model.safetensors.index.json`
(as transformers writes them), and models whose parameters are FSDP2 / DTensor shards gathered
one full tensor at a time, so memory holds the largest tensor, never the model. Used by
`wmtp.save` (`max_shard_size=`, models from `load(parallelize=...)`) and `export_checkpoint`."""

from __future__ import annotations

import contextvars
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec

from wmtp.errors import OptionError, WmtpError
from wmtp.location import translate
from wmtp.weights import DTYPES

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
Get = Callable[[str], "torch.Tensor"]  # the tensor of a name, gathered whole
INDEX: Final = "model.safetensors.index.json"
CODES: Final = {torch_name: code for code, torch_name in DTYPES.items()}  # float32 -> F32
UNITS: Final = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12} | {
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40
}  # fmt: skip


class Entry(msgspec.Struct, frozen=True):
    """One tensor to write: its name in the file, dtype (torch name), shape and byte count."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def parse_size(size: int | str) -> int:
    """Bytes from an int or a size like transformers takes ("5GB", "200MB", "1.5GiB").

    Args:
        size: a positive number of bytes, or a number with a unit (B, KB, MB, GB, TB: powers
            of 1000; KiB, MiB, GiB, TiB: powers of 1024), case-insensitive.

    Raises:
        OptionError: not a positive size.

    Example:
        >>> parse_size("200MB")
        200000000
    """
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    unit = found.group(2).upper() if found else ""
    if found is None or unit not in UNITS or (value := float(found.group(1)) * UNITS[unit]) < 1:
        raise OptionError(f"max_shard_size={size!r} is not a size; use bytes or '200MB', '5GB'")
    return int(value)


def original_class(model: torch.nn.Module) -> type[torch.nn.Module]:
    """The model's own class: FSDP2 swaps `type(model)` for a class it makes on the fly
    (`FSDPDistilGPT2MTP`, defined in torch), whose bases hold the real one.

    Args:
        model: any module, sharded or not.

    Raises:
        Nothing: a plain model's class is its own.

    Example:
        >>> original_class(fsdp_model).__name__  # type(fsdp_model).__name__: 'FSDPDistilGPT2MTP'
        'DistilGPT2MTP'
    """
    return next(c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed"))


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter or buffer of `model` is a DTensor (FSDP2, tensor parallel).

    Args:
        model: any module.

    Raises:
        Nothing: torch.distributed is imported only when a tensor's type says DTensor.

    Example:
        >>> is_sharded(wmtp.load("examples/tiny-mtp"))
        False
    """
    tensors = [*model.parameters(), *model.buffers()]
    if not any(type(t).__name__ == "DTensor" for t in tensors):  # no torch.distributed import
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def _entries(model: torch.nn.Module) -> tuple[list[Entry], dict[str, torch.Tensor]]:
    """The tensors `model.state_dict()` holds, tied ones once (the first name), with their full
    shapes (a DTensor's global one); and the tensor (or DTensor) of each name kept."""
    seen: set[int] = set()
    out, tensors = [], {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        shape, dtype = tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")
        out.append(Entry(name, dtype, shape, tensor.numel() * tensor.element_size()))
        tensors[name] = tensor
    return out, tensors


def _plan_shards(items: Sequence[Entry], max_shard_size: int | None) -> list[list[Entry]]:
    """The tensors in file order, cut into shards of at most `max_shard_size` bytes (a tensor
    larger than that alone in its shard, as transformers does); one file when None."""
    if max_shard_size is None:
        return [list(items)]
    shards: list[list[Entry]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _shard_names(shards: Sequence[Sequence[Entry]]) -> list[str]:
    """`model.safetensors`, or transformers' `model-00001-of-00003.safetensors` names."""
    if len(shards) == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]


def _header(items: Sequence[Entry]) -> bytes:
    """The safetensors header of `items` stored back to back in that order: its 8-byte length,
    then the JSON, padded with spaces to a multiple of 8 bytes."""
    table: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in items:
        if item.dtype not in CODES:
            raise OptionError(
                f"tensor {item.name!r} has dtype {item.dtype}, which safetensors lacks"
            )
        table[item.name] = {"dtype": CODES[item.dtype], "shape": list(item.shape),
                            "data_offsets": [offset, offset + item.nbytes]}  # fmt: skip
        offset += item.nbytes
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of `tensor` in C order, little-endian as safetensors stores them (no copy when
    it is contiguous already)."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy().data) if flat.numel() else memoryview(b"")


def sync_folder(folder: Path) -> None:
    """Make the names in `folder` durable (files created, renamed or removed there)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path | None, items: Sequence[Entry], get: Get) -> None:
    """Write `items` into `path` through a temporary name: the header, each tensor as `get`
    gives it, fsync, rename; with None, only ask `get` for each in order. A failure is raised
    once every tensor was asked for: in a collective save, the other ranks wait on each gather.
    """
    error: Exception | None = None
    tmp = None if path is None else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    file = None
    try:
        if tmp is not None:
            file = tmp.open("wb")
            file.write(_header(items))
    except (OSError, WmtpError) as e:
        error = e
    for item in items:
        tensor = get(item.name)  # the largest tensor at a time, never two
        if file is not None and error is None:
            error = _append(file, item, tensor)
        del tensor
    try:
        if file is not None and error is None:
            file.flush()
            os.fsync(file.fileno())
    except OSError as e:
        error = e
    finally:
        if file is not None:
            file.close()
    if tmp is None or path is None:
        return
    if error is not None:
        tmp.unlink(missing_ok=True)
        with translate(str(path)):
            raise error
    with translate(str(path)):
        tmp.chmod(0o644)  # a model folder is meant to be shared
        tmp.replace(path)


def _append(file: Any, item: Entry, tensor: torch.Tensor) -> Exception | None:
    """Write `tensor`'s bytes, if it is the planned `item`; the failure, if any."""
    if tuple(tensor.shape) != item.shape or str(tensor.dtype)[6:] != item.dtype:
        got = f"{tensor.dtype} {tuple(tensor.shape)}"
        return WmtpError(f"{item.name}: {got} is not the planned {item.dtype} {item.shape}")
    try:
        file.write(_tensor_bytes(tensor))
    except (OSError, RuntimeError) as e:
        return e
    return None


def write_files(
    folder: Path | None,
    shards: Sequence[Sequence[Entry]],
    get: Callable[[str], torch.Tensor],
) -> list[str]:
    """Write the `shards` into `folder`, asking `get` for one tensor at a time (a collective for
    a DTensor: every rank calls this in the same order, `folder` None on all but the writer),
    then the index when there are several; the names of the files, index first.

    Args:
        folder: where to write (an existing folder), or None to only call `get` in order.
        shards: the tensors of each file, in file order (one list: `model.safetensors`).
        get: the tensor of a name, of the planned dtype and shape.

    Raises:
        FetchError: a file could not be written (named); WmtpError: `get` gave a tensor of
            another dtype or shape than planned.

    Example:
        >>> write_files(Path("out"), [[Entry("w", "float32", (2, 2), 16)]], lambda n: torch.eye(2))
        ['model.safetensors']
    """
    names = _shard_names(shards)
    for name, shard in zip(names, shards, strict=True):
        _write_file(None if folder is None else folder / name, shard, get)
    if len(names) == 1:
        return names
    if folder is not None:
        weight_map = {i.name: n for n, shard in zip(names, shards, strict=True) for i in shard}
        total = sum(i.nbytes for shard in shards for i in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        tmp = folder / f".{INDEX}.{os.getpid()}.tmp"
        with translate(str(folder / INDEX)):
            tmp.write_text(json.dumps(index, indent=2) + "\n")
            tmp.replace(folder / INDEX)
    return [INDEX, *names]


def weight_names(model: torch.nn.Module, max_shard_size: int | str | None) -> list[str]:
    """The files `write_weights` will write for `model` (index first when sharded).

    Args:
        model: the model to save; max_shard_size: as `parse_size` takes, or None.

    Raises:
        OptionError: `max_shard_size` is not a size, or a tensor has a dtype safetensors lacks.

    Example:
        >>> weight_names(model, "200MB")
        ['model.safetensors.index.json', 'model-00001-of-00004.safetensors', ...]
    """
    size = None if max_shard_size is None else parse_size(max_shard_size)
    names = _shard_names(_plan_shards(_entries(model)[0], size))
    return names if len(names) == 1 else [INDEX, *names]


def write_weights(model: torch.nn.Module, folder: Path, max_shard_size: int | str | None) -> None:
    """Write the tensors of `model` into `folder` as `weight_names` says: safetensors' own
    `save_model` for one file of a plain model; else streamed, a DTensor gathered whole one at
    a time (a collective: `save_collective` has every other rank take part).

    Args:
        model: the model; folder: an existing folder; max_shard_size: as for `weight_names`.

    Raises:
        FetchError: a file could not be written; OptionError: as `weight_names`.

    Example:
        >>> write_weights(model, Path("out/mtp"), "200MB")
    """
    if max_shard_size is None and not is_sharded(model):
        from safetensors.torch import save_model

        tmp = folder / f".model.safetensors.{os.getpid()}.tmp"
        save_model(model, str(tmp))
        tmp.chmod(0o644)  # safetensors creates it private; a model folder is meant to be shared
        tmp.replace(folder / "model.safetensors")
        return
    _stream(model, folder, max_shard_size)


def _stream(model: torch.nn.Module, folder: Path, max_shard_size: int | str | None) -> None:
    items, tensors = _entries(model)
    size = None if max_shard_size is None else parse_size(max_shard_size)
    lead = _LEAD.get()

    def get(name: str) -> torch.Tensor:
        full = _full(tensors[name])
        if lead is not None:
            lead.gathered += 1
        return full

    write_files(folder, _plan_shards(items, size), get)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class _Lead(msgspec.Struct):
    """Rank 0's count of the gathers its save has run (in `entries` order)."""

    gathered: int = 0


# Set while rank 0 runs the body of a collective `save`: its nested call writes, gathering.
_LEAD: contextvars.ContextVar[_Lead | None] = contextvars.ContextVar("wmtp_lead", default=None)


def save_collective(model: torch.nn.Module, run: Callable[[], T]) -> T | None:
    """Run `save`'s body (`run`) for a model with DTensor parameters under a process group, on
    every rank: rank 0 writes (gathering each full tensor as it writes it), the other ranks take
    part in each gather, in the same order; then all return rank 0's answer, or all raise its
    error. When rank 0 fails before or during its gathers, it runs the rest of them anyway,
    writing nothing, so no rank waits for a gather that would never come. None when `model`
    needs no collective, or on rank 0's own nested call: the caller then saves as usual.

    Args:
        model: the model being saved; run: the rest of `save`, on rank 0.

    Raises:
        Rank 0's error on rank 0; on the others, a `WmtpError` naming rank 0 and its error (or
        their own error, if a gather failed there).

    Example (the first lines of `wmtp.save`):
        >>> if (answer := save_collective(model, lambda: save(**args))) is not None:
        ...     return answer
    """
    import torch.distributed as dist

    if _LEAD.get() is not None or not dist.is_initialized() or not is_sharded(model):
        return None
    items, tensors = _entries(model)
    outcome: tuple[str, Any] = ("ok", None)
    if dist.get_rank() == 0:
        token = _LEAD.set(lead := _Lead())
        try:
            outcome = ("ok", run())
        except Exception as e:  # told to every rank below, then raised
            outcome = ("error", e)
        finally:
            _LEAD.reset(token)
        for item in items[lead.gathered :]:
            _full(tensors[item.name])
    else:
        try:
            for item in items:
                _full(tensors[item.name])
        except Exception as e:
            outcome = ("error", e)
    said: list[Any] = [outcome if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(said, src=0)
    if outcome[0] == "error":
        raise outcome[1]
    if said[0][0] == "error":
        error = said[0][1]
        raise WmtpError(f"rank 0 failed to save: {type(error).__name__}: {error}")
    result: T = said[0][1]
    return result
