"""Checkpoint key -> model key (`remap_state_dict`, pure), and the strict comparison of a
checkpoint's keys and shapes with a model's, with fixes that are tried, not guessed."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar

import msgspec

from wmtp.errors import WeightsError
from wmtp.metadata import StateDictMapping

V = TypeVar("V")
Shape = tuple[int, ...]
Groups = Sequence[tuple[str, ...]]  # the names under which a model holds one (tied) tensor


class Mismatch(msgspec.Struct, frozen=True):
    """What keeps a checkpoint from fitting a model; `Mismatch()` means it fits."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    misshapen: tuple[tuple[str, Shape, Shape], ...] = ()  # key, checkpoint shape, model shape


def remap_state_dict(state_dict: Mapping[str, V], mapping: StateDictMapping) -> dict[str, V]:
    """A new dict with every key renamed by `mapping`; the values are the same objects.

    Each key loses `remove_prefix` (where it has it), is rewritten by the first of
    `key_transforms` whose pattern matches it whole (or dropped by a null), then gains
    `add_prefix`. Values may be tensors, or shapes for a check from headers.

    Raises:
        WeightsError: two checkpoint keys end at the same model key (both are named).

    Example:
        >>> m = StateDictMapping(remove_prefix="model.", key_transforms={r"(.*)\\.g": r"\\1.w"})
        >>> remap_state_dict({"model.norm.g": t}, m)
        {'norm.w': t}
    """
    out: dict[str, V] = {}
    source: dict[str, str] = {}
    for key, value in state_dict.items():
        if (new := remap_key(key, mapping)) is None:
            continue
        if new in source:
            first, second = sorted((source[new], key))
            raise WeightsError(
                f"state_dict_mapping sends both {first!r} and {second!r} to {new!r}; "
                "change remove_prefix/key_transforms so each checkpoint key has its own name, "
                "or drop one on purpose with a key_transforms entry mapping it to null"
            )
        source[new], out[new] = key, value
    return out


def remap_key(key: str, mapping: StateDictMapping) -> str | None:
    """The model's name for checkpoint key `key` (see `remap_state_dict`); None drops it."""
    if mapping.remove_prefix and key.startswith(mapping.remove_prefix):
        key = key[len(mapping.remove_prefix) :]
    for pattern, replacement in mapping.key_transforms.items():
        if match := re.fullmatch(pattern, key):
            if replacement is None:
                return None
            key = match.expand(replacement)
            break
    return (mapping.add_prefix or "") + key


def compare(expected: Mapping[str, Shape], groups: Groups, found: Mapping[str, Shape]) -> Mismatch:
    """How checkpoint `found` misses a model's `expected` keys; one name of a tied group
    is enough."""
    missing = [g[0] for g in groups if not any(name in found for name in g)]
    unexpected = [k for k in found if k not in expected]
    misshapen = [(k, s, expected[k]) for k, s in found.items() if expected.get(k, s) != s]
    return Mismatch(tuple(sorted(missing)), tuple(sorted(unexpected)), tuple(sorted(misshapen)))


def mapping_fix(
    found: Mapping[str, Shape],
    mapping: StateDictMapping,
    expected: Mapping[str, Shape],
    groups: Groups,
) -> tuple[str, StateDictMapping] | None:
    """The first simple change to `mapping` under which the checkpoint fits exactly, as a
    sentence and the fixed mapping; None when none does."""
    for hint, fixed in _tries(found, mapping, expected, groups):
        try:
            if compare(expected, groups, remap_state_dict(found, fixed)) == Mismatch():
                return hint, fixed
        except WeightsError:
            continue
    return None


def _tries(
    found: Mapping[str, Shape],
    mapping: StateDictMapping,
    expected: Mapping[str, Shape],
    groups: Groups,
) -> Iterator[tuple[str, StateDictMapping]]:
    try:
        now = compare(expected, groups, remap_state_dict(found, mapping))
    except WeightsError:
        return
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


def describe(m: Mismatch, model: str, hints: Sequence[str]) -> str:
    """A message listing every problem of `m`, sorted, eight keys a kind at most, then hints."""
    lines = [f"the checkpoint does not fit {model} (loading is strict):"]
    for keys, label in (
        (m.missing, "missing (in the model, not in the checkpoint)"),
        (m.unexpected, "unexpected (in the checkpoint, not in the model)"),
    ):
        more = f" … and {len(keys) - 8} more" if len(keys) > 8 else ""
        lines += [f"  {len(keys)} {label}: {', '.join(map(repr, keys[:8]))}{more}"] if keys else []
    lines += [f"  shape of {k!r}: checkpoint {list(a)}, model {list(b)}" for k, a, b in m.misshapen]
    return "\n".join([*lines, *(f"hint: {h}" for h in hints)])
