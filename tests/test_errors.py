"""Every way a load can go wrong gives one clear error naming the right thing."""

from __future__ import annotations

import gc
import importlib
import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import wmtp
from tests import builders
from tests.builders import FIXTURES
from tests.conftest import Copy

LOAD = importlib.import_module("wmtp.load")  # the module; `wmtp.load` is the function


def test_real_mtp_fixture_fails_with_both_mistakes_explained(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The published metadata: wrong class name, and a remove_prefix the model needs kept."""
    folder = builders.with_real_metadata(models["mtp"], "distilgpt2-mtp", tmp_path / "m")
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    message = str(err.value)
    assert "model_class_name 'GPTMTPForCausalLM' is not defined in modeling.py" in message
    assert "(defined: DistilGPT2MTP)" in message
    trunk = len(load_file(folder / "model.safetensors")) - 3  # all but the 3 extra heads
    assert f"remove_prefix 'base_model.' makes {trunk} keys unexpected" in message
    assert "set remove_prefix to null" in message


def test_real_mtp_fixture_with_class_fixed_still_refuses_the_prefix(
    models: dict[str, Path], tmp_path: Path
) -> None:
    folder = builders.with_real_metadata(models["mtp"], "distilgpt2-mtp", tmp_path / "m")
    builders.edit_metadata(folder, model_class_name="DistilGPT2MTP")
    with pytest.raises(wmtp.WeightsError) as err:
        wmtp.load(str(folder))
    message = str(err.value)
    assert message.startswith(f"{folder}/metadata.json: the checkpoint does not fit DistilGPT2MTP")
    assert "missing (in the model, not in the checkpoint): 'base_model.transformer." in message
    assert "unexpected (in the checkpoint, not in the model): 'lm_head.weight'" in message
    assert "hint: remove_prefix 'base_model.' makes" in message
    builders.edit_metadata(folder, state_dict_mapping={"remove_prefix": None})
    model = wmtp.load(str(folder))
    for key, tensor in load_file(folder / "model.safetensors").items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_reward_fixture_auto_model_on_a_classifier_says_which_class(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """`tiny-reward-model`: a sequence classifier's checkpoint loaded with AutoModel."""
    folder = builders.with_real_metadata(
        models["distilbert_reward"], "tiny-reward-model", tmp_path / "rm"
    )
    with pytest.raises(wmtp.WeightsError) as err:
        wmtp.load(str(folder))
    message = str(err.value)
    assert "does not fit DistilBertModel" in message
    assert "'classifier.bias'" in message
    assert "config.json names the architecture DistilBertForSequenceClassification" in message
    assert "set transformers_class to 'AutoModelForSequenceClassification'" in message


def test_add_prefix_hint(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    tensors = load_file(folder / "model.safetensors")
    builders.write_checkpoint(
        folder, {k.removeprefix("transformer."): v for k, v in tensors.items()}
    )
    with pytest.raises(wmtp.WeightsError) as err:
        wmtp.load(str(folder))
    message = str(err.value)
    # lm_head.weight (stored for the tied embedding) already fits: a blanket add_prefix would not.
    assert "lack the prefix 'transformer.' that the model expects" in message
    rule = r'key_transforms {"((?:h|ln_f|wpe)\\..*)": "transformer.\\1"}'
    assert rule in message, message
    builders.edit_metadata(
        folder,
        state_dict_mapping={"key_transforms": {r"((?:h|ln_f|wpe)\..*)": r"transformer.\1"}},
    )
    wmtp.load(str(folder))


def test_shape_mismatch_names_key_and_both_shapes(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["mtp"])
    tensors = load_file(folder / "model.safetensors")
    tensors["extra_heads.0.weight"] = torch.zeros(5, 7)
    builders.write_checkpoint(folder, tensors)
    with pytest.raises(wmtp.WeightsError) as err:
        wmtp.load(str(folder))
    assert "shape of 'extra_heads.0.weight': checkpoint [5, 7], model [128, 32]" in str(err.value)


def test_missing_and_unexpected_keys_are_all_listed_sorted(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["mtp"])
    tensors = load_file(folder / "model.safetensors")
    for k in ["extra_heads.2.weight", "extra_heads.0.weight"]:
        del tensors[k]
    tensors["zz.extra"], tensors["aa.extra"] = torch.zeros(1), torch.zeros(1)
    builders.write_checkpoint(folder, tensors)
    with pytest.raises(wmtp.WeightsError) as err:
        wmtp.load(str(folder))
    message = str(err.value)
    missing = "'extra_heads.0.weight', 'extra_heads.2.weight'"
    assert f"2 missing (in the model, not in the checkpoint): {missing}" in message
    assert "2 unexpected (in the checkpoint, not in the model): 'aa.extra', 'zz.extra'" in message
    assert isinstance(err.value, KeyError)


def test_unknown_class_lists_defined_ones(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["mtp"])
    module = (folder / "modeling.py").read_text()
    builders.write_text(
        folder, "modeling.py", module + "\n\nclass Other(torch.nn.Module):\n    pass\n"
    )
    builders.edit_metadata(folder, model_class_name="Nope")
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    assert "'Nope' is not defined in modeling.py (defined: DistilGPT2MTP, Other)" in str(err.value)


def test_unknown_transformers_class_lists_valid_ones(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    builders.edit_metadata(folder, transformers_class="AutoModelForCasualLM")
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    message = str(err.value)
    assert "'AutoModelForCasualLM' is not a transformers Auto model class" in message
    assert "AutoModelForCausalLM" in message and "AutoModelForSequenceClassification" in message


def test_missing_required_file_names_file_and_location(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["mtp"])
    (folder / "modeling.py").unlink()
    with pytest.raises(wmtp.ModelFileError) as err:
        wmtp.load(str(folder))
    assert f"'modeling.py' not found at {folder}" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_config_must_be_listed(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    builders.edit_metadata(folder, required_files=["model.safetensors"])
    with pytest.raises(wmtp.MetadataError, match=r"required_files` must list config.json"):
        wmtp.load(str(folder))


def test_pickle_checkpoints_are_refused(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    torch.save({}, folder / "pytorch_model.bin")
    builders.edit_metadata(folder, required_files=["config.json", "pytorch_model.bin"])
    with pytest.raises(wmtp.MetadataError, match=r"pytorch_model.bin is a pickle"):
        wmtp.load(str(folder))


def test_config_without_model_type(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    builders.write_text(folder, "config.json", json.dumps(config))
    with pytest.raises(wmtp.MetadataError, match=r"config.json: `\$.model_type` is None"):
        wmtp.load(str(folder))


def test_broken_module_names_its_file(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["mtp"])
    builders.write_text(folder, "modeling.py", "import not_a_module_anywhere\n")
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    assert f"{folder}/modeling.py: importing the model's module failed" in str(err.value)
    assert "not_a_module_anywhere" in str(err.value)


def test_no_strategy_fixture_is_refused_not_guessed(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    shutil.copy(FIXTURES / "wmtp-no-strategy" / "distilgpt2" / "metadata.json", folder)
    with pytest.raises(wmtp.MetadataError, match=r"has no `loading_strategy`"):
        wmtp.load(str(folder))


def test_bad_dtype_lists_names(models: dict[str, Path]) -> None:
    with pytest.raises(wmtp.OptionError, match=r"unknown dtype 'bf17'; use .*bf16"):
        wmtp.load(str(models["mtp"]), dtype="bf17")


def test_nothing_is_assigned_when_keys_do_not_fit(
    models: dict[str, Path], copy: Copy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed load raises before a weight byte is read or assigned: the model it built
    stays empty (every parameter on meta) and nothing keeps it once the error is gone."""
    folder = copy(models["mtp"])
    tensors = load_file(folder / "model.safetensors")
    del tensors["extra_heads.1.weight"]
    builders.write_checkpoint(folder, tensors)
    built: list[weakref.ref[torch.nn.Module]] = []
    calls: list[str] = []
    build_empty = LOAD.build.build_empty

    def spied(*args: Any) -> torch.nn.Module:
        model: torch.nn.Module = build_empty(*args)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(LOAD.build, "build_empty", spied)
    monkeypatch.setattr(LOAD.build, "assign", lambda *a: calls.append("assign"))
    monkeypatch.setattr(LOAD, "read_tensors", lambda *a: calls.append("read_tensors"))
    with pytest.raises(wmtp.WeightsError, match=r"1 missing .*'extra_heads.1.weight'") as err:
        wmtp.load(str(folder))
    assert calls == []  # no weight read, nothing assigned
    assert len(built) == 1
    model = built[0]()
    assert model is not None  # the traceback still holds it: untouched
    assert all(p.is_meta for p in model.parameters())
    assert model.get_submodule("extra_heads.1").weight.is_meta
    del model, err
    gc.collect()
    assert built[0]() is None, "the refused model outlives its error"
