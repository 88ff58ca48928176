"""Look at a model folder without loading its weights: `inspect_model` and `check`."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import msgspec

from wmtp.errors import IntegrityError, WmtpError
from wmtp.fetch import fetch, file_sizes
from wmtp.load import read_metadata
from wmtp.loaders import LOADERS, dry_run_options
from wmtp.store import StorageOptions
from wmtp.weights import INDEX_SUFFIX, listed_shards, read_header


class CheckReport(msgspec.Struct, frozen=True):
    """What `check` found: no problems means `load` would succeed."""

    location: str
    problems: tuple[str, ...]
    model_class: str | None  # the class built on the meta device, when it got that far
    model_tensors: int  # the model's parameters and buffers compared with the checkpoint
    seconds: float


def check(
    location: str,
    *,
    storage_options: StorageOptions | None = None,
    trust_code: bool = False,
    verify_hashes: bool = False,
    cache_dir: str | None = None,
) -> CheckReport:
    """A dry run of `load` that reads no weight bytes, reporting every problem it meets.

    Checks the metadata, that every required file exists, sizes (and with
    `verify_hashes`, SHA-256) against the manifest, then builds the model on the
    meta device and compares the remapped checkpoint keys and shapes, from the
    safetensors headers, with it exactly.

    Args:
        location: model folder or URL.
        storage_options: obstore configuration for a remote location.
        trust_code: allow a remote model's own module to be imported.
        verify_hashes: hash the files against the manifest (reads them; downloads
            remote ones into the cache).
        cache_dir: where remote files go.

    Example:
        >>> report = check("models/distilgpt2-mtp")
        >>> report.problems
        ("… model_class_name 'GPTMTPForCausalLM' is not defined in modeling.py …",)
    """
    start = time.perf_counter()
    problems: list[str] = []
    model_class: str | None = None
    tensors = 0
    try:
        meta = read_metadata(location, storage_options=storage_options)
        manifest = meta.files or {}
        problems += _manifest_problems(
            location, manifest, storage_options, verify_hashes, cache_dir
        )
        options = dry_run_options(storage_options, trust_code, cache_dir)
        unchecked = msgspec.structs.replace(meta, files=None)  # its problems are listed above
        model = LOADERS[meta.loading_strategy.loader_type](location, unchecked, options)
        model_class, tensors = type(model).__name__, len(model.state_dict())
    except WmtpError as e:
        problems.extend(e.problems or [str(e)])
    seconds = round(time.perf_counter() - start, 3)
    return CheckReport(location, tuple(problems), model_class, tensors, seconds)


def _manifest_problems(
    location: str,
    manifest: dict[str, Any],
    storage_options: StorageOptions | None,
    verify: bool,
    cache_dir: str | None,
) -> list[str]:
    problems = []
    for name in manifest:
        try:
            fetch(
                location,
                [name],
                storage_options=storage_options,
                cache_dir=cache_dir,
                manifest={name: manifest[name]},
                verify=verify,
                only_check=() if verify else [name],
                progress=False,
            )
        except IntegrityError as e:
            problems.append(str(e))
        except WmtpError:
            pass  # a missing file is reported by the dry run, once
    return problems


def inspect_model(
    location: str, *, storage_options: StorageOptions | None = None, cache_dir: str | None = None
) -> dict[str, Any]:
    """Metadata, required files with sizes, and tensor counts, dtypes and bytes from the
    safetensors headers alone; reads no weights.

    Example:
        >>> inspect_model("examples/tiny-mtp")["tensors"]
        {'count': 31, 'dtypes': {'F32': 31}, 'bytes': 241152}
    """
    meta = read_metadata(location, storage_options=storage_options)
    required = list(meta.loading_strategy.required_files)
    indexes = [n for n in required if n.endswith(INDEX_SUFFIX)]
    shards = listed_shards(location, indexes, storage_options=storage_options, cache_dir=cache_dir)
    required += [s for s in shards if s not in required]
    sizes = file_sizes(location, required, storage_options)
    infos = [
        info
        for name in required
        if name.endswith(".safetensors") and sizes.get(name) is not None
        for info in read_header(location, name, storage_options).values()
    ]
    return {
        "location": location,
        "metadata": msgspec.to_builtins(meta),
        "files": sizes,
        "tensors": {
            "count": len(infos),
            "dtypes": dict(sorted(Counter(i.dtype for i in infos).items())),
            "bytes": sum(i.data_offsets[1] - i.data_offsets[0] for i in infos),
        },
    }
