"""`save` then `load` gives back the same model, tensor for tensor, with a true manifest."""

from __future__ import annotations

import functools
import hashlib
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import wmtp
from tests import builders
from wmtp.check import check

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FEW = settings(max_examples=10, deadline=None)


@functools.cache
def mtp_module() -> ModuleType:
    """The example's modeling.py, imported once (as training code would)."""
    return builders.import_file(builders.MTP_MODULE)


@st.composite
def gpt2_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Small GPT-2 configs: 1-2 layers, width 16 or 32, 1 or 2 heads, vocab 32-128."""
    return {
        "n_layer": draw(st.integers(1, 2)),
        "n_embd": draw(st.sampled_from([16, 32])),
        "n_head": draw(st.sampled_from([1, 2])),
        "vocab_size": draw(st.integers(32, 128)),
        "n_positions": 16,
        **builders.TOKEN_IDS,
    }


def mtp(config: dict[str, Any], n_future_tokens: int, seed: int) -> torch.nn.Module:
    full = builders.fixture_config(
        "distilgpt2-mtp", **config, mtp_config={"n_future_tokens": n_future_tokens}
    )
    torch.manual_seed(seed)
    model: torch.nn.Module = mtp_module().DistilGPT2MTP(transformers.GPT2Config.from_dict(full))
    return model


def gpt2(config: dict[str, Any], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))


def assert_same_state(original: torch.nn.Module, loaded: torch.nn.Module) -> None:
    """The same keys, and every tensor equal in value, shape and dtype."""
    want, got = original.state_dict(), loaded.state_dict()
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def assert_true_manifest(folder: Path, meta: wmtp.Metadata) -> None:
    """The manifest lists exactly the required files, each with its real size and sha256."""
    files = meta.files or {}
    assert set(files) == set(meta.loading_strategy.required_files)
    for name, entry in files.items():
        assert entry.size == (folder / name).stat().st_size, name
        assert entry.sha256 == hashlib.sha256((folder / name).read_bytes()).hexdigest(), name


def assert_clean_folder(folder: Path, meta: wmtp.Metadata) -> None:
    """Only the model's files and metadata.json: no temporary file left behind."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        {*meta.loading_strategy.required_files, "metadata.json"}
    )


@FEW
@given(
    config=gpt2_configs(),
    n_future_tokens=st.integers(2, 4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_save_then_load_gives_back_every_mtp_tensor(
    config: dict[str, Any], n_future_tokens: int, dtype: torch.dtype, seed: int
) -> None:
    original = mtp(config, n_future_tokens, seed).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mtp"
        meta = wmtp.save(
            original, folder, wmtp_type="base_model", algorithm_compatibility=["baseline-mtp"]
        )
        assert wmtp.read_metadata(str(folder)) == meta
        strategy = meta.loading_strategy
        assert strategy.loader_type == "custom_mtp"
        assert strategy.model_class_name == "DistilGPT2MTP"
        assert strategy.custom_module_file == "modeling.py"
        assert strategy.required_files == ("config.json", "model.safetensors", "modeling.py")
        assert meta.base_architecture == "gpt2"
        assert (folder / "modeling.py").read_bytes() == builders.MTP_MODULE.read_bytes()
        assert_true_manifest(folder, meta)
        assert_clean_folder(folder, meta)
        report = check(str(folder), verify_hashes=True)
        assert (report.problems, report.model_class) == ((), "DistilGPT2MTP")

        loaded = wmtp.load(str(folder))
        assert type(loaded).__name__ == "DistilGPT2MTP"
        assert_same_state(original, loaded)
        base: Any = loaded.get_submodule("base_model")
        assert base.lm_head.weight is base.transformer.wte.weight
        assert len(loaded.get_submodule("extra_heads")._modules) == n_future_tokens - 1


@FEW
@given(config=gpt2_configs(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_save_then_load_gives_back_every_gpt2_tensor(
    config: dict[str, Any], dtype: torch.dtype, seed: int
) -> None:
    original = gpt2(config, seed).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2"
        meta = wmtp.save(
            original,
            folder,
            wmtp_type="reference_model",
            algorithm_compatibility=["rho1-wmtp"],
            training_algorithm="rho1",
        )
        assert wmtp.read_metadata(str(folder)) == meta
        strategy = meta.loading_strategy
        assert strategy.loader_type == "huggingface"
        assert strategy.transformers_class == "AutoModelForCausalLM"
        assert strategy.model_class_name is None
        assert strategy.required_files == ("config.json", "model.safetensors")
        assert (meta.wmtp_type, meta.training_algorithm) == ("reference_model", "rho1")
        assert meta.algorithm_compatibility == ("rho1-wmtp",)
        assert_true_manifest(folder, meta)
        assert_clean_folder(folder, meta)
        report = check(str(folder), verify_hashes=True)
        assert (report.problems, report.model_class) == ((), "GPT2LMHeadModel")

        loaded: Any = wmtp.load(str(folder))
        assert type(loaded) is transformers.GPT2LMHeadModel
        assert_same_state(original, loaded)
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_tied_weight_is_stored_once(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    original = gpt2({"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 40}, seed=3)
    wmtp.save(original, tmp_path, wmtp_type="reference_model", algorithm_compatibility=["x"])
    stored = load_file(tmp_path / "model.safetensors")
    assert len(stored) == len(original.state_dict()) - 1
    assert ("lm_head.weight" in stored) != ("transformer.wte.weight" in stored)


def test_saving_over_a_model_replaces_it(tmp_path: Path) -> None:
    config = {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 40, **builders.TOKEN_IDS}
    first, second = mtp(config, 2, seed=1), mtp(config, 3, seed=2)
    wmtp.save(first, tmp_path, wmtp_type="base_model", algorithm_compatibility=["baseline-mtp"])
    meta = wmtp.save(
        second, tmp_path, wmtp_type="base_model", algorithm_compatibility=["baseline-mtp"]
    )
    assert_true_manifest(tmp_path, meta)
    assert_clean_folder(tmp_path, meta)
    assert_same_state(second, wmtp.load(str(tmp_path)))


def test_saved_files_are_readable_by_others(tmp_path: Path) -> None:
    meta = wmtp.save(
        gpt2({"n_layer": 1, "n_embd": 16, "n_head": 1, "vocab_size": 32}, seed=0),
        tmp_path,
        wmtp_type="reward_model",
        algorithm_compatibility=["critic-wmtp"],
    )
    for name in [*meta.loading_strategy.required_files, "metadata.json"]:
        assert (tmp_path / name).stat().st_mode & 0o044 == 0o044, name


def test_model_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.save(
            torch.nn.Linear(2, 2),
            tmp_path / "out",
            wmtp_type="base_model",
            algorithm_compatibility=["baseline-mtp"],
        )
    assert str(err.value) == "Linear has no transformers `config` attribute to save"
    assert not (tmp_path / "out").exists()
