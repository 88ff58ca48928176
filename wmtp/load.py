"""`load(location)`: the whole data flow in one place.

metadata.json --decode--> Metadata --LOADERS[loader_type]--> fetch -> build empty
    -> read tensors (mapped) -> remap_state_dict -> compare (strict) -> assign
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from wmtp.errors import MetadataError, ModelFileError
from wmtp.fetch import read_file
from wmtp.loaders import LOADERS, LoadOptions
from wmtp.metadata import EXAMPLE_STRATEGY, Metadata, decode_metadata
from wmtp.store import StorageOptions, join

if TYPE_CHECKING:
    import torch

DTYPE_NAMES: Final = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
}


def read_metadata(location: str, *, storage_options: StorageOptions | None = None) -> Metadata:
    """The decoded `metadata.json` of the model at `location`.

    Raises:
        ModelFileError: the location or its metadata.json does not exist.
        MetadataError: the file does not decode or validate (see `decode_metadata`).

    Example:
        >>> read_metadata("examples/tiny-mtp").algorithm_compatibility
        ('baseline-mtp', 'critic-wmtp', 'rho1-wmtp')
    """
    source = join(location, "metadata.json")
    try:
        data = read_file(location, "metadata.json", storage_options)
    except ModelFileError as e:
        raise ModelFileError(
            f"{e}: every model folder needs a metadata.json that says how to load it, e.g.\n"
            f'{{\n  "wmtp_type": "reference_model",\n  "storage_version": "2.0",\n'
            f"{EXAMPLE_STRATEGY}\n}}"
        ) from None
    return decode_metadata(data, source=source)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A `torch.dtype` from itself or a name such as "bfloat16", "bf16", "fp32".

    Raises:
        MetadataError: an unknown name; the message lists the known ones.
    """
    if dtype is None or not isinstance(dtype, str):
        return dtype
    import torch

    name = DTYPE_NAMES.get(dtype.lower().removeprefix("torch."))
    if name is None:
        raise MetadataError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
    result: torch.dtype = getattr(torch, name)
    return result


def load(
    location: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    storage_options: StorageOptions | None = None,
    trust_code: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    verify: bool = False,
    timings: dict[str, float] | None = None,
) -> torch.nn.Module:
    """Load the model at `location` exactly as its `metadata.json` says, in eval mode.

    Weights are mapped from the safetensors files, not copied; every key is
    checked against the model before any is assigned.

    Args:
        location: the model folder: a path, or a URL (`file://`, `s3://`, `gs://`,
            `az://`, `https://`).
        dtype: cast floating tensors to this (`torch.bfloat16` or "bf16", ...);
            None keeps the checkpoint's dtype.
        device: where to place the model; None leaves it on the CPU.
        storage_options: obstore configuration for remote locations (wins over the
            environment): `endpoint`, `region`, `access_key_id`, `allow_http`, ...
        trust_code: allow the model's own module (`custom_module_file`) to run when it
            comes from a remote store. Code in a local folder is the user's and runs.
        cache_dir: where remote files are cached (default `$WMTP_CACHE_DIR` or
            `~/.cache/wmtp`).
        progress: show a download progress bar; None shows one when stderr is a terminal.
        verify: hash local files against the metadata's manifest (`files`); sizes are
            always checked, and downloads are always hashed as they are written.
        timings: a dict to fill with seconds per phase ("fetch", "build", "map", "assign").

    Raises:
        ModelFileError: the folder, its metadata.json or a required file is missing.
        UntrustedCodeError: remote custom code without `trust_code=True`.
        StoreAccessError: the store refused the credentials.
        FetchError: the store could not be reached, within bounded retries.
        IntegrityError: a file's size or hash differs from the manifest.
        MetadataError: the metadata is invalid, names a class that does not exist,
            or the model's module fails to import.
        WeightsError: the checkpoint's keys or shapes do not fit the model.

    Example:
        >>> model = wmtp.load("examples/tiny-mtp", dtype="bf16")
        >>> type(model).__name__
        'DistilGPT2MTP'
    """
    meta = read_metadata(location, storage_options=storage_options)
    options = LoadOptions(
        dtype=parse_dtype(dtype),
        storage_options=storage_options,
        trust_code=trust_code,
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        progress=progress,
        verify=verify,
        timings=timings,
    )
    model = LOADERS[meta.loading_strategy.loader_type](location, meta, options)
    return model if device is None else model.to(device)
