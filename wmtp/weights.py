"""Checkpoint tensors: headers judged alone, then the data mapped, never copied (safetensors'
own loader copies). Each file is mapped privately (writes never reach it) and each tensor's
pages are released as it is cast, so a cast never holds the checkpoint twice."""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from wmtp.errors import MetadataError
from wmtp.location import translate
from wmtp.metadata import INDEX, SAFETENSORS, RelPath
from wmtp.store import read_local, regular

if TYPE_CHECKING:
    import torch

DTYPES = dict(pair.split("=") for pair in (  # safetensors dtype -> torch dtype
    "F64=float64 F32=float32 F16=float16 BF16=bfloat16 F8_E4M3=float8_e4m3fn F8_E5M2=float8_e5m2 "
    "I64=int64 I32=int32 I16=int16 I8=int8 U64=uint64 U32=uint32 U16=uint16 U8=uint8 BOOL=bool"
).split())  # fmt: skip


class TensorInfo(msgspec.Struct, frozen=True):
    """One tensor of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]


class Header(msgspec.Struct, frozen=True):
    """A header safetensors' own reader accepted, where the data starts, and the file size."""

    tensors: dict[str, TensorInfo]
    start: int
    size: int


class ShardIndex(msgspec.Struct):
    """`*.safetensors.index.json`: tensor -> shard file, a path inside the folder."""

    weight_map: dict[str, RelPath]


def checkpoint_names(required: Sequence[str], files: Mapping[str, Path]) -> list[str]:
    """The safetensors files to read: those listed, then the shards that listed indexes name
    (from their local copies in `files`), each once; `MetadataError` for a broken index."""
    shards: list[str] = []
    for index in (files[n] for n in required if n.endswith(INDEX)):
        try:
            shards += msgspec.json.decode(read_local(index), type=ShardIndex).weight_map.values()
        except msgspec.MsgspecError as e:
            from wmtp.hints import readable

            raise MetadataError(f"{index}: not a shard index: {readable(str(e))}") from None
    return [n for n in dict.fromkeys([*required, *shards]) if n.endswith(SAFETENSORS)]


def read_header(path: Path, url: str) -> Header:
    """The header of the safetensors file at `path` (`url` in errors) as the format's own reader
    judges it: else a `MetadataError` (truncated, bad offsets, a dtype torch lacks...)."""
    from safetensors import safe_open

    with translate(url), regular(path).open("rb") as f:  # EIO, EACCES...: errors naming it
        size, length = os.fstat(f.fileno()).st_size, int.from_bytes(f.read(8), "little")
        if not 2 <= length <= min(100 << 20, size - 8):
            raise MetadataError(f"{url}: not a safetensors file ({size} bytes, header {length})")
        raw = f.read(length)
    try:
        with safe_open(str(path), framework="numpy"):
            table = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
        table.pop("__metadata__", None)
        tensors = {k: msgspec.json.decode(v, type=TensorInfo) for k, v in table.items()}
    except Exception as e:  # safetensors' own error type, or OSError
        raise MetadataError(f"{url}: safetensors refuses this file: {e}") from None
    if unknown := sorted({t.dtype for t in tensors.values()} - DTYPES.keys()):
        raise MetadataError(f"{url}: tensor dtype(s) {', '.join(unknown)} have no torch type")
    return Header(tensors, 8 + length, size)


def read_tensors(
    files: Mapping[str, Path], headers: Mapping[str, Header], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the files `headers` describes (local paths in `files`), each a view of a
    private memory map; with `dtype`, floating ones cast one at a time, releasing their pages."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, header in headers.items():
        with files[name].open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if len(mapped) != header.size:
            raise MetadataError(f"{files[name]} changed while it was being loaded; load it again")
        if dtype is not None:  # the cast reads all now, in order: read ahead (README, Benchmarks)
            mapped.madvise(mmap.MADV_WILLNEED)
        for key, info in header.tensors.items():
            start, end = (header.start + offset for offset in info.data_offsets)
            kind, page = getattr(torch, DTYPES[info.dtype]), mmap.PAGESIZE
            empty, n = torch.empty(0, dtype=kind), (end - start) // kind.itemsize  # frombuffer: n>0
            flat = torch.frombuffer(mapped, dtype=kind, count=n, offset=start) if n else empty
            out[key] = tensor = flat.view(info.shape)
            if dtype is not None and tensor.is_floating_point() and kind != dtype:
                out[key] = tensor.to(dtype)
                first, last = -(-start // page) * page, end // page * page  # whole pages only
                if last > first:  # gone from this process, not from the page cache
                    mapped.madvise(mmap.MADV_DONTNEED, first, last - first)
    return out
