"""`load(location)`: the whole data flow on one screen, and the dispatch table it goes through.

metadata.json -> LOADERS[loader_type] finds the class -> fetch -> build empty -> headers
    -> remap_state_dict -> strict compare -> map the files and assign -> eval()
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from wmtp import build
from wmtp.errors import MetadataError, UntrustedCodeError, WeightsError
from wmtp.fetch import fetch
from wmtp.keys import Shape, compare, describe, fits, mapping_fix, remap_state_dict
from wmtp.metadata import CustomMTP, HuggingFace, LoaderType, Metadata, loader_type, read_metadata
from wmtp.store import StorageOptions, join, local_root
from wmtp.weights import Header, checkpoint_names, read_header, read_tensors

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

DTYPE_ALIASES: Final = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp64": "float64",
    "double": "float64",
}


class ModelClass(msgspec.Struct, frozen=True):
    """What a loader found to build: a name for messages, the builder, and problems already
    known (reported together with the checkpoint's, so every mistake shows at once)."""

    name: str
    build: Callable[[PretrainedConfig], torch.nn.Module]
    problems: tuple[str, ...] = ()


def custom_class(location: str, strategy: CustomMTP, files: Mapping[str, Path]) -> ModelClass:
    """`model_class_name` from the folder's own module (`custom_module_file`)."""
    module = build.import_module_file(files[strategy.custom_module_file])
    name, defined = strategy.model_class_name, build.module_classes(module)
    if name in defined:
        return ModelClass(name, getattr(module, name))
    problem = (
        f"{join(location, 'metadata.json')}: model_class_name {name!r} is not defined in "
        f"{strategy.custom_module_file} (defined: {', '.join(defined) or 'no model classes'})"
    )
    if len(defined) != 1:
        raise MetadataError(problem)
    fix = f"; set model_class_name to {defined[0]!r}"  # one candidate: check the weights too
    return ModelClass(defined[0], getattr(module, defined[0]), (problem + fix,))


def auto_class(location: str, strategy: HuggingFace, files: Mapping[str, Path]) -> ModelClass:
    """The transformers Auto class `transformers_class`; remote code (`auto_map`) never runs."""
    import transformers

    name = strategy.transformers_class
    if not (name.startswith("AutoModel") and hasattr(transformers, name)):
        raise MetadataError(
            f"{join(location, 'metadata.json')}: `$.loading_strategy.transformers_class` "
            f"{name!r} is not a transformers Auto model class; use one of: "
            f"{', '.join(build.auto_class_names())}"
        )
    return ModelClass(
        name,
        lambda config: getattr(transformers, name).from_config(config, trust_remote_code=False),
    )


Loader = Callable[[str, Any, Mapping[str, Path]], ModelClass]
LOADERS: Final[Mapping[LoaderType, Loader]] = {
    "custom_mtp": custom_class,
    "huggingface": auto_class,
}


def plan(
    location: str, meta: Metadata, files: Mapping[str, Path], headers: Mapping[str, Header]
) -> tuple[torch.nn.Module, list[tuple[str, ...]]]:
    """The model built empty and its groups of tied names, once the checkpoint (known from
    its `headers` alone) is shown to fit it exactly. `check` and `migrate` stop here.

    Raises:
        MetadataError: the class cannot be found or built (with any key problems too).
        WeightsError: missing, unexpected or misshapen keys (all of them, with hints).
    """
    strategy, source = meta.loading_strategy, join(location, "metadata.json")
    config = build.read_config(files["config.json"])
    found = LOADERS[loader_type(strategy)](location, strategy, files)
    model = build.build_empty(found.build, config, f"{files['config.json']} ({found.name})")
    shapes: dict[str, Shape] = {}
    owner: dict[str, str] = {}
    for name, header in headers.items():
        for key, info in header.tensors.items():
            if key in owner:
                raise WeightsError(
                    f"tensor {key!r} is stored twice: in {owner[key]} and in {join(location, name)}"
                )
            owner[key], shapes[key] = join(location, name), info.shape
    expected, groups = build.state_shapes(model)
    mismatch = compare(expected, groups, remap_state_dict(shapes, strategy.state_dict_mapping))
    if not found.problems and fits(mismatch):
        return model, list(groups)
    fix = mapping_fix(shapes, strategy.state_dict_mapping, expected, groups)
    hints = [*([fix[0]] if fix else []), *_architecture_hint(config, type(model).__name__)]
    detail = "" if fits(mismatch) else describe(mismatch, model=type(model).__name__, hints=hints)
    if found.problems:
        error = MetadataError(
            "\n".join([*found.problems, *([f"also, {detail}"] if detail else [])])
        )
        error.problems = (*found.problems, *([f"{source}: {detail}"] if detail else []))
        raise error
    refused = WeightsError(f"{source}: {detail}")
    refused.fix = fix[1] if fix else None
    raise refused


def _architecture_hint(config: PretrainedConfig, built: str) -> list[str]:
    archs: list[str] = list(getattr(config, "architectures", None) or [])
    if not archs or built in archs:
        return []
    auto = build.auto_class_for(archs[0], str(getattr(config, "model_type", "")))
    fix = f": set transformers_class to {auto!r}" if auto else ""
    return [f"config.json names the architecture {archs[0]}, but {built} was built{fix}"]


def fetch_files(
    location: str,
    meta: Metadata,
    names: Sequence[str],
    *,
    trust_code: bool = False,
    storage_options: StorageOptions | None = None,
    **fetch_options: Any,
) -> dict[str, Path]:
    """Local paths of `names`, checked against the manifest; remote code only when trusted.

    Raises:
        UntrustedCodeError: the model's own module comes from a remote store, untrusted.
        and as `wmtp.fetch.fetch`.
    """
    module = meta.loading_strategy.custom_module_file
    if module and local_root(location) is None and not trust_code:
        raise UntrustedCodeError(
            f"{join(location, module)} would run as Python code on this machine; "
            "pass trust_code=True (wmtp CLI: --trust-code) if you trust whoever can write there"
        )
    return fetch(
        location, names, storage_options=storage_options, manifest=meta.files, **fetch_options
    )


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating `torch.dtype` from itself or a name ("bfloat16", "bf16", "fp32", ...).

    Raises:
        MetadataError: an unknown name or a dtype that is not floating point.
    """
    if dtype is None:
        return None
    import torch

    name = dtype.lower().removeprefix("torch.") if isinstance(dtype, str) else None
    found = dtype if name is None else getattr(torch, DTYPE_ALIASES.get(name, name), None)
    if isinstance(found, torch.dtype) and found.is_floating_point:
        return found
    raise MetadataError(
        f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_ALIASES)}, float32, bfloat16, "
        "float16, float64 (floating point: integer tensors are never cast)"
    )


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

    Every key and shape is checked from the safetensors headers before any weight is read;
    the weights are then mapped from the files and assigned, not copied.

    Args:
        location: the model folder: a path, or a URL (`file://`, `s3://`, `gs://`, `az://`,
            `https://`).
        dtype: cast floating tensors to this (`torch.bfloat16` or "bf16", ...); None keeps
            the checkpoint's dtype.
        device: where to place the model; None leaves it on the CPU.
        storage_options: obstore configuration for remote locations (wins over the
            environment): `endpoint`, `region`, `access_key_id`, `allow_http`, ...
        trust_code: allow the model's own module (`custom_module_file`) to run when it comes
            from a remote store. Code in a local folder is the user's and runs.
        cache_dir: where remote files are cached (default `$WMTP_CACHE_DIR` or `~/.cache/wmtp`).
        progress: a download progress bar; None shows one when stderr is a terminal.
        verify: hash local files against the metadata's manifest (`files`); sizes are
            always checked, and downloads always hashed.
        timings: a dict to fill with seconds per phase ("fetch", "build", "map", "assign").

    Raises:
        ModelFileError: the folder, its metadata.json or a required file is missing.
        UntrustedCodeError: remote custom code without `trust_code=True`.
        StoreAccessError: the store refused the credentials.
        FetchError: the store could not be reached, within bounded retries.
        IntegrityError: a file's size or hash differs from the manifest.
        MetadataError: invalid metadata, a class that does not exist or fails to build, a
            module that fails to import, a corrupt safetensors file, a bad dtype.
        WeightsError: the checkpoint's keys or shapes do not fit the model.

    Example:
        >>> model = wmtp.load("examples/tiny-mtp", dtype="bf16")
        >>> type(model).__name__
        'DistilGPT2MTP'
    """
    meta, cast, phase = (
        read_metadata(location, storage_options=storage_options),
        parse_dtype(dtype),
        _clock(timings),
    )
    options: dict[str, Any] = {
        "trust_code": trust_code,
        "storage_options": storage_options,
        "cache_dir": cache_dir,
        "progress": progress,
        "verify": verify,
    }
    with phase("fetch"):
        files = fetch_files(location, meta, meta.loading_strategy.required_files, **options)
        names = checkpoint_names(meta.loading_strategy.required_files, files)
        files |= fetch_files(location, meta, [n for n in names if n not in files], **options)
    with phase("map"):
        headers = {
            n: read_header(str(files[n].parent), files[n].name, files[n].stat().st_size)
            for n in names
        }
    with phase("build"):  # and the strict check of the headers against the empty model
        model, groups = plan(location, meta, files, headers)
    with phase("assign"):
        tensors = read_tensors([(files[n], h) for n, h in headers.items()], cast)
        build.assign(
            model, remap_state_dict(tensors, meta.loading_strategy.state_dict_mapping), groups
        )
    return model.eval() if device is None else model.eval().to(device)


def _clock(timings: dict[str, float] | None) -> Callable[[str], Any]:
    @contextmanager
    def phase(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

    return phase
