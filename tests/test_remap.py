"""Properties of `remap_state_dict`, each test named after its rule."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wmtp import StateDictMapping, WeightsError, remap_state_dict
from wmtp.build import remap_key

TEMPLATES = [
    "transformer.h.{}.attn.c_attn.weight",
    "transformer.h.{}.mlp.c_fc.bias",
    "model.layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.input_layernorm.weight",
    "extra_heads.{}.weight",
    "encoder.layer.{}.attention.self.query.weight",
]
FIXED = ["transformer.wte.weight", "transformer.ln_f.bias", "lm_head.weight", "model.norm.weight"]

layer_key = st.builds(str.format, st.sampled_from(TEMPLATES), st.integers(0, 63))
key = st.one_of(layer_key, st.sampled_from(FIXED))
state_dicts = st.dictionaries(key, st.builds(object), max_size=40)
prefixes = st.sampled_from(["base_model.", "model.", "module.", "transformer.", "a.b."])


@given(state_dicts)
def test_remap_identity(sd: dict[str, object]) -> None:
    out = remap_state_dict(sd, StateDictMapping())
    assert out == sd, (out, sd)


@given(state_dicts, prefixes)
def test_remap_add_then_remove_prefix_round_trips(sd: dict[str, object], prefix: str) -> None:
    added = remap_state_dict(sd, StateDictMapping(add_prefix=prefix))
    assert all(k.startswith(prefix) for k in added)
    back = remap_state_dict(added, StateDictMapping(remove_prefix=prefix))
    assert back == sd, (back, sd)


@given(state_dicts, prefixes)
def test_remap_never_copies(sd: dict[str, object], prefix: str) -> None:
    out = remap_state_dict(sd, StateDictMapping(add_prefix=prefix))
    assert {id(v) for v in out.values()} == {id(v) for v in sd.values()}
    assert all(out[prefix + k] is v for k, v in sd.items())


@given(state_dicts, st.data())
def test_remap_never_mutates_its_input(sd: dict[str, object], data: st.DataObject) -> None:
    before = dict(sd)
    remap_state_dict(sd, StateDictMapping(remove_prefix=data.draw(prefixes)))
    assert sd == before


@given(st.lists(st.integers(0, 63), min_size=1, max_size=10, unique=True), prefixes)
def test_remap_rejects_collisions(layers: list[int], prefix: str) -> None:
    # The same layer stored with and without the prefix collides once the prefix is removed.
    sd = {f"h.{i}.weight": object() for i in layers}
    sd[f"{prefix}h.{layers[0]}.weight"] = object()
    with pytest.raises(WeightsError) as err:
        remap_state_dict(sd, StateDictMapping(remove_prefix=prefix))
    assert f"'h.{layers[0]}.weight'" in str(err.value)
    assert f"'{prefix}h.{layers[0]}.weight'" in str(err.value)


@given(st.lists(layer_key, min_size=2, max_size=20, unique=True))
def test_remap_rejects_collisions_from_transforms(keys: list[str]) -> None:
    mapping = StateDictMapping(key_transforms={r".*": "same.weight"})
    with pytest.raises(WeightsError, match=r"sends both .* to 'same.weight'"):
        remap_state_dict(dict.fromkeys(keys, 0), mapping)


@given(state_dicts, prefixes, st.randoms(use_true_random=False))
def test_remap_is_independent_of_input_order(
    sd: dict[str, object], prefix: str, rng: random.Random
) -> None:
    mapping = StateDictMapping(
        remove_prefix="transformer.",
        key_transforms={r"h\.(\d+)\.(.*)": r"layers.\1.\2", r"lm_head\..*": None},
        add_prefix=prefix,
    )
    items = list(sd.items())
    rng.shuffle(items)
    assert remap_state_dict(dict(items), mapping) == remap_state_dict(sd, mapping)


@given(state_dicts)
def test_remap_passes_unmatched_keys_unchanged(sd: dict[str, object]) -> None:
    mapping = StateDictMapping(remove_prefix="nothing.", key_transforms={r"nothing\..*": None})
    assert remap_state_dict(sd, mapping) == sd


@given(st.integers(0, 63))
def test_remap_order_is_remove_then_transforms_then_add(layer: int) -> None:
    SOON = time.monotonic() + 2  # noqa: N806 (the deadline every key of one mapping shares)
    mapping = StateDictMapping(
        remove_prefix="module.",
        key_transforms={r"h\.(\d+)\.w": r"layers.\1.weight"},
        add_prefix="model.",
    )
    # The transform sees the key without the removed prefix and before the added one.
    assert remap_key(f"module.h.{layer}.w", mapping, SOON) == f"model.layers.{layer}.weight"
    assert remap_key(f"h.{layer}.w", mapping, SOON) == f"model.layers.{layer}.weight"
    assert remap_key(f"model.h.{layer}.w", mapping, SOON) == f"model.model.h.{layer}.w"


def test_remap_first_matching_transform_wins() -> None:
    mapping = StateDictMapping(key_transforms={r"a\.(.*)": r"first.\1", r"a\.b": "second"})
    assert remap_state_dict({"a.b": 1}, mapping) == {"first.b": 1}


def test_remap_null_transform_drops_the_key() -> None:
    mapping = StateDictMapping(key_transforms={r".*\.attn\.bias": None})
    out = remap_state_dict({"h.0.attn.bias": 1, "h.0.attn.weight": 2}, mapping)
    assert out == {"h.0.attn.weight": 2}


def test_remap_patterns_match_whole_keys() -> None:
    mapping = StateDictMapping(key_transforms={r"attn": "x"})
    assert remap_state_dict({"h.0.attn.bias": 1}, mapping) == {"h.0.attn.bias": 1}
