"""Why a checkpoint does not fit its model, or no candidate serves an algorithm, and how to fix
it: imported only when a load fails. It takes what it explains as arguments.

Every explanation is tried before it is offered: a key-mapping fix is applied to the
checkpoint's keys and kept only when every key then fits.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from wmtp import build
from wmtp.build import Groups, ModelClass, Sig, remap_state_dict
from wmtp.errors import MetadataError, NoCompatibleModelError, WeightsError
from wmtp.location import join
from wmtp.metadata import CustomMTP, Metadata, StateDictMapping
from wmtp.weights import Header

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class Mismatch(NamedTuple):
    """What keeps a checkpoint from fitting a model (`wmtp.build.compare`); empty: it fits."""

    missing: Sequence[str] = ()
    unexpected: Sequence[str] = ()
    misshapen: Sequence[tuple[str, Sig, Sig]] = ()  # key, checkpoint's, model's (shape, dtype)


def compare(expected: Mapping[str, Sig], groups: Groups, found: Mapping[str, Sig]) -> Mismatch:
    """`wmtp.build.compare`, its parts named."""
    return Mismatch(*build.compare(expected, groups, found))


def refusal(
    source: str,
    problems: Sequence[str],
    model: Any,
    config: Any,
    found: Mapping[str, Sig],
    mapping: StateDictMapping,
    expected: Mapping[str, Sig],
    groups: Groups,
) -> Exception:
    """The one error that reports every problem of a load: the class's `problems` and the
    checkpoint's mismatch with `model`, with the fixes that work."""
    mismatch = compare(expected, groups, remap_state_dict(found, mapping))
    fix = mapping_fix(found, mapping, expected, groups)
    hints = [*([fix[0]] if fix else []), *architecture_hint(config, type(model).__name__)]
    detail = [describe(mismatch, type(model).__name__, hints)] if any(mismatch) else []
    if problems:
        error = MetadataError("\n".join([*problems, *(f"also, {d}" for d in detail)]))
        error.problems = (*problems, *(f"{source}: {d}" for d in detail))
        return error
    refused = WeightsError(f"{source}: {detail[0]}")
    refused.fix = fix[1] if fix else None
    return refused


def missing_class(location: str, strategy: CustomMTP, module: ModuleType) -> ModelClass:
    """The error for a `model_class_name` the module does not define, or, when it defines one
    model class only, that class with the problem, so the weights are checked against it too."""
    from torch.nn import Module

    own = [c for c in vars(module).values() if getattr(c, "__module__", "") == module.__name__]
    defined = sorted(c.__name__ for c in own if isinstance(c, type) and issubclass(c, Module))
    problem = (
        f"{join(location, 'metadata.json')}: model_class_name {strategy.model_class_name!r} is "
        f"not defined in {strategy.custom_module_file} (defined: "
        f"{', '.join(defined) or 'no model classes'})"
    )
    if len(defined) != 1:
        raise MetadataError(problem)
    fix = f"; set model_class_name to {defined[0]!r}"
    return ModelClass(defined[0], getattr(module, defined[0]), (problem + fix,))


def not_auto_class(location: str, name: str) -> MetadataError:
    """The error for a `transformers_class` that is not an Auto model class, listing them."""
    return MetadataError(
        f"{join(location, 'metadata.json')}: `$.loading_strategy.transformers_class` {name!r} "
        f"is not a transformers Auto model class; use one of: {', '.join(auto_names())}"
    )


def stored_twice(location: str, headers: Mapping[str, Header]) -> WeightsError:
    """The error for a tensor that two checkpoint files hold (the last read would win)."""
    seen: dict[str, str] = {}
    for name, header in headers.items():
        for key in header.tensors:
            if key in seen:
                return WeightsError(
                    f"tensor {key!r} is stored twice: in {join(location, seen[key])} and in "
                    f"{join(location, name)}"
                )
            seen[key] = name
    raise AssertionError("no tensor is stored twice")


def why_not(meta: Metadata | str, algo: str, role: str | None) -> str | None:
    """Why a candidate (its metadata, or why it could not be read) does not serve `algo` as
    `role` (any role when None); None when it does (`wmtp.metadata.serves`)."""
    if isinstance(meta, str):
        return meta
    if algo not in (served := meta.algorithm_compatibility):
        return f"algorithm_compatibility is {list(served)}"
    if role is not None and (kind := meta.wmtp_type) != role:
        return f"serves {algo} but wmtp_type is {kind!r}, not {role!r}"
    return None


def no_candidate(
    found: Mapping[str, Metadata | str], algo: str, role: str | None
) -> NoCompatibleModelError:
    """The error for an algorithm no candidate serves: each one's reason, and a close name
    when `algo` looks like a typo of one they serve."""
    served = [m.algorithm_compatibility for m in found.values() if not isinstance(m, str)]
    known = sorted({a for s in served for a in s})
    close = difflib.get_close_matches(algo, known, n=1) if isinstance(algo, str) else []
    lines = [f"  {path}: {why_not(meta, algo, role)}" for path, meta in found.items()]
    return NoCompatibleModelError(
        f"no candidate serves {algo!r}{f' as {role}' if role else ''}:\n"
        + "\n".join(lines or ["  (no candidates given)"])
        + (f"\ndid you mean {close[0]!r}?" if close else "")
    )


def mapping_fix(
    found: Mapping[str, Sig],
    mapping: StateDictMapping,
    expected: Mapping[str, Sig],
    groups: Groups,
) -> tuple[str, StateDictMapping] | None:
    """The first simple change to `mapping` under which the checkpoint fits exactly, as a
    sentence and the fixed mapping; None when none does."""
    try:
        now = compare(expected, groups, remap_state_dict(found, mapping))
    except WeightsError:
        return None
    for hint, fixed in _tries(now, mapping):
        try:
            if not any(compare(expected, groups, remap_state_dict(found, fixed))):
                return hint, fixed
        except WeightsError:
            continue
    return None


def _tries(now: Mismatch, mapping: StateDictMapping) -> Iterator[tuple[str, StateDictMapping]]:
    """Simple changes to `mapping` that could explain the mismatch `now`, simplest first."""
    n, replace, cut, add = len(now.unexpected), msgspec.structs.replace, "", ""
    if old := mapping.remove_prefix:
        hint = f"remove_prefix {old!r} makes {n} keys unexpected; the checkpoint keys already "
        yield (
            hint + "match without it: set remove_prefix to null",
            replace(mapping, remove_prefix=None),
        )
    if mapping.add_prefix:
        hint = f"add_prefix {mapping.add_prefix!r} makes {n} keys unexpected"
        yield hint + ": set add_prefix to null", replace(mapping, add_prefix=None)
        return
    if cut := _prefix(now.unexpected):
        new = (old or "") + cut
        hint = f"all {n} unexpected keys start with {cut!r}, which the model's keys lack"
        yield f"{hint}: set remove_prefix to {new!r}", replace(mapping, remove_prefix=new)
    if now.unexpected and (add := _prefix(now.missing)):
        lack = f"all {n} unexpected keys lack the prefix {add!r} that the model expects"
        yield f"{lack}: set add_prefix to {add!r}", replace(mapping, add_prefix=add)
        # When some keys already fit (a tied head, say), prefix only the others.
        heads = "|".join(sorted({re.escape(k.split(".")[0]) for k in now.unexpected}))
        rule = {f"((?:{heads})\\..*)": add + "\\1"}
        transforms = rule | mapping.key_transforms
        yield (
            f"{lack}: add it with key_transforms {json.dumps(rule)}",
            replace(mapping, key_transforms=transforms),
        )


def _prefix(keys: Sequence[str]) -> str:
    """The longest prefix, ending at a dot, that every key shares."""
    prefix = os.path.commonprefix(list(keys))  # noqa: RUF071 (meant: char-wise)
    return prefix[: prefix.rfind(".") + 1]


def auto_names() -> list[str]:
    """Names of the transformers Auto classes that build models."""
    from transformers.models.auto import modeling_auto

    return sorted(n for n in vars(modeling_auto) if n.startswith("AutoModel"))


def auto_class_for(architecture: str, model_type: str) -> str | None:
    """The Auto class that builds `architecture` for `model_type`, if one does."""
    import transformers

    for name in auto_names():
        # _model_mapping._model_mapping: model_type -> class name(s), without importing them
        mapping = getattr(getattr(transformers, name), "_model_mapping", None)
        built = getattr(mapping, "_model_mapping", {}).get(model_type)
        if built == architecture or (isinstance(built, tuple | list) and architecture in built):
            return name
    return None


def architecture_hint(config: PretrainedConfig, built: str) -> list[str]:
    """A hint when config.json's `architectures` names another class than the one built."""
    archs = getattr(config, "architectures", None)  # whatever config.json holds
    if not isinstance(archs, list | tuple) or not archs or built in archs:
        return []
    auto = auto_class_for(archs[0], str(getattr(config, "model_type", "")))
    fix = f": set transformers_class to {auto!r}" if auto else ""
    return [f"config.json names the architecture {archs[0]}, but {built} was built{fix}"]


def describe(m: Mismatch, model: str, hints: Sequence[str]) -> str:
    """A message listing every problem of `m`, sorted, eight keys a kind at most, then hints."""
    lines = [f"the checkpoint does not fit {model}, as config.json builds it (loading is strict):"]
    for keys, label in (
        (m.missing, "missing (in the model, not in the checkpoint)"),
        (m.unexpected, "unexpected (in the checkpoint, not in the model)"),
    ):
        more = f" … and {len(keys) - 8} more" if len(keys) > 8 else ""
        lines += [f"  {len(keys)} {label}: {', '.join(map(repr, keys[:8]))}{more}"] if keys else []
    for k, (shape, dtype), (want, kind) in m.misshapen:
        if shape != want:
            lines.append(f"  shape of {k!r}: checkpoint {list(shape)}, model {list(want)}")
        if dtype != kind:
            lines.append(f"  dtype of {k!r}: checkpoint {dtype}, model {kind}")
    if any(a[1] != b[1] and "float" in a[1] for _, a, b in m.misshapen):
        hints = [*hints, "pass dtype= (e.g. dtype='bf16') to cast every floating tensor to one"]
    return "\n".join([*lines, *(f"hint: {h}" for h in hints)])
