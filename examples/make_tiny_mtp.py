"""Write `examples/tiny-mtp`: a small DistilGPT2MTP with random weights (about 0.3 MB) and
a small tokenizer for it.

The config is the real `distilgpt2-mtp` config shrunk to 2 layers of width 32
and a 256-token vocabulary. The tokenizer is a BPE tokenizer trained here on `TEXT`
(no network) to exactly that vocabulary: <unk> 0, <pad> 1, and <|endoftext|> 255, the
config's bos and eos token. Rerun to regenerate, byte for byte: `python examples/make_tiny_mtp.py`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import tokenizers
import torch
from transformers import GPT2Config, PreTrainedTokenizerFast

import wmtp

HERE = Path(__file__).parent / "tiny-mtp"
SHRINK = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 256, "n_positions": 64}
SHRINK |= {"n_ctx": 64, "bos_token_id": 255, "eos_token_id": 255}

# The real config, as the project this replaces published it, minus the size.
CONFIG = {
    "model_type": "gpt2",
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-05,
    "tie_word_embeddings": True,
    "mtp_config": {
        "n_future_tokens": 4,
        "architecture": "DistilGPT2MTP",
        "base_model": "distilgpt2",
    },
    **SHRINK,
}


# What the tokenizer is trained on: enough distinct words to fill its vocabulary.
TEXT = (
    "the quick brown fox jumps over the lazy dog",
    "a language model reads a sequence of tokens and predicts the next one",
    "a multi token prediction model predicts the next four tokens at once",
    "the trunk is a small transformer and every extra head looks one more token ahead",
    "head k predicts token t plus k plus one from the same hidden state",
    "weighted training gives each future token its own weight in the loss",
    "a reward model or a reference model scores the tokens the base model predicts",
    "the critic weights tokens by the value a reward model gives them",
    "rho one keeps the tokens whose loss differs most from a reference model",
    "weights load from a local disk or from a bucket in an object store",
    "the metadata says which loader which class and which files to use",
    "nothing is guessed and nothing falls back in silence",
    "every key of the checkpoint must land on a parameter of the right shape",
    "this tiny example has two layers a width of thirty two and four heads",
    "its weights are random so what it predicts means nothing yet",
    "train it with your own data and save it back with its tokenizer",
)
END = "<|endoftext|>"  # bos and eos, as in GPT-2: id vocab_size - 1, the config's token ids


def tokenizer() -> PreTrainedTokenizerFast:
    """The BPE tokenizer of `TEXT`: lowercased, words marked by a leading metaspace, every id
    below the model's `vocab_size`; no bos or eos added; padding on the right."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.NFKC(), tokenizers.normalizers.Lowercase()]
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    size = SHRINK["vocab_size"] - 1  # the last id is END's
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<unk>", "<pad>"], show_progress=False
    )
    tok.train_from_iterator(TEXT, trainer)
    tok.add_special_tokens([END])
    assert tok.get_vocab_size() == SHRINK["vocab_size"]
    assert tok.token_to_id(END) == SHRINK["bos_token_id"] == SHRINK["eos_token_id"]
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token=END,
        eos_token=END,
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=SHRINK["n_positions"],
        padding_side="right",
    )


def main() -> None:
    """Build the model from the folder's own modeling.py and save it next to it, with the
    tokenizer (listed in the metadata's `tokenizer_files` and integrity manifest)."""
    spec = importlib.util.spec_from_file_location("tiny_mtp_modeling", HERE / "modeling.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.DistilGPT2MTP(GPT2Config.from_dict(CONFIG))
    wmtp.save(
        model,
        HERE,
        wmtp_type="base_model",
        training_algorithm="mtp",
        algorithm_compatibility=["baseline-mtp", "critic-wmtp", "rho1-wmtp"],
        tokenizer=tokenizer(),
    )
    print(json.dumps(sorted(p.name for p in HERE.iterdir())))


if __name__ == "__main__":
    main()
