"""Checkpoint key -> model key (`remap_state_dict`, pure), and the strict comparison of a
checkpoint's keys and shapes with a model's, with fixes that are tried, not guessed."""

import re
from collections.abc import Mapping, Sequence
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
