"""Build a model empty (parameters on meta, buffers such as rotary `inv_freq` real, which
`torch.device("meta")` cannot do: hence a `register_parameter` patch), then fill it: keys
renamed by `remap_state_dict`, checked by `compare`, tensors given by `assign`."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import count
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from wmtp.errors import MetadataError, OptionError
from wmtp.metadata import StateDictMapping
from wmtp.store import read_local

if TYPE_CHECKING:
    import torch
    from torch.nn import Module
    from transformers import PretrainedConfig

V = TypeVar("V")
Sig = tuple[tuple[int, ...], str]  # a tensor's shape and torch dtype name ("float32")
Groups = Sequence[tuple[str, ...]]  # the names under which a model holds one (tied) tensor


class ModelClass(msgspec.Struct, frozen=True):
    """What builds the model, its name, and problems to report with the checkpoint's."""

    name: str
    build: Callable[[PretrainedConfig], torch.nn.Module]
    problems: tuple[str, ...] = ()


def remap_state_dict(state_dict: Mapping[str, V], mapping: StateDictMapping) -> dict[str, V]:
    """A new dict with every key renamed by `mapping`; the values (tensors, or shapes for a
    check from headers) are the same objects. Each key loses `remove_prefix` where it has it,
    is rewritten by the first of `key_transforms` matching it whole (dropped by a null), then
    gains `add_prefix`.

    Raises:
        WeightsError: two checkpoint keys end at the same model key (both are named).

    Example:
        >>> m = StateDictMapping(remove_prefix="model.", key_transforms={r"(.*)\\.g": r"\\1.w"})
        >>> remap_state_dict({"model.norm.g": t}, m)
        {'norm.w': t}
    """
    out, source, until = dict[str, V](), dict[str, str](), time.monotonic() + 2.0  # all keys
    for key, value in state_dict.items():
        if (new := remap_key(key, mapping, until)) is None:
            continue
        if new in source:
            from wmtp.hints import collision

            raise collision(source[new], key, new)
        source[new], out[new] = key, value
    return out


def remap_key(key: str, mapping: StateDictMapping, until: float) -> str | None:
    """The model's name for checkpoint key `key` (see `remap_state_dict`); None drops it.
    Matching ends by `until` (`time.monotonic()`), else `MetadataError`."""
    if mapping.remove_prefix and key.startswith(mapping.remove_prefix):
        key = key[len(mapping.remove_prefix) :]
    import regex  # `re` would hold the GIL forever on a pattern like ([\w.]+)+Z from a bucket

    for pattern, replacement in mapping.key_transforms.items():
        try:
            match = regex.fullmatch(pattern, key, timeout=max(until - time.monotonic(), 1e-3))
        except TimeoutError:  # a real mapping takes microseconds a key
            from wmtp.hints import runaway

            raise runaway(pattern, key) from None
        if match:
            if replacement is None:
                return None
            key = match.expand(replacement)
            break
    return (mapping.add_prefix or "") + key


def compare(
    expected: Mapping[str, Sig], groups: Groups, found: Mapping[str, Sig]
) -> tuple[list[str], list[str], list[tuple[str, Sig, Sig]]]:
    """How checkpoint `found` misses a model's `expected` keys, shapes and dtypes: the keys
    missing (one of a tied group is enough), unexpected and misshapen, sorted; empty: it fits."""
    missing = [g[0] for g in groups if not any(name in found for name in g)]
    unexpected = [k for k in found if k not in expected]
    misshapen = [(k, s, expected[k]) for k, s in found.items() if expected.get(k, s) != s]
    return sorted(missing), sorted(unexpected), sorted(misshapen)


# Process-wide patches: one build at a time, its thread only; transformers' lazy imports
# race in threads, so the config and class are found under it too.
LOCK = threading.Lock()
_FILLS = ("normal_", "uniform_", "fill_", "zero_")  # init fills: slow on meta, and pointless


def build_empty(cls: Callable[[Any], Module], config: Any, what: str, most: int) -> Module:
    """`cls(config)` with every parameter on the meta device; a failure, or more than `most`
    parameters (an absurd config.json), is a `MetadataError` naming `what` (cause chained)."""
    import torch

    with LOCK:
        register, me, made = torch.nn.Module.register_parameter, threading.get_ident(), count(1)
        fills = {name: getattr(torch.Tensor, name) for name in _FILLS}

        def to_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
            if param is not None and not param.is_meta and threading.get_ident() == me:
                if next(made) > most:  # stop early: 10**5 layers would take minutes to build
                    raise ValueError(f"over {most} parameters, far more than the checkpoint has")
                param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            register(module, name, param)  # another thread's assign goes through untouched

        torch.nn.Module.register_parameter = to_meta  # type: ignore[method-assign,assignment]
        for n, f in fills.items():
            setattr(torch.Tensor, n, lambda t, *a, f=f, **k: t if t.is_meta else f(t, *a, **k))
        try:
            return cls(config)
        except Exception as e:
            raise MetadataError(f"{what}: building the model from config.json failed: {e!r}") from e
        finally:
            torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
            for name, fill in fills.items():
                setattr(torch.Tensor, name, fill)


def read_config(
    path: Path, overrides: Mapping[str, Any]
) -> tuple[PretrainedConfig, dict[str, Any]]:
    """The transformers config of `config.json`, by its `model_type`, with `overrides` set
    (each a setting it has: a typo is an error), and the values they replaced; `MetadataError`."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(overrides, Mapping):
        raise OptionError(f"config_overrides takes a dict of settings, not {overrides!r}")
    try:
        data = msgspec.json.decode(read_local(path), type=dict[str, Any])
    except msgspec.MsgspecError as e:
        raise MetadataError(f"{path}: not a JSON object: {e}") from None
    if str(kind := data.get("model_type")) not in CONFIG_MAPPING:
        from wmtp.hints import unknown_model_type

        raise unknown_model_type(path, kind)
    try:
        known = {**(cls := CONFIG_MAPPING[str(kind)])().to_dict(), **data}
        config: PretrainedConfig = cls.from_dict(data | dict(overrides))
    except Exception as e:  # transformers' validation errors share no base class
        raise MetadataError(f"{path}: transformers refuses this {kind} config: {e}") from e
    if unknown := sorted(overrides.keys() - known):
        from wmtp.hints import unknown_settings

        raise unknown_settings(path, unknown, known)
    return config, {key: known[key] for key in overrides}


def import_module_file(path: Path) -> ModuleType:
    """Import `path` under a name unique to its content (model files that differ never share
    code; one file is imported once); a failure is a `MetadataError` (the cause chained)."""
    name = f"wmtp_custom_{hashlib.sha256(read_local(path)).hexdigest()[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None  # a .py path always has a loader
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses need it
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # a module that exits has failed to import
        del sys.modules[name]
        raise MetadataError(f"{path}: importing the model's module failed: {e!r}") from e
    return module


def assign(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], groups: Groups) -> None:
    """Give every tied group of `model` its tensor, one Parameter per group; `MetadataError`
    if the model still holds tensors on the meta device afterwards."""
    import torch

    for group in groups:
        tensor = tensors[next(name for name in group if name in tensors)]
        owner, _, attr = group[0].rpartition(".")
        old = model.get_submodule(owner)._parameters.get(attr)
        new = tensor if old is None else torch.nn.Parameter(tensor, old.requires_grad)
        for name in group:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, new)
    if left := [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
        why = "on meta; its module must create buffers without device='meta'"
        raise MetadataError(f"{type(model).__name__} leaves {', '.join(sorted(left))} {why}")
