"""The dispatch table: `loader_type` -> the function that loads that kind of model.

Adding a kind of model is one function and one entry in `LOADERS`; adding a
model is only metadata. Each loader finds how to construct its model; the
rest (fetch, build empty, map, check, assign) is `assemble`, shared by all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from wmtp.compare import Mismatch, Shape, compare, describe, fits, mapping_fix
from wmtp.errors import MetadataError, UntrustedCodeError, WeightsError
from wmtp.fetch import fetch
from wmtp.instantiate import (
    assign,
    auto_class,
    auto_class_for,
    build_empty,
    import_module_file,
    meta_leftovers,
    module_classes,
    read_config,
    state_shapes,
)
from wmtp.metadata import LoaderType, Metadata
from wmtp.remap import remap_state_dict
from wmtp.store import StorageOptions, join, local_root
from wmtp.weights import INDEX_SUFFIX, header_shapes, read_tensors, shard_names

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig


class LoadOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What the caller asked for beyond the metadata."""

    dtype: torch.dtype | None = None
    storage_options: StorageOptions | None = None
    trust_code: bool = False
    cache_dir: str | None = None
    progress: bool | None = None
    verify: bool = False  # hash local files against the manifest
    dry_run: bool = False  # check everything from headers; read no weight bytes
    timings: dict[str, float] | None = None  # filled with seconds per phase, when given


def dry_run_options(
    storage_options: StorageOptions | None, trust_code: bool, cache_dir: str | None
) -> LoadOptions:
    """Options for a loader run that checks everything from headers and reads no weights."""
    return LoadOptions(
        storage_options=storage_options,
        trust_code=trust_code,
        cache_dir=cache_dir,
        dry_run=True,
        progress=False,
    )


Loader = Callable[[str, Metadata, LoadOptions], "torch.nn.Module"]
Construct = Callable[[], "torch.nn.Module"]


def load_custom_mtp(location: str, meta: Metadata, options: LoadOptions) -> torch.nn.Module:
    """A model whose class is defined in the folder's own module (`custom_module_file`)."""
    strategy = meta.loading_strategy
    module_file = strategy.custom_module_file or ""  # required by the schema for this loader
    if local_root(location) is None and not options.trust_code:
        raise UntrustedCodeError(
            f"{join(location, module_file)} would run as Python code on this machine; "
            "pass trust_code=True (wmtp CLI: --trust-code) if you trust whoever can write there"
        )

    def construct(
        files: Mapping[str, Path], config: PretrainedConfig
    ) -> tuple[Construct, list[str]]:
        module = import_module_file(files[module_file])
        name = strategy.model_class_name or ""
        if name in (defined := module_classes(module)):
            return lambda: getattr(module, name)(config), []
        problem = (
            f"{_source(location)}: model_class_name {name!r} is not defined in {module_file} "
            f"(defined: {', '.join(defined) or 'no torch.nn.Module classes'})"
        )
        if len(defined) != 1:
            raise MetadataError(problem)
        # One candidate: check the checkpoint against it too, so every mistake shows at once.
        fix = f"; set model_class_name to {defined[0]!r}"
        return lambda: getattr(module, defined[0])(config), [problem + fix]

    return assemble(location, meta, options, construct)


def load_huggingface(location: str, meta: Metadata, options: LoadOptions) -> torch.nn.Module:
    """A transformers model built by the Auto class `transformers_class` (no remote code)."""
    auto = auto_class(meta.loading_strategy.transformers_class or "", _source(location))

    def construct(
        files: Mapping[str, Path], config: PretrainedConfig
    ) -> tuple[Construct, list[str]]:
        return lambda: auto.from_config(config), []

    return assemble(location, meta, options, construct)


LOADERS: Final[Mapping[LoaderType, Loader]] = {
    "custom_mtp": load_custom_mtp,
    "huggingface": load_huggingface,
}


def assemble(
    location: str,
    meta: Metadata,
    options: LoadOptions,
    construct: Callable[[Mapping[str, Path], PretrainedConfig], tuple[Construct, list[str]]],
) -> torch.nn.Module:
    """Fetch, build empty, map the checkpoint, check it fits exactly, then assign.

    With `options.dry_run` the checkpoint's shapes come from the safetensors
    headers and the empty model is returned without weights.

    Raises:
        MetadataError: the loader found problems, or the model left tensors on meta.
        WeightsError: missing, unexpected or misshapen keys (all of them, with hints).
    """
    strategy, source = meta.loading_strategy, _source(location)
    phase = _timer(options.timings)
    with phase("fetch"):
        files, checkpoints = model_files(location, meta, options)
    with phase("build"):
        config = read_config(files["config.json"])
        build, problems = construct(files, config)
        model = build_empty(build)
    with phase("map"):
        # Headers first: the whole check happens before a single weight byte is read.
        headers = [
            (location, n) if n not in files else (str(files[n].parent), files[n].name)
            for n in checkpoints
        ]
        found = header_shapes(headers, options.storage_options)
        mapped = remap_state_dict(found, strategy.state_dict_mapping)
        expected, groups = state_shapes(model)
        mismatch = compare(expected, groups, mapped)
    if problems or not fits(mismatch):
        raise _refusal(source, model, config, problems, mismatch, found, meta, expected, groups)
    if options.dry_run:
        return model
    with phase("assign"):
        tensors = read_tensors([files[n] for n in checkpoints], options.dtype)
        assign(model, remap_state_dict(tensors, strategy.state_dict_mapping), groups)
        if leftovers := meta_leftovers(model):
            raise MetadataError(
                f"{source}: {type(model).__name__} leaves {', '.join(leftovers)} on the meta "
                "device after loading; its module must create buffers without device='meta'"
            )
    return model.eval()


def model_files(
    location: str, meta: Metadata, options: LoadOptions
) -> tuple[dict[str, Path], list[str]]:
    """Local paths of the small files (config, module, shard index), and the names of the
    safetensors files to read, shards of an index in its order.

    In a dry run the safetensors files are only checked to exist (and their manifest
    sizes, and hashes with `verify`), not downloaded.

    Raises:
        MetadataError: `config.json` or a safetensors checkpoint is not listed.
        ModelFileError: a file is missing.
        IntegrityError: a file differs from the manifest.
    """
    required, source = meta.loading_strategy.required_files, _source(location)
    if "config.json" not in required:
        raise MetadataError(f"{source}: `$.loading_strategy.required_files` must list config.json")

    def get(names: Sequence[str]) -> dict[str, Path]:
        # A dry run reads only the headers of the weights, so it need not download them.
        weights = [n for n in names if n.endswith(".safetensors")]
        return fetch(
            location,
            names,
            storage_options=options.storage_options,
            cache_dir=options.cache_dir,
            progress=options.progress,
            manifest=meta.files,
            verify=options.verify,
            only_check=weights if options.dry_run and not options.verify else (),
        )

    files = get(required)
    indexes = [n for n in required if n.endswith(INDEX_SUFFIX)]
    shards = [s for n in indexes for s in shard_names(files[n]) if s not in required]
    checkpoints = [n for n in [*required, *shards] if n.endswith(".safetensors")]
    if not checkpoints:
        pickles = [n for n in required if n.endswith((".bin", ".pt", ".pth"))]
        why = f" ({', '.join(pickles)} is a pickle, which wmtp does not load)" if pickles else ""
        raise MetadataError(
            f"{source}: `$.loading_strategy.required_files` lists no safetensors "
            f"checkpoint{why}; save the weights as model.safetensors and list it"
        )
    return (files | get(shards) if shards else files), checkpoints


def _refusal(
    source: str,
    model: torch.nn.Module,
    config: PretrainedConfig,
    problems: list[str],
    mismatch: Mismatch,
    found: Mapping[str, Shape],
    meta: Metadata,
    expected: Mapping[str, Shape],
    groups: Sequence[tuple[str, ...]],
) -> Exception:
    """The one error that reports every problem found, with hints."""
    fix = mapping_fix(found, meta.loading_strategy.state_dict_mapping, expected, groups)
    hints = [*([fix[0]] if fix else []), *_architecture_hint(config, model)]
    detail = "" if fits(mismatch) else describe(mismatch, model=type(model).__name__, hints=hints)
    if problems:
        also = [f"also, {detail}"] if detail else []
        combined = MetadataError("\n".join([*problems, *also]))
        combined.problems = (*problems, *([f"{source}: {detail}"] if detail else []))
        return combined
    refused = WeightsError(f"{source}: {detail}")
    refused.fix = fix[1] if fix else None
    return refused


def _architecture_hint(config: PretrainedConfig, model: torch.nn.Module) -> list[str]:
    archs: list[str] = list(getattr(config, "architectures", None) or [])
    built = type(model).__name__
    if not archs or built in archs:
        return []
    auto = auto_class_for(archs[0], str(getattr(config, "model_type", "")))
    fix = f": set transformers_class to {auto!r}" if auto else ""
    return [f"config.json names the architecture {archs[0]}, but {built} was built{fix}"]


def _timer(timings: dict[str, float] | None) -> Callable[[str], Any]:
    @contextmanager
    def phase(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

    return phase


def _source(location: str) -> str:
    return join(location, "metadata.json")
