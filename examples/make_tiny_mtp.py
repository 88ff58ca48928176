"""Write `examples/tiny-mtp`: a small DistilGPT2MTP with random weights (about 0.3 MB).

The config is the real `distilgpt2-mtp` config shrunk to 2 layers of width 32
and a 256-token vocabulary. Rerun to regenerate: `python examples/make_tiny_mtp.py`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from transformers import GPT2Config

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


def main() -> None:
    """Build the model from the folder's own modeling.py and save it next to it."""
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
    )
    print(json.dumps(sorted(p.name for p in HERE.iterdir())))


if __name__ == "__main__":
    main()
