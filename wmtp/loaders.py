"""The dispatch table: `loader_type` -> the function that loads that kind of model.

Adding a kind of model is one function and one entry in `LOADERS`; adding a
model is only metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from wmtp.compare import compare, describe, fits, prefix_hints
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
from wmtp.metadata import LoaderType, LoadingStrategy, Metadata
from wmtp.remap import remap_state_dict
from wmtp.store import StorageOptions, join, local_root
from wmtp.weights import INDEX_SUFFIX, read_tensors, shapes, shard_names, weight_names

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


Loader = Callable[[str, Metadata, LoadOptions], "torch.nn.Module"]


def load_custom_mtp(location: str, meta: Metadata, options: LoadOptions) -> torch.nn.Module:
    """A model whose class is defined in the folder's own module (`custom_module_file`)."""
    strategy, source = meta.loading_strategy, _source(location)
    module_file = strategy.custom_module_file or ""  # required by the schema for this loader
    if local_root(location) is None and not options.trust_code:
        raise UntrustedCodeError(
            f"{join(location, module_file)} would run as Python code on this machine; "
            "pass trust_code=True (wmtp CLI: --trust-code) if you trust whoever can write there"
        )
    files = model_files(location, strategy, options)
    config = read_config(files["config.json"])
    module = import_module_file(files[module_file])
    name = strategy.model_class_name or ""
    cls: Any = getattr(module, name, None)
    problems: list[str] = []
    if name not in (defined := module_classes(module)):
        problems.append(
            f"{source}: model_class_name {name!r} is not defined in {module_file} "
            f"(defined: {', '.join(defined) or 'no torch.nn.Module classes'})"
        )
        if len(defined) != 1:
            raise MetadataError(problems[0])
        # One candidate: check the checkpoint against it too, so every mistake shows at once.
        cls = getattr(module, defined[0])
        problems[0] += f"; set model_class_name to {defined[0]!r}"
    return assemble(lambda: cls(config), files, strategy, options, source=source, problems=problems)


def load_huggingface(location: str, meta: Metadata, options: LoadOptions) -> torch.nn.Module:
    """A transformers model built by the Auto class `transformers_class` (no remote code)."""
    strategy, source = meta.loading_strategy, _source(location)
    auto = auto_class(strategy.transformers_class or "", source)
    files = model_files(location, strategy, options)
    config = read_config(files["config.json"])
    return assemble(lambda: auto.from_config(config), files, strategy, options, source=source)


LOADERS: Final[Mapping[LoaderType, Loader]] = {
    "custom_mtp": load_custom_mtp,
    "huggingface": load_huggingface,
}


def model_files(location: str, strategy: LoadingStrategy, options: LoadOptions) -> dict[str, Path]:
    """Local paths of `required_files`, plus the shards any shard index among them lists.

    Raises:
        MetadataError: `config.json` is not listed.
        ModelFileError: a file is missing.
    """
    if "config.json" not in strategy.required_files:
        raise MetadataError(
            f"{_source(location)}: `$.loading_strategy.required_files` must list config.json"
        )

    def get(names: Sequence[str]) -> dict[str, Path]:
        return fetch(
            location,
            names,
            storage_options=options.storage_options,
            cache_dir=options.cache_dir,
            progress=options.progress,
        )

    files = get(strategy.required_files)
    indexes = [n for n in strategy.required_files if n.endswith(INDEX_SUFFIX)]
    shards = [s for n in indexes for s in shard_names(files[n])]
    return files | get(shards) if shards else files


def checkpoint_paths(
    files: Mapping[str, Path], strategy: LoadingStrategy, source: str
) -> list[Path]:
    """The safetensors files to read, shards of an index in their index's order."""
    names = weight_names(strategy.required_files, source)
    return [
        files[shard]
        for name in names
        for shard in (shard_names(files[name]) if name.endswith(INDEX_SUFFIX) else (name,))
    ]


def assemble(
    construct: Callable[[], torch.nn.Module],
    files: Mapping[str, Path],
    strategy: LoadingStrategy,
    options: LoadOptions,
    *,
    source: str,
    problems: list[str] | None = None,
) -> torch.nn.Module:
    """Build the model empty, check the remapped checkpoint fits it exactly, then assign.

    Raises:
        MetadataError: `problems` were found before, or the model left tensors on meta.
        WeightsError: missing, unexpected or misshapen keys (all of them, with hints).
    """
    model = build_empty(construct)
    tensors = read_tensors(checkpoint_paths(files, strategy, source))
    mapped = remap_state_dict(tensors, strategy.state_dict_mapping)
    expected, groups = state_shapes(model)
    mismatch = compare(expected, groups, shapes(mapped))
    if problems or not fits(mismatch):
        hints = [
            *prefix_hints(shapes(tensors), strategy.state_dict_mapping, expected, groups),
            *_architecture_hint(getattr(model, "config", None), model),
        ]
        detail = (
            "" if fits(mismatch) else describe(mismatch, model=type(model).__name__, hints=hints)
        )
        if problems:
            raise MetadataError("\n".join([*problems, *([f"also, {detail}"] if detail else [])]))
        raise WeightsError(f"{source}: {detail}")
    assign(model, mapped, groups, options.dtype)
    if leftovers := meta_leftovers(model):
        raise MetadataError(
            f"{source}: {type(model).__name__} leaves {', '.join(leftovers)} on the meta device "
            "after loading; its module must create buffers without device='meta'"
        )
    return model.eval()


def _architecture_hint(config: PretrainedConfig | None, model: torch.nn.Module) -> list[str]:
    archs: list[str] = list(getattr(config, "architectures", None) or [])
    built = type(model).__name__
    if not archs or built in archs:
        return []
    auto = auto_class_for(archs[0], str(getattr(config, "model_type", "")))
    fix = f": set transformers_class to {auto!r}" if auto else ""
    return [f"config.json names the architecture {archs[0]}, but {built} was built{fix}"]


def _source(location: str) -> str:
    return join(location, "metadata.json")
