"""`load` on every kind of model: every tensor equals the file's, and the model runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import wmtp
from tests import builders
from tests.conftest import Copy


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint as safetensors itself reads it."""
    return load_file(folder / "model.safetensors")


def assert_equals_file(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Every checkpoint tensor is in the model under its (mapped) name, bit for bit,
    and every tensor of the model's state comes from the checkpoint."""
    state = model.state_dict()
    assert set(expected) <= set(state), sorted(set(expected) - set(state))
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    loaded = {t.data_ptr() for t in state.values()}
    assert all(t.data_ptr() in loaded for t in state.values())
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("mtp", "DistilGPT2MTP"),
        ("llama_mtp", "LlamaMTP"),
        ("gpt2_reference", "GPT2LMHeadModel"),
        ("gpt2_reward", "GPT2LMHeadModel"),
        ("distilbert_reward", "DistilBertForSequenceClassification"),
    ],
)
def test_load_every_tensor_equals_file(models: dict[str, Path], name: str, cls: str) -> None:
    model = wmtp.load(str(models[name]))
    assert type(model).__name__ == cls
    assert not model.training
    assert_equals_file(model, file_tensors(models[name]))
    # Every state key is either stored or tied to a stored one.
    stored = set(file_tensors(models[name]))
    state = model.state_dict()
    ptrs = {state[k].data_ptr() for k in stored}
    assert all(t.data_ptr() in ptrs for t in state.values())
    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 7, 3]]))
    logits = out["logits"]
    assert torch.isfinite(logits).all()


def test_mtp_forward_matches_the_saved_model(models: dict[str, Path]) -> None:
    original = builders.mtp_model(seed=0).eval()
    loaded = wmtp.load(str(models["mtp"]))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        want, got = original(ids)["logits"], loaded(ids)["logits"]
    assert got.shape == (1, 6, 4, 128)
    assert torch.equal(got, want)


def test_tied_lm_head_is_the_embedding(models: dict[str, Path]) -> None:
    model = wmtp.load(str(models["mtp"]))
    base: Any = model.get_submodule("base_model")
    assert base.lm_head.weight is base.transformer.wte.weight
    assert len(file_tensors(models["mtp"])) == len(model.state_dict()) - 1  # stored once


def test_non_persistent_buffers_hold_real_values(models: dict[str, Path]) -> None:
    model = wmtp.load(str(models["llama_mtp"]))
    # The oracle: the same class built normally, weights copied in by torch itself.
    reference = builders.llama_mtp_model(seed=1).eval()
    reference.load_state_dict(file_tensors(models["llama_mtp"]), strict=True)
    buffers = dict(model.named_buffers())
    assert "trunk.model.rotary_emb.inv_freq" in buffers
    for name, buffer in reference.named_buffers():
        assert torch.equal(buffers[name], buffer), name
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids)["logits"], reference(ids)["logits"])


@pytest.mark.parametrize(
    ("dtype", "want"),
    [
        (torch.bfloat16, torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("torch.float64", torch.float64),
    ],
)
def test_dtype_casts_floating_tensors(
    models: dict[str, Path], dtype: torch.dtype | str, want: torch.dtype
) -> None:
    model = wmtp.load(str(models["mtp"]), dtype=dtype)
    expected = {k: v.to(want) for k, v in file_tensors(models["mtp"]).items()}
    assert {p.dtype for p in model.parameters()} == {want}
    assert_equals_file(model, expected)


def test_device_places_the_model_and_refuses_meta(models: dict[str, Path]) -> None:
    model = wmtp.load(str(models["gpt2_reference"]), device=torch.device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(wmtp.OptionError, match=r"device 'meta' is not usable here"):
        wmtp.load(str(models["gpt2_reference"]), device="meta")  # it holds no weights


def test_custom_mapping_renames_checkpoint_keys(models: dict[str, Path], copy: Copy) -> None:
    """A checkpoint written with other names loads through remove_prefix, then key_transforms."""
    folder = copy(models["mtp"])
    original = file_tensors(folder)
    renamed = {
        "ckpt." + k.replace("base_model.", "trunk.").replace("extra_heads.", "heads."): v
        for k, v in original.items()
    }
    renamed["ckpt.unused.marker"] = torch.zeros(1)
    builders.write_checkpoint(folder, renamed)
    transforms = {r"trunk\.(.*)": r"base_model.\1", r"heads\.(.*)": r"extra_heads.\1"}
    builders.edit_metadata(
        folder,
        state_dict_mapping={
            "remove_prefix": "ckpt.",
            "key_transforms": transforms | {r"unused\..*": None},
        },
    )
    assert_equals_file(wmtp.load(str(folder)), original)


def test_huggingface_honours_mapping(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    original = file_tensors(folder)
    builders.write_checkpoint(folder, {"gpt." + k: v for k, v in original.items()})
    builders.edit_metadata(folder, state_dict_mapping={"remove_prefix": "gpt."})
    assert_equals_file(wmtp.load(str(folder)), original)


def test_sharded_checkpoint_loads_through_its_index(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["mtp"])
    tensors = file_tensors(folder)
    keys = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for shard, names in halves.items():
        save_file({k: tensors[k] for k in names}, folder / shard)
    weight_map = {k: shard for shard, names in halves.items() for k in names}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    builders.edit_metadata(
        folder, required_files=["config.json", "model.safetensors.index.json", "modeling.py"]
    )
    assert_equals_file(wmtp.load(str(folder)), tensors)


def test_two_modules_with_one_class_name_never_mix(models: dict[str, Path], copy: Copy) -> None:
    first = wmtp.load(str(models["mtp"]))
    folder = copy(models["mtp"])
    module = folder / "modeling.py"
    builders.write_text(folder, "modeling.py", module.read_text() + "\nMARKER = 'second'\n")
    second = wmtp.load(str(folder))
    assert type(first).__module__ != type(second).__module__
    assert sys.modules[type(second).__module__].MARKER == "second"
    assert not hasattr(sys.modules[type(first).__module__], "MARKER")


def test_load_accepts_file_url(models: dict[str, Path]) -> None:
    model = wmtp.load(models["gpt2_reference"].as_uri())
    assert_equals_file(model, file_tensors(models["gpt2_reference"]))


def test_example_model_loads() -> None:
    folder = builders.EXAMPLES / "tiny-mtp"
    model = wmtp.load(str(folder))
    assert type(model).__name__ == "DistilGPT2MTP"
    assert_equals_file(model, file_tensors(folder))
