"""Checkpoint tensors from safetensors files: headers read alone, data memory-mapped."""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec
import obstore

from wmtp.errors import MetadataError, WeightsError
from wmtp.fetch import fetch
from wmtp.store import StorageOptions, join, open_store, translate

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX: Final = ".safetensors.index.json"
_MAX_HEADER: Final = 100 * 2**20  # safetensors' own limit
# safetensors dtype -> torch dtype attribute
DTYPES: Final = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


class TensorInfo(msgspec.Struct, frozen=True):
    """One entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]


class ShardIndex(msgspec.Struct, frozen=True):
    """`model.safetensors.index.json`, the layout transformers writes for large models."""

    weight_map: dict[str, str]


def shard_names(index_path: Path) -> tuple[str, ...]:
    """The shard files a `*.safetensors.index.json` refers to, in order of first use."""
    try:
        index = msgspec.json.decode(index_path.read_bytes(), type=ShardIndex)
    except msgspec.MsgspecError as e:
        raise MetadataError(f"{index_path}: not a safetensors shard index: {e}") from None
    return tuple(dict.fromkeys(index.weight_map.values()))


def listed_shards(
    location: str,
    indexes: Sequence[str],
    *,
    storage_options: StorageOptions | None = None,
    cache_dir: str | None = None,
) -> list[str]:
    """The shard files that the shard indexes `indexes` at `location` list (fetching them)."""
    if not indexes:
        return []
    paths = fetch(
        location, indexes, storage_options=storage_options, cache_dir=cache_dir, progress=False
    )
    return list(dict.fromkeys(s for n in indexes for s in shard_names(paths[n])))


def read_header(
    location: str, name: str, storage_options: StorageOptions | None = None
) -> dict[str, TensorInfo]:
    """The tensor table of a safetensors file, read with two small ranged reads (no weights).

    Raises:
        MetadataError: the file is not safetensors.
        ModelFileError, StoreAccessError, FetchError: as for any read.
    """
    store, url = open_store(location, storage_options), join(location, name)
    with translate(url):
        length = _header_length(bytes(obstore.get_range(store, name, start=0, length=8)), url)
        return _decode_header(bytes(obstore.get_range(store, name, start=8, length=length)), url)


def header_shapes(
    files: Sequence[tuple[str, str]], storage_options: StorageOptions | None = None
) -> dict[str, tuple[int, ...]]:
    """Key -> shape over safetensors files given as (location, name), from headers alone.

    Raises:
        WeightsError: two files hold the same key.
    """
    out: dict[str, tuple[int, ...]] = {}
    owner: dict[str, str] = {}
    for location, name in files:
        for key, info in read_header(location, name, storage_options).items():
            if key in owner:
                raise WeightsError(
                    f"tensor {key!r} is stored twice: in {owner[key]} and in {join(location, name)}"
                )
            owner[key], out[key] = join(location, name), info.shape
    return out


def read_tensors(
    paths: Sequence[Path], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor in the local safetensors files `paths` (keys already checked unique).

    Each tensor is a view of a private memory map of its file: nothing is read
    until it is used, nothing is copied, and writing to it never touches the file.
    With `dtype`, floating tensors are cast one at a time and the mapped pages each
    came from are released at once, so memory holds the cast model plus one tensor,
    never the checkpoint twice.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for path in paths:
        with path.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        length = _header_length(mapped[:8], str(path))
        base = 8 + length
        for key, info in _decode_header(mapped[8:base], str(path)).items():
            start, end = (base + offset for offset in info.data_offsets)
            kind: torch.dtype = getattr(torch, DTYPES[info.dtype])
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


def _header_length(prefix: bytes, url: str) -> int:
    length = int.from_bytes(prefix[:8], "little")
    if len(prefix) < 8 or not 2 <= length <= _MAX_HEADER:
        raise MetadataError(f"{url}: not a safetensors file (header length {length})")
    return length


def _decode_header(raw: bytes, url: str) -> dict[str, TensorInfo]:
    try:
        table = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
        table.pop("__metadata__", None)
        infos = {key: msgspec.json.decode(value, type=TensorInfo) for key, value in table.items()}
    except msgspec.MsgspecError as e:
        raise MetadataError(f"{url}: not a safetensors header: {e}") from None
    if unknown := sorted({i.dtype for i in infos.values()} - DTYPES.keys()):
        raise MetadataError(f"{url}: unsupported tensor dtype(s) {', '.join(unknown)}")
    return infos
