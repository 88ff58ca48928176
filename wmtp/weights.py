"""Checkpoint tensors from safetensors files, memory-mapped rather than copied."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec

from wmtp.errors import MetadataError, WeightsError

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX: Final = ".safetensors.index.json"


class ShardIndex(msgspec.Struct, frozen=True):
    """`model.safetensors.index.json`, the layout transformers writes for large models."""

    weight_map: dict[str, str]


def weight_names(required_files: Sequence[str], source: str) -> tuple[str, ...]:
    """The checkpoint files among `required_files`: safetensors files or shard indexes.

    Raises:
        MetadataError: none is listed (pickled `.bin`/`.pt` checkpoints are refused).
    """
    names = tuple(f for f in required_files if f.endswith((".safetensors", INDEX_SUFFIX)))
    if not names:
        unsafe = [f for f in required_files if f.endswith((".bin", ".pt", ".pth"))]
        why = f" ({', '.join(unsafe)} is a pickle, which wmtp does not load)" if unsafe else ""
        raise MetadataError(
            f"{source}: `$.loading_strategy.required_files` lists no safetensors "
            f"checkpoint{why}; save the weights as model.safetensors and list it"
        )
    return names


def shard_names(index_path: Path) -> tuple[str, ...]:
    """The shard files a `*.safetensors.index.json` refers to, in order of first use."""
    try:
        index = msgspec.json.decode(index_path.read_bytes(), type=ShardIndex)
    except msgspec.MsgspecError as e:
        raise MetadataError(f"{index_path}: not a safetensors shard index: {e}") from None
    return tuple(dict.fromkeys(index.weight_map.values()))


def read_tensors(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """Every tensor in the safetensors files `paths`, backed by a map of each file.

    Nothing is read from disk until a tensor is used.

    Raises:
        WeightsError: two files hold the same key.
    """
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    owner: dict[str, Path] = {}
    for path in paths:
        for key, tensor in load_file(path).items():
            if key in owner:
                raise WeightsError(f"tensor {key!r} is stored twice: in {owner[key]} and in {path}")
            owner[key] = path
            out[key] = tensor
    return out


def shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape, for comparing a checkpoint with a model."""
    return {k: tuple(t.shape) for k, t in tensors.items()}
