"""Small models with random weights, built from the published fixture configs shrunk.

Each builder writes a complete model folder (config.json, model.safetensors,
metadata.json, and the module file for custom models) and returns its path.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import msgspec
import tokenizers
import torch
import transformers
from safetensors.torch import save_file

import wmtp
from wmtp.save import file_manifest

FIXTURES: Final = Path(__file__).resolve().parent / "fixtures"  # published files: see its README
REAL: Final = FIXTURES / "wmtp-v2-real"
EXAMPLES: Final = Path(__file__).resolve().parents[1] / "examples"
MODELS: Final = Path(__file__).resolve().parent / "models"
MTP_MODULE: Final = EXAMPLES / "tiny-mtp" / "modeling.py"
LLAMA_MODULE: Final = MODELS / "llama_mtp" / "modeling.py"

GPT2_SHRINK: Final = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 128}
GPT2_SHRINK_ALL: Final = GPT2_SHRINK | {"n_positions": 64, "n_ctx": 64}
TOKEN_IDS: Final = {"bos_token_id": 1, "eos_token_id": 2}
DISTILBERT_SHRINK: Final = {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 2}
DISTILBERT_SHRINK_ALL: Final = DISTILBERT_SHRINK | {
    "vocab_size": 128,
    "max_position_embeddings": 64,
}
LLAMA: Final = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "mtp_config": {"n_future_tokens": 3},
    **TOKEN_IDS,
}


def fixture_config(model: str, **overrides: Any) -> dict[str, Any]:
    """The real config.json of a published fixture, with `overrides` applied."""
    config: dict[str, Any] = json.loads((REAL / model / "config.json").read_text())
    return config | TOKEN_IDS | overrides


def import_file(path: Path) -> ModuleType:
    """Import a module file the way a user's training code would."""
    name = f"test_{path.parent.name.replace('-', '_')}_modeling"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def mtp_model(seed: int = 0) -> torch.nn.Module:
    """DistilGPT2MTP from the `distilgpt2-mtp` fixture config, shrunk."""
    config = transformers.GPT2Config.from_dict(fixture_config("distilgpt2-mtp", **GPT2_SHRINK_ALL))
    torch.manual_seed(seed)
    model: torch.nn.Module = import_file(MTP_MODULE).DistilGPT2MTP(config)
    return model


def llama_mtp_model(seed: int = 0) -> torch.nn.Module:
    """LlamaMTP: a custom model with a non-persistent rotary buffer."""
    config = transformers.LlamaConfig.from_dict(LLAMA)
    torch.manual_seed(seed)
    model: torch.nn.Module = import_file(LLAMA_MODULE).LlamaMTP(config)
    return model


TOKENIZER_TEXT: Final = (
    "the quick brown fox jumps over the lazy dog",
    "a model predicts the next few tokens at once",
    "every extra head looks one more token ahead",
    "weights load from a local disk or from a bucket",
)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A BPE tokenizer trained here on `TOKENIZER_TEXT` (no network): fewer than 128 tokens, so
    its ids fit every test model; <pad> 0, <bos> 1, <eos> 2 (as `TOKEN_IDS`), <unk> 3; each
    text is wrapped in <bos> ... <eos>; padding on the right."""
    special = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=128, special_tokens=special, show_progress=False
    )
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    assert [tok.token_to_id(t) for t in special] == [0, 1, 2, 3]
    return transformers.PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="right",
    )


def hf_model(auto: str, config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A transformers model built by the Auto class `auto` from a config dict."""
    cfg = transformers.CONFIG_MAPPING[config["model_type"]].from_dict(config)
    torch.manual_seed(seed)
    model: torch.nn.Module = getattr(transformers, auto).from_config(cfg)
    return model


def save_mtp(dest: Path, seed: int = 0) -> Path:
    """The custom MTP base model."""
    wmtp.save(
        mtp_model(seed),
        dest,
        wmtp_type="base_model",
        training_algorithm="mtp",
        algorithm_compatibility=["baseline-mtp", "critic-wmtp", "rho1-wmtp"],
    )
    return dest


def save_llama_mtp(dest: Path) -> Path:
    """The custom Llama MTP model."""
    wmtp.save(
        llama_mtp_model(), dest, wmtp_type="base_model", algorithm_compatibility=["baseline-mtp"]
    )
    return dest


def save_hf(dest: Path, fixture: str, auto: str, shrink: dict[str, Any], seed: int = 0) -> Path:
    """A transformers model from a published fixture's config, shrunk, with its published role."""
    published = json.loads((REAL / fixture / "metadata.json").read_text())
    wmtp.save(
        hf_model(auto, fixture_config(fixture, **shrink), seed),
        dest,
        wmtp_type=published["wmtp_type"],
        algorithm_compatibility=published["algorithm_compatibility"],
    )
    return dest


def save_gpt2_reference(dest: Path) -> Path:
    """A GPT-2 causal LM as reference model (fixture `distilgpt2`)."""
    return save_hf(dest, "distilgpt2", "AutoModelForCausalLM", GPT2_SHRINK_ALL)


def save_gpt2_reward(dest: Path) -> Path:
    """A GPT-2 as reward model (fixture `tiny-reward-model-gpt2`)."""
    return save_hf(dest, "tiny-reward-model-gpt2", "AutoModelForCausalLM", GPT2_SHRINK_ALL, 1)


def save_distilbert_reward(dest: Path) -> Path:
    """A DistilBERT sequence classifier as reward model (fixture `tiny-reward-model`), saved
    for AutoModelForSequenceClassification, not the AutoModel its published metadata names."""
    auto = "AutoModelForSequenceClassification"
    return save_hf(dest, "tiny-reward-model", auto, DISTILBERT_SHRINK_ALL)


def with_real_metadata(src: Path, fixture: str, dest: Path) -> Path:
    """A copy of model folder `src` whose metadata.json is the published fixture's, as is."""
    shutil.copytree(src, dest)
    shutil.copy(REAL / fixture / "metadata.json", dest / "metadata.json")
    return dest


def edit_metadata(folder: Path, **strategy: Any) -> Path:
    """Set fields of `loading_strategy` in a folder's metadata.json."""
    path = folder / "metadata.json"
    data = json.loads(path.read_text())
    data["loading_strategy"].update(strategy)
    path.write_text(json.dumps(data, indent=2))
    return folder


def write_checkpoint(
    folder: Path, tensors: dict[str, torch.Tensor], name: str = "model.safetensors"
) -> None:
    """Replace a folder's checkpoint, keeping its metadata's manifest true (as a re-save would)."""
    save_file(tensors, folder / name)
    refresh_manifest(folder, name)


def write_text(folder: Path, name: str, text: str) -> None:
    """Replace a text file of a folder, keeping its metadata's manifest true."""
    (folder / name).write_text(text)
    refresh_manifest(folder, name)


def refresh_manifest(folder: Path, name: str) -> None:
    """Record `name`'s current size and sha256 in the folder's manifest, if it has one."""
    path = folder / "metadata.json"
    if not path.exists():
        return
    data = json.loads(path.read_text())
    data.setdefault("files", {})
    data["files"] |= msgspec.to_builtins(file_manifest(str(folder), [name]))
    path.write_text(json.dumps(data, indent=2))


def set_manifest(folder: Path, name: str, **entry: Any) -> None:
    """Set fields of `files[name]` in a folder's metadata.json (to make it lie)."""
    path = folder / "metadata.json"
    data = json.loads(path.read_text())
    data["files"][name].update(entry)
    path.write_text(json.dumps(data, indent=2))


def parallelize_adding_a_buffer(model: torch.nn.Module) -> None:
    """A `parallelize` that does what it may not: register a buffer the checkpoint lacks."""
    model.register_buffer("steps", torch.zeros(1))


def parallelize_removing_a_block(model: torch.nn.Module) -> None:
    """A `parallelize` that does what it may not: delete GPT-2's second block."""
    blocks = model.get_submodule("transformer.h")
    assert isinstance(blocks, torch.nn.ModuleList)
    del blocks[1]
