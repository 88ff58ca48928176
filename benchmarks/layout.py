"""Where a model folder keeps its weights; standard library only, so floor children stay light."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

SINGLE_FILE: Final = "model.safetensors"
INDEX_FILE: Final = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of `folder`: the shards its index lists, else `model.safetensors`."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(sorted(weight_map.values()))]
    return [folder / SINGLE_FILE]


def weight_bytes(folder: Path) -> int:
    """Total size in bytes of the weight files of `folder`."""
    return sum(path.stat().st_size for path in weight_files(folder))


def warm_page_cache(folder: Path, chunk: int = 64 << 20) -> None:
    """Read every file of `folder` once, so that every measurement sees a warm page cache."""
    buffer = bytearray(chunk)
    for path in sorted(folder.iterdir()):
        with path.open("rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
