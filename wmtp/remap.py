"""Checkpoint key -> model key, as pure transforms of a mapping's keys."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

from wmtp.errors import WeightsError
from wmtp.metadata import StateDictMapping

V = TypeVar("V")


def remap_key(key: str, mapping: StateDictMapping) -> str | None:
    """The model's name for checkpoint key `key`, or None if a transform drops it.

    Order: `remove_prefix` (where the key has it), then the first of
    `key_transforms` whose pattern matches the whole key, then `add_prefix`.
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
        new = remap_key(key, mapping)
        if new is None:
            continue
        if new in source:
            first, second = sorted((source[new], key))
            raise WeightsError(
                f"state_dict_mapping sends both {first!r} and {second!r} to {new!r}; "
                "change remove_prefix/key_transforms so each checkpoint key has its own name, "
                "or drop one on purpose with a key_transforms entry mapping it to null"
            )
        source[new] = key
        out[new] = value
    return out
