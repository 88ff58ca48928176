"""`export_checkpoint`: a training checkpoint's weights as a model folder `wmtp.load` reads,
streamed tensor by tensor from the DCP files into safetensors, without building the model."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from wmtp.build import remap_state_dict
from wmtp.dcp import (
    DCP_METADATA,
    dcp_errors,
    dcp_reader,
    fetch_files,
    read_dcp_metadata,
    safe_planner,
    stored_keys,
)
from wmtp.errors import WeightsError
from wmtp.gather import Entry, write_files
from wmtp.location import StorageOptions, join, local_root, translate
from wmtp.metadata import INDEX, SAFETENSORS, StateDictMapping
from wmtp.save import _upload, _write, encode_metadata, file_manifest
from wmtp.store import fetch, open_store, read_metadata
from wmtp.weights import checkpoint_names, read_header

if TYPE_CHECKING:
    import torch


def export(
    checkpoint: str,
    dest: str,
    like: str,
    dtype: torch.dtype | str | None,
    options: StorageOptions | None,
) -> str:
    """What `wmtp.export_checkpoint` does (see there)."""
    from wmtp.load import parse_dtype

    cast = parse_dtype(dtype)
    _, folder, links = fetch_files(checkpoint, options)
    try:
        meta = read_metadata(like, storage_options=options)
        strategy = meta.loading_strategy
        wanted = [*strategy.required_files, *strategy.tokenizer_files]
        files = fetch(like, wanted, storage_options=options, manifest=meta.files)
        names = checkpoint_names(strategy.required_files, files)
        files |= fetch(like, [n for n in names if n not in files], storage_options=options)
        stored = [k for n in names for k in read_header(files[n], join(like, n)).tensors]
        keys = list(
            remap_state_dict(dict(zip(stored, stored, strict=True)), strategy.state_dict_mapping)
        )
        saved = read_dcp_metadata(folder / DCP_METADATA, join(checkpoint, DCP_METADATA))
        have = stored_keys(saved, "model.")
        read = _tensors(folder, checkpoint, have)
        _check(checkpoint, like, keys, have, read)
        items = []
        for key in keys:
            shape, kind = have[key]  # type: ignore[misc]
            if cast is not None and kind.startswith(("float", "bfloat")):
                kind = str(cast).removeprefix("torch.")
            size = _itemsize(kind) * _numel(shape)
            items.append(Entry(key, kind, tuple(shape), size))
        root = local_root(dest)
        out = root or Path(tempfile.mkdtemp(prefix="wmtp-export-"))
        try:
            with translate(str(out)):
                out.mkdir(parents=True, exist_ok=True)
            write_files(out, [items], lambda key: read(key, cast))
            weights = ("model.safetensors",)
            others = [n for n in strategy.required_files if not n.endswith((SAFETENSORS, INDEX))]
            for name in [*others, *strategy.tokenizer_files]:
                with translate(join(dest, name)):
                    (out / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(files[name], out / name)
            required = (*others[:1], *weights, *others[1:])
            new = msgspec.structs.replace(
                strategy, state_dict_mapping=StateDictMapping(), required_files=required
            )
            listed = (*required, *strategy.tokenizer_files)
            meta = msgspec.structs.replace(
                meta, loading_strategy=new, files=file_manifest(str(out), listed)
            )
            if root is not None:
                _write(out / "metadata.json", encode_metadata(meta))
                return dest
            (out / "metadata.json").write_bytes(encode_metadata(meta))
            store = open_store(dest, options)
            for name in [*listed, "metadata.json"]:
                _upload(store, dest, out, name)
            return dest
        finally:
            if root is None:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if links is not None:
            shutil.rmtree(links, ignore_errors=True)


Read = Callable[[str, "torch.dtype | None"], "torch.Tensor"]  # key, cast -> the tensor


def _tensors(folder: Path, source: str, have: dict[str, Any]) -> Read:
    """A reader of the DCP checkpoint in `folder`'s tensors, one at a time (DCP assembles a
    tensor's shards), each cast to the dtype given (floating ones only)."""
    reader = dcp_reader(folder, source)

    def read(key: str, cast: torch.dtype | None = None) -> torch.Tensor:
        import torch
        from torch.distributed.checkpoint.state_dict_loader import load

        shape, kind = have[key]
        tensor = torch.empty(shape, dtype=getattr(torch, kind))
        with dcp_errors(f"reading {key!r} of checkpoint {source}"):
            load({"model": {key: tensor}}, storage_reader=reader, planner=safe_planner(),
                 no_dist=True)  # fmt: skip
        return tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor

    return read


def _check(checkpoint: str, like: str, keys: list[str], have: dict[str, Any], read: Read) -> None:
    """The checkpoint must hold every tensor `like`'s file stores (model names), as tensors;
    a tensor it holds besides must be a tied copy (equal to one exported, same shape)."""
    import torch

    missing = sorted(k for k in keys if have.get(k) is None)
    extra = [k for k in have if k not in keys and have[k] is not None]
    strays = []
    for key in extra:
        twins = [k for k in keys if have.get(k) == have[key]]
        value = read(key, None)
        if not any(torch.equal(value, read(k, None)) for k in twins):
            strays.append(key)
    if missing or strays:
        raise WeightsError(
            f"checkpoint {checkpoint} does not fit the model of {like}: "
            + (f"missing {', '.join(missing[:8])}; " if missing else "")
            + (f"not in its file and not a tied copy: {', '.join(strays[:8])}; " if strays else "")
            + "export with the model folder it was trained from as like="
        )


def _itemsize(kind: str) -> int:
    import torch

    return int(getattr(torch, kind).itemsize)


def _numel(shape: Any) -> int:
    count = 1
    for n in shape:
        count *= int(n)
    return count
