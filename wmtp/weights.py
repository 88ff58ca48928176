"""Checkpoint tensors from safetensors files: headers checked alone, data memory-mapped.

safetensors' own loader copies every tensor. This reader earns its lines: it maps each file
privately (no copy, nothing read until used, writes never reach the file) and releases each
tensor's pages as it is cast, so a cast never holds the checkpoint twice.
"""

from __future__ import annotations

import mmap
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec
import obstore

from wmtp.errors import MetadataError
from wmtp.metadata import INDEX, SAFETENSORS, RelPath
from wmtp.store import StorageOptions, join, open_store, translate

if TYPE_CHECKING:
    import torch

# safetensors dtype -> torch dtype
DTYPES: Final = dict(
    pair.split("=")
    for pair in "F64=float64 F32=float32 F16=float16 BF16=bfloat16 F8_E4M3=float8_e4m3fn "
    "F8_E5M2=float8_e5m2 I64=int64 I32=int32 I16=int16 I8=int8 U64=uint64 U32=uint32 "
    "U16=uint16 U8=uint8 BOOL=bool".split()
)


class TensorInfo(msgspec.Struct, frozen=True):
    """One tensor of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]


class Header(msgspec.Struct, frozen=True):
    """A safetensors header the format's own reader accepted, where the data starts, and the
    file's size."""

    tensors: dict[str, TensorInfo]
    start: int
    size: int


def checkpoint_names(required: Sequence[str], files: Mapping[str, Path]) -> list[str]:
    """The safetensors files to read, in order: those listed and the shards that listed
    indexes name (their local copies are in `files`).

    Raises:
        MetadataError: an index that is not one, or names a shard outside the folder.
    """
    shards: list[str] = []
    for index in [n for n in required if n.endswith(INDEX)]:
        try:
            data = msgspec.json.decode(
                files[index].read_bytes(), type=dict[str, dict[str, RelPath]]
            )
            shards += data["weight_map"].values()
        except (msgspec.MsgspecError, KeyError) as e:
            raise MetadataError(f"{files[index]}: not a safetensors shard index: {e!r}") from None
    return [n for n in dict.fromkeys([*required, *shards]) if n.endswith(SAFETENSORS)]


def read_header(
    location: str, name: str, size: int, options: StorageOptions | None = None
) -> Header:
    """The header of a safetensors file of `size` bytes, from two small ranged reads.

    Raises:
        MetadataError: not a safetensors file, or one safetensors itself refuses (offsets out
            of bounds, overlapping or not matching shape x dtype, truncated data, trailing
            bytes, ...), or a dtype torch lacks; the message names the file and the cause.
        ModelFileError, StoreAccessError, FetchError: as for any read.
    """
    from safetensors import safe_open

    store, url = open_store(location, options), join(location, name)
    with translate(url):
        length = int.from_bytes(
            bytes(obstore.get_range(store, name, start=0, end=min(8, size))), "little"
        )
        if size < 8 or not 2 <= length <= min(100 * 2**20, size - 8):  # safetensors' own limit
            raise MetadataError(
                f"{url}: not a safetensors file (header length {length}, size {size})"
            )
        raw = bytes(obstore.get_range(store, name, start=8, end=8 + length))
    # The format's reader validates the header against the file's size; a sparse stand-in
    # with the same header and size lets it judge a remote file without its weights.
    with tempfile.NamedTemporaryFile() as stand_in:
        stand_in.write(length.to_bytes(8, "little") + raw)
        stand_in.truncate(size)
        stand_in.flush()
        try:
            with safe_open(stand_in.name, framework="numpy"):
                pass
            tensors = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
            tensors.pop("__metadata__", None)
            header = {k: msgspec.json.decode(v, type=TensorInfo) for k, v in tensors.items()}
        except Exception as e:  # safetensors raises its own error type, or OSError
            raise MetadataError(f"{url}: safetensors refuses this file: {e}") from None
    if unknown := sorted({t.dtype for t in header.values()} - DTYPES.keys()):
        raise MetadataError(f"{url}: tensor dtype(s) {', '.join(unknown)} have no torch type")
    return Header(header, 8 + length, size)


def read_tensors(
    files: Sequence[tuple[Path, Header]], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the local safetensors `files`, each a view of a private memory map.

    With `dtype`, floating tensors are cast one at a time and the mapped pages each came
    from released at once: memory holds the cast model plus one tensor, never the
    checkpoint twice.
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
            kind: torch.dtype = getattr(torch, DTYPES[info.dtype])
            count = (end - start) // kind.itemsize
            tensor = (
                torch.frombuffer(mapped, dtype=kind, count=count, offset=start)
                if count
                else torch.empty(0, dtype=kind)
            )
            tensor = tensor.view(info.shape)
            if dtype is not None and tensor.is_floating_point() and kind != dtype:
                tensor = tensor.to(dtype)
                # Drop the whole pages of [start, end) from this process (not from the cache).
                first, last = (
                    -(-start // mmap.PAGESIZE) * mmap.PAGESIZE,
                    end // mmap.PAGESIZE * mmap.PAGESIZE,
                )
                if last > first:
                    mapped.madvise(mmap.MADV_DONTNEED, first, last - first)
            out[key] = tensor
    return out
