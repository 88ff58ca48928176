"""Checkpoint keys -> model keys (`remap_state_dict`, pure), and the strict comparison of a
checkpoint's keys and shapes with a model's, with fixes that are tried, not guessed.

Works on names and shapes only, so headers and a model built on the meta device suffice.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

import msgspec

from wmtp.errors import WeightsError
from wmtp.metadata import StateDictMapping

V = TypeVar("V")
Shape = tuple[int, ...]
Groups = Sequence[tuple[str, ...]]  # names under which the model holds one tensor (tied)
_SHOWN = 8  # keys listed per kind before "and N more"


class Mismatch(msgspec.Struct, frozen=True):
    """What keeps a checkpoint from fitting a model; all empty means it fits."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    misshapen: tuple[tuple[str, Shape, Shape], ...] = ()  # key, checkpoint shape, model shape


def remap_key(key: str, mapping: StateDictMapping) -> str | None:
    """The model's name for checkpoint key `key`, or None if a transform drops it.

    Order: `remove_prefix` (where the key has it), then the first of `key_transforms` whose
    pattern matches the whole key, then `add_prefix`.
    """
    if mapping.remove_prefix and key.startswith(mapping.remove_prefix):
        key = key[len(mapping.remove_prefix) :]
    for pattern, replacement in mapping.key_transforms.items():
        if match := re.fullmatch(pattern, key):
            if replacement is None:
                return None
            key = match.expand(replacement)
            break
    return (mapping.add_prefix or "") + key


def remap_state_dict(state_dict: Mapping[str, V], mapping: StateDictMapping) -> dict[str, V]:
    """A new dict with every key renamed by `mapping`; the values are the same objects.

    Args:
        state_dict: checkpoint key -> tensor (or anything: shapes, for a dry run).
        mapping: the metadata's `state_dict_mapping`.

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


def compare(expected: Mapping[str, Shape], groups: Groups, found: Mapping[str, Shape]) -> Mismatch:
    """Missing, unexpected and misshapen keys of checkpoint `found` against a model's
    `expected` keys; a group of tied names is satisfied by any one of them."""
    missing = [g[0] for g in groups if not any(name in found for name in g)]
    unexpected = [k for k in found if k not in expected]
    misshapen = [(k, s, expected[k]) for k, s in found.items() if expected.get(k, s) != s]
    return Mismatch(tuple(sorted(missing)), tuple(sorted(unexpected)), tuple(sorted(misshapen)))


def fits(m: Mismatch) -> bool:
    """True when nothing is missing, unexpected or misshapen."""
    return not (m.missing or m.unexpected or m.misshapen)


def mapping_fix(
    checkpoint: Mapping[str, Shape],
    mapping: StateDictMapping,
    expected: Mapping[str, Shape],
    groups: Groups,
) -> tuple[str, StateDictMapping] | None:
    """The simplest change to `mapping` under which the checkpoint fits exactly, tried in
    turn: a sentence saying it, and the fixed mapping; None when no single change does."""
    for hint, candidate in _candidates(checkpoint, mapping, expected, groups):
        try:
            if fits(compare(expected, groups, remap_state_dict(checkpoint, candidate))):
                return hint, candidate
        except WeightsError:
            continue
    return None


def _candidates(
    checkpoint: Mapping[str, Shape],
    mapping: StateDictMapping,
    expected: Mapping[str, Shape],
    groups: Groups,
) -> list[tuple[str, StateDictMapping]]:
    try:
        now = compare(expected, groups, remap_state_dict(checkpoint, mapping))
    except WeightsError:
        return []
    n, replace, out = len(now.unexpected), msgspec.structs.replace, []
    if mapping.remove_prefix:
        out.append(
            (
                f"remove_prefix {mapping.remove_prefix!r} makes {n} keys unexpected; the "
                "checkpoint keys already match without it: set remove_prefix to null",
                replace(mapping, remove_prefix=None),
            )
        )
    if mapping.add_prefix:
        hint = (
            f"add_prefix {mapping.add_prefix!r} makes {n} keys unexpected: set add_prefix to null"
        )
        return [*out, (hint, replace(mapping, add_prefix=None))]
    if cut := _common_prefix(now.unexpected):
        new = (mapping.remove_prefix or "") + cut
        hint = f"all {n} unexpected keys start with {cut!r}, which the model's keys lack"
        out.append((f"{hint}: set remove_prefix to {new!r}", replace(mapping, remove_prefix=new)))
    if now.unexpected and (add := _common_prefix(now.missing)):
        lack = f"all {n} unexpected keys lack the prefix {add!r} that the model expects"
        out.append((f"{lack}: set add_prefix to {add!r}", replace(mapping, add_prefix=add)))
        # When some keys already fit (a tied head, say), prefix only the others.
        heads = "|".join(sorted({re.escape(k.split(".")[0]) for k in now.unexpected}))
        rule = {f"((?:{heads})\\..*)": add + "\\1"}
        transforms = rule | mapping.key_transforms
        hint = f"{lack}: add it to them with key_transforms {json.dumps(rule)}"
        out.append((hint, replace(mapping, key_transforms=transforms)))
    return out


def _common_prefix(keys: Sequence[str]) -> str:
    """The longest prefix, ending at a dot, that every key shares."""
    prefix = os.path.commonprefix(list(keys))  # noqa: RUF071 (meant: char-wise)
    return prefix[: prefix.rfind(".") + 1]


def describe(m: Mismatch, model: str, hints: Sequence[str]) -> str:
    """A message listing every problem of `m`, sorted, then the hints."""
    lines = [f"the checkpoint does not fit {model} (loading is strict):"]
    for label, keys in (
        ("missing (in the model, not in the checkpoint)", m.missing),
        ("unexpected (in the checkpoint, not in the model)", m.unexpected),
    ):
        if keys:
            more = f" … and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
            lines.append(f"  {len(keys)} {label}: {', '.join(map(repr, keys[:_SHOWN]))}{more}")
    lines += [
        f"  shape of {k!r}: checkpoint {list(got)}, model {list(want)}"
        for k, got, want in m.misshapen
    ]
    return "\n".join([*lines, *(f"hint: {h}" for h in hints)])
