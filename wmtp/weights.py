"""Checkpoint tensors from safetensors files: headers validated alone, data memory-mapped.

safetensors' own loader copies every tensor; this reader earns its lines by mapping the file
privately (no copy, nothing read until used, writes never reach the file) and by releasing
each tensor's pages as it is cast, so a cast never holds the checkpoint twice. Headers are
checked by the format's own rules before any weight is read, from two small ranged reads.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import msgspec
import obstore

from wmtp.errors import MetadataError
from wmtp.metadata import INDEX, SAFETENSORS, RelPath
from wmtp.store import StorageOptions, join, open_store, translate

if TYPE_CHECKING:
    import torch

# safetensors dtype -> torch dtype and bytes per element
DTYPES: Final = {
    code: (name, int(size))
    for code, name, size in (
        entry.split(":")
        for entry in "F64:float64:8 F32:float32:4 F16:float16:2 BF16:bfloat16:2 "
        "F8_E4M3:float8_e4m3fn:1 F8_E5M2:float8_e5m2:1 I64:int64:8 I32:int32:4 I16:int16:2 "
        "I8:int8:1 U64:uint64:8 U32:uint32:4 U16:uint16:2 U8:uint8:1 BOOL:bool:1".split()
    )
}
_MAX_HEADER: Final = 100 * 2**20  # safetensors' own limit
Count = Annotated[int, msgspec.Meta(ge=0)]


class TensorInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One tensor of a safetensors header."""

    dtype: str
    shape: tuple[Count, ...]
    data_offsets: tuple[Count, Count]


class Header(msgspec.Struct, frozen=True):
    """A validated safetensors header: its tensors, where their data starts, the file size."""

    tensors: dict[str, TensorInfo]
    start: int
    size: int


def shard_names(index: Path) -> list[str]:
    """The shard files a `*.safetensors.index.json` lists, in order of first use.

    Raises:
        MetadataError: not an index, or a shard name that is not a path inside the folder.
    """
    try:
        decoded = msgspec.json.decode(index.read_bytes(), type=dict[str, dict[str, RelPath]])
        return list(dict.fromkeys(decoded["weight_map"].values()))
    except (msgspec.MsgspecError, KeyError) as e:
        raise MetadataError(f"{index}: not a safetensors shard index: {e!r}") from None


def checkpoint_names(required: Sequence[str], files: Mapping[str, Path]) -> list[str]:
    """The safetensors files to read, in order: those listed and the shards of listed indexes
    (whose local copies are in `files`)."""
    shards = [s for n in required if n.endswith(INDEX) for s in shard_names(files[n])]
    return [n for n in dict.fromkeys([*required, *shards]) if n.endswith(SAFETENSORS)]


def read_header(
    location: str, name: str, size: int, storage_options: StorageOptions | None = None
) -> Header:
    """The validated header of a safetensors file of `size` bytes, from two ranged reads.

    Raises:
        MetadataError: not a safetensors file, or one that safetensors itself refuses
            (offsets overlapping, out of bounds or not matching shape x dtype, truncated
            data, trailing bytes, unknown dtypes); the message names the file and tensor.
        ModelFileError, StoreAccessError, FetchError: as for any read.
    """
    store, url = open_store(location, storage_options), join(location, name)
    with translate(url):
        prefix = bytes(obstore.get_range(store, name, start=0, end=8)) if size >= 8 else b""
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or not 2 <= length <= min(_MAX_HEADER, size - 8):
            raise MetadataError(
                f"{url}: not a safetensors file (header length {length}, file size {size})"
            )
        raw = bytes(obstore.get_range(store, name, start=8, end=8 + length))
    return Header(_tensors(raw, url, size - 8 - length), 8 + length, size)


def _tensors(raw: bytes, url: str, data_size: int) -> dict[str, TensorInfo]:
    try:
        table = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
        msgspec.json.decode(table.pop("__metadata__", b"{}"), type=dict[str, str])
        tensors = {k: msgspec.json.decode(v, type=TensorInfo) for k, v in table.items()}
    except msgspec.MsgspecError as e:
        raise MetadataError(f"{url}: not a safetensors header: {e}") from None
    end = 0  # the data of the tensors, sorted by offset, must tile the data section exactly
    for key, info in sorted(tensors.items(), key=lambda item: item[1].data_offsets):
        if info.dtype not in DTYPES:
            raise MetadataError(f"{url}: tensor {key!r} has unknown dtype {info.dtype!r}")
        start, stop = info.data_offsets
        nbytes = math.prod(info.shape) * DTYPES[info.dtype][1]
        if start != end or stop - start != nbytes:
            raise MetadataError(
                f"{url}: tensor {key!r} has data_offsets [{start}, {stop}], but its data must "
                f"start at {end} and hold {nbytes} bytes ({info.dtype} {list(info.shape)}); "
                "the file is corrupt (safetensors refuses it too)"
            )
        end = stop
    if end != data_size:
        raise MetadataError(
            f"{url}: the tensors hold {end} bytes of data, but the file has {data_size} after "
            "its header; it is truncated or has bytes no tensor owns"
        )
    return tensors


def read_tensors(
    files: Sequence[tuple[Path, Header]], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the local safetensors `files` (keys already checked unique).

    Each tensor is a view of a private memory map of its file. With `dtype`, floating
    tensors are cast one at a time and the mapped pages each came from released at once,
    so memory holds the cast model plus one tensor, never the checkpoint twice.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for path, header in files:
        with path.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if len(mapped) != header.size:
            raise MetadataError(f"{path} changed while it was being loaded; load it again")
        for key, info in header.tensors.items():
            start, end = (header.start + offset for offset in info.data_offsets)
            kind: torch.dtype = getattr(torch, DTYPES[info.dtype][0])
            tensor = (
                torch.frombuffer(
                    mapped, dtype=kind, count=(end - start) // kind.itemsize, offset=start
                )
                if end > start
                else torch.empty(0, dtype=kind)
            ).view(info.shape)
            if dtype is not None and tensor.is_floating_point() and kind != dtype:
                tensor = tensor.to(dtype)
                _release(mapped, start, end)
            out[key] = tensor
    return out


def _release(mapped: mmap.mmap, start: int, end: int) -> None:
    """Drop the whole pages of [start, end) from this process (they stay in the page cache)."""
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapped.madvise(mmap.MADV_DONTNEED, first, last - first)
