"""Strict comparison of a checkpoint's keys and shapes with a model's, and hints for fixing it.

Works on names and shapes only, so a dry run can use safetensors headers and a
model built on the meta device.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import msgspec

from wmtp.errors import WeightsError
from wmtp.metadata import StateDictMapping
from wmtp.remap import remap_state_dict

Shape = tuple[int, ...]
# Names under which the model holds one tensor (tied weights share a group).
Groups = Sequence[tuple[str, ...]]

_SHOWN = 8  # keys listed per kind before "and N more"


class Mismatch(msgspec.Struct, frozen=True):
    """What keeps a checkpoint from fitting a model; all empty means it fits."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    misshapen: tuple[tuple[str, Shape, Shape], ...] = ()  # key, checkpoint shape, model shape


def compare(expected: Mapping[str, Shape], groups: Groups, found: Mapping[str, Shape]) -> Mismatch:
    """Missing, unexpected and misshapen keys of checkpoint `found` against a model.

    A group of tied names is satisfied by any one of them.
    """
    missing = [g[0] for g in groups if not any(name in found for name in g)]
    unexpected = [k for k in found if k not in expected]
    misshapen = [
        (k, s, expected[k]) for k, s in found.items() if k in expected and expected[k] != s
    ]
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
    """The simplest change to `state_dict_mapping` under which the checkpoint fits exactly
    (tried, not guessed): a sentence saying it, and the fixed mapping; None when no single
    change does."""
    current = compare(expected, groups, _remapped(checkpoint, mapping) or {})
    n, replace = len(current.unexpected), msgspec.structs.replace
    tries: list[tuple[str, StateDictMapping]] = []
    if mapping.remove_prefix:
        tries.append(
            (
                f"remove_prefix {mapping.remove_prefix!r} makes {n} keys unexpected; the "
                "checkpoint keys already match without it: set remove_prefix to null",
                replace(mapping, remove_prefix=None),
            )
        )
    if mapping.add_prefix:
        tries.append(
            (
                f"add_prefix {mapping.add_prefix!r} makes {n} keys unexpected: "
                "set add_prefix to null",
                replace(mapping, add_prefix=None),
            )
        )
    elif current.unexpected:
        if cut := _common_prefix(current.unexpected):
            new = (mapping.remove_prefix or "") + cut
            tries.append(
                (
                    f"all {n} unexpected keys start with {cut!r}, which the model's keys lack: "
                    f"set remove_prefix to {new!r}",
                    replace(mapping, remove_prefix=new),
                )
            )
        if add := _common_prefix(current.missing):
            lack = f"all {n} unexpected keys lack the prefix {add!r} that the model expects"
            tries.append((f"{lack}: set add_prefix to {add!r}", replace(mapping, add_prefix=add)))
            # When some keys already fit (a tied head, say), prefix only the others.
            heads = "|".join(sorted({re.escape(k.split(".")[0]) for k in current.unexpected}))
            rule = {f"((?:{heads})\\..*)": add + "\\1"}
            tries.append(
                (
                    f"{lack}: add it to them with key_transforms {json.dumps(rule)}",
                    replace(mapping, key_transforms=rule | mapping.key_transforms),
                )
            )
    for hint, alternative in tries:
        fixed = _remapped(checkpoint, alternative)
        if fixed is not None and fits(compare(expected, groups, fixed)):
            return hint, alternative
    return None


def _remapped(
    checkpoint: Mapping[str, Shape], mapping: StateDictMapping
) -> dict[str, Shape] | None:
    try:
        return remap_state_dict(checkpoint, mapping)
    except WeightsError:
        return None


def _common_prefix(keys: Sequence[str]) -> str:
    """The longest prefix, ending at a dot, that every key shares."""
    prefix = os.path.commonprefix(list(keys))  # noqa: RUF071 (meant: char-wise)
    return prefix[: prefix.rfind(".") + 1]


def describe(m: Mismatch, *, model: str, hints: Sequence[str]) -> str:
    """A message listing every problem of `m`, sorted, then the hints."""
    lines = [f"the checkpoint does not fit {model} (loading is strict):"]
    for label, keys in (
        ("missing (in the model, not in the checkpoint)", m.missing),
        ("unexpected (in the checkpoint, not in the model)", m.unexpected),
    ):
        if keys:
            shown = ", ".join(map(repr, keys[:_SHOWN]))
            more = f" … and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
            lines.append(f"  {len(keys)} {label}: {shown}{more}")
    for key, got, want in m.misshapen:
        lines.append(f"  shape of {key!r}: checkpoint {list(got)}, model {list(want)}")
    lines.extend(f"hint: {h}" for h in hints)
    return "\n".join(lines)
