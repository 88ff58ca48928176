"""Strict comparison of a checkpoint's keys and shapes with a model's, and hints for fixing it.

Works on names and shapes only, so a dry run can use safetensors headers and a
model built on the meta device.
"""

from __future__ import annotations

import os
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


def prefix_hints(
    checkpoint: Mapping[str, Shape],
    mapping: StateDictMapping,
    expected: Mapping[str, Shape],
    groups: Groups,
) -> list[str]:
    """Changes to `state_dict_mapping` under which the checkpoint fits the model exactly."""
    current = compare(expected, groups, _remapped(checkpoint, mapping) or {})
    unexpected, missing = current.unexpected, current.missing
    tries: list[tuple[str, StateDictMapping]] = []
    if mapping.remove_prefix:
        tries.append(
            (
                f"remove_prefix {mapping.remove_prefix!r} makes {len(unexpected)} keys "
                "unexpected; the checkpoint keys already match without it: "
                "set remove_prefix to null",
                msgspec.structs.replace(mapping, remove_prefix=None),
            )
        )
    if mapping.add_prefix:
        tries.append(
            (
                f"add_prefix {mapping.add_prefix!r} makes {len(unexpected)} keys unexpected; "
                "set add_prefix to null",
                msgspec.structs.replace(mapping, add_prefix=None),
            )
        )
    if unexpected and (cut := _common_prefix(unexpected)):
        tries.append(
            (
                f"all {len(unexpected)} unexpected keys start with {cut!r}, which the model's "
                f"keys lack: set remove_prefix to {(mapping.remove_prefix or '') + cut!r}",
                msgspec.structs.replace(mapping, remove_prefix=(mapping.remove_prefix or "") + cut),
            )
        )
    if missing and (add := _common_prefix(missing)):
        tries.append(
            (
                f"all {len(unexpected)} unexpected keys lack the prefix {add!r} that the "
                f"model expects: set add_prefix to {add + (mapping.add_prefix or '')!r}",
                msgspec.structs.replace(mapping, add_prefix=add + (mapping.add_prefix or "")),
            )
        )
    return [
        hint
        for hint, alternative in tries
        if (fixed := _remapped(checkpoint, alternative)) is not None
        and fits(compare(expected, groups, fixed))
    ]


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
