"""Checkpoint tensors from safetensors files, memory-mapped rather than copied."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec
import obstore

from wmtp.errors import MetadataError, WeightsError
from wmtp.store import StorageOptions, join, open_store, translate

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX: Final = ".safetensors.index.json"
_MAX_HEADER: Final = 100 * 2**20  # safetensors' own limit


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


def read_tensors(
    paths: Sequence[Path], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor in the safetensors files `paths` (keys already checked unique).

    Without `dtype`, each tensor is a view of a memory map of its file: nothing is
    read until it is used, and nothing is copied. With `dtype`, floating tensors are
    read one at a time and cast, so memory holds the cast model plus one tensor,
    never the whole checkpoint twice.
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in paths:
        if dtype is None:
            with safe_open(path, framework="pt", backend="mmap") as f:
                out.update(f.get_tensors())
            continue
        with safe_open(path, framework="pt", backend="pread") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                tensor = f.get_tensor(key)
                out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


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
        length = int.from_bytes(bytes(obstore.get_range(store, name, start=0, length=8)), "little")
        if not 2 <= length <= _MAX_HEADER:
            raise MetadataError(f"{url}: not a safetensors file (header length {length})")
        raw = bytes(obstore.get_range(store, name, start=8, length=length))
    try:
        table = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
        table.pop("__metadata__", None)
        return {key: msgspec.json.decode(value, type=TensorInfo) for key, value in table.items()}
    except msgspec.MsgspecError as e:
        raise MetadataError(f"{url}: not a safetensors header: {e}") from None


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
