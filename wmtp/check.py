"""Look at a model folder without loading its weights: `check` and `inspect_model`.

Both compose the functions `load` is made of, stopping before any weight byte is read.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import obstore

from wmtp.errors import IntegrityError, WmtpError
from wmtp.hints import missing_files
from wmtp.load import parse_dtype, plan, trusted
from wmtp.location import StorageOptions, join, local_root, translate
from wmtp.metadata import SAFETENSORS, FileEntry, Metadata
from wmtp.store import check_size, fetch, heads, open_store, read_metadata
from wmtp.weights import Header, checkpoint_names, read_header


class CheckReport(msgspec.Struct, frozen=True, omit_defaults=True):
    """What `check` found: no problems means `load` would succeed."""

    location: str
    problems: tuple[str, ...]
    model_class: str | None  # the class built on the meta device, when it got that far
    model_tensors: int  # the model's parameters and buffers compared with the checkpoint
    seconds: float
    quantization: str | None = None  # with `quantization`: bitsandbytes' version, the layers


def check(
    location: str | os.PathLike[str],
    *,
    storage_options: StorageOptions | None = None,
    trust_code: bool = False,
    verify_hashes: bool = False,
    cache_dir: str | None = None,
    dtype: Any = None,
    config_overrides: Mapping[str, Any] | None = None,
    quantization: str | None = None,
) -> CheckReport:
    """What `load` would say, without reading a weight byte: every problem it meets.

    Checks the metadata, that every required file exists, sizes (and with `verify_hashes`,
    SHA-256) against the manifest, then builds the model on the meta device and compares
    the remapped checkpoint keys and shapes, from the safetensors headers, exactly. The
    files `tokenizer_files` lists (none are weights) are fetched and loaded as
    `wmtp.load_tokenizer` would: each missing or refused one is a problem.

    Args:
        location: model folder or URL.
        storage_options: obstore configuration for a remote location.
        trust_code: allow a remote model's own module to be imported.
        verify_hashes: hash the files against the manifest (reads them; downloads remote
            ones into the cache).
        cache_dir: where remote files go.
        dtype, config_overrides: as for `wmtp.load` (a cast makes mixed float types fit).
        quantization: as for `wmtp.load`: the name, that bitsandbytes imports, and the layers
            it would quantise (`keep_full_precision` names that match no module are problems).

    Example:
        >>> check("models/distilgpt2-mtp").problems
        ("… model_class_name 'GPTMTPForCausalLM' is not defined in modeling.py …",)
    """
    start, problems, model, location = time.perf_counter(), [], None, os.fspath(location)
    options: dict[str, Any] = {"storage_options": storage_options, "cache_dir": cache_dir}
    meta: Metadata | None = None
    cast, quantized = None, None
    try:
        meta = read_metadata(location, storage_options=storage_options)
        problems += _manifest_problems(location, meta.files or {}, verify_hashes, options)
        unchecked = msgspec.structs.replace(meta, files=None)  # its problems are listed above
        cast = parse_dtype(dtype)
        model = plan_from_headers(location, unchecked, trust_code, options, cast, config_overrides)
    except WmtpError as e:
        problems.extend(e.problems or [str(e)])
    tensors = len(model.state_dict()) if model is not None else 0
    name = type(model).__name__ if model is not None else None
    if quantization is not None:  # after the count: bitsandbytes' layers add state entries
        try:
            quantized = _quantization(model, meta, quantization, cast)
        except WmtpError as e:
            problems.append(str(e))
    if meta is not None and meta.loading_strategy.tokenizer_files:
        from wmtp.tokenizer import load_tokenizer

        try:
            load_tokenizer(location, **options)
        except WmtpError as e:  # a size or hash problem may be listed from the manifest already
            problems.extend(p for p in e.problems or [str(e)] if p not in problems)
    seconds = round(time.perf_counter() - start, 3)
    return CheckReport(location, tuple(problems), name, tensors, seconds, quantized)


def _quantization(model: Any, meta: Metadata | None, quantization: str, cast: Any) -> str:
    """What `load(quantization=)` would do to `model` (built empty; None when it could not
    be): bitsandbytes' version, and the linear layers quantised and kept; else the error."""
    from importlib.metadata import version

    import torch
    from transformers.pytorch_utils import Conv1D

    from wmtp.quant import config, prepare, quantized

    if model is None or meta is None:
        config(quantization, cast)  # the name, and that bitsandbytes imports
        return f"{quantization} with bitsandbytes {version('bitsandbytes')}"
    modules = model.named_modules()  # the layers transformers' replace_with_bnb_linear takes
    linear = {n for n, m in modules if type(m) is torch.nn.Linear or isinstance(m, Conv1D)}
    prepare(model, quantization, meta.loading_strategy, cast)
    layers = {name.removesuffix(".weight") for name in quantized(model)}
    kept = ", ".join(sorted(linear - layers)) or "none"
    return (
        f"{quantization} with bitsandbytes {version('bitsandbytes')}: {len(layers)} linear "
        f"layers quantised; kept in full precision: {kept}"
    )


def plan_from_headers(
    location: str,
    meta: Metadata,
    trust_code: bool,
    options: dict[str, Any],
    cast: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """`plan` with the checkpoint's headers read in place (two small ranged reads per file):
    the empty model, or the error `load` would raise. Downloads no weights."""
    required, storage = meta.loading_strategy.required_files, options["storage_options"]
    found = require(location, heads(location, required, storage))  # every missing file at once
    small = [n for n in required if not n.endswith(SAFETENSORS)]
    trusted(location, meta, trust_code)
    files = fetch(location, small, progress=False, **options)
    names = checkpoint_names(required, files)  # and the shards, HEADed once too
    found |= require(location, heads(location, [n for n in names if n not in found], storage))
    headers = {n: header_at(location, n, int(found[n]["size"]), storage) for n in names}
    return plan(location, meta, files, headers, cast, overrides)[0]


def require(location: str, found: dict[str, Any]) -> dict[str, Any]:
    """`found` (from `heads`), or `ModelFileError` naming every missing file at once."""
    if None in found.values():
        raise missing_files(location, found)
    return found


def header_at(location: str, name: str, size: int, options: StorageOptions | None) -> Header:
    """`read_header` of file `name` (`size` bytes) at `location`, in place when local; when
    remote, from two small ranged reads into a sparse stand-in of the same size, so the
    format's reader judges it without a byte of weights downloaded."""
    url = join(location, name)
    if (root := local_root(location)) is not None:
        return read_header(root / name, url)
    store = open_store(location, options)
    with translate(url), tempfile.NamedTemporaryFile() as stand_in:
        prefix = bytes(obstore.get_range(store, name, start=0, end=8)) if size >= 8 else b""
        if 2 <= (length := int.from_bytes(prefix, "little")) <= min(100 << 20, size - 8):
            prefix += bytes(obstore.get_range(store, name, start=8, end=8 + length))
        stand_in.write(prefix)
        stand_in.truncate(size)
        stand_in.flush()
        return read_header(Path(stand_in.name), url)


def _manifest_problems(
    location: str, manifest: Mapping[str, FileEntry], verify: bool, options: dict[str, Any]
) -> list[str]:
    problems = []
    found = {} if verify else heads(location, list(manifest), options["storage_options"])
    for name in manifest:
        try:
            if verify:
                fetch(location, [name], manifest=manifest, verify=True, progress=False, **options)
            elif found[name] is not None:  # a missing file is reported once, by the plan
                check_size(location, name, manifest, int(found[name]["size"]))
        except IntegrityError as e:
            problems.append(str(e))
        except WmtpError:
            pass  # as is any other failure to read it
    return problems


def inspect_model(
    location: str | os.PathLike[str],
    *,
    storage_options: StorageOptions | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Metadata, required files with sizes, and tensor counts, dtypes and bytes from the
    safetensors headers alone; reads no weights.

    Example:
        >>> inspect_model("examples/tiny-mtp")["tensors"]
        {'count': 31, 'dtypes': {'F32': 31}, 'bytes': 241152}
    """
    meta = read_metadata(location := os.fspath(location), storage_options=storage_options)
    required = meta.loading_strategy.required_files
    indexes = [n for n in required if not n.endswith(SAFETENSORS) and n.endswith(".json")]
    files = fetch(
        location, indexes, storage_options=storage_options, cache_dir=cache_dir, progress=False
    )
    names = checkpoint_names(required, files)
    sizes = heads(location, list(dict.fromkeys([*required, *names])), storage_options)
    infos = [
        info
        for name in names
        if sizes[name] is not None
        for info in header_at(location, name, sizes[name]["size"], storage_options).tensors.values()
    ]
    return {
        "location": location,
        "metadata": msgspec.to_builtins(meta),
        "files": {n: m and int(m["size"]) for n, m in sizes.items()},
        "tensors": {
            "count": len(infos),
            "dtypes": dict(sorted(Counter(i.dtype for i in infos).items())),
            "bytes": sum(i.data_offsets[1] - i.data_offsets[0] for i in infos),
        },
    }
