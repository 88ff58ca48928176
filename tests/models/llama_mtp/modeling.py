"""LlamaMTP: a tiny Llama trunk with extra future-token heads.

Its rotary embedding keeps `inv_freq` as a non-persistent buffer computed at
construction, which a checkpoint does not store: the loader must leave it real.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


class LlamaMTP(torch.nn.Module):
    """Llama plus `n_future_tokens - 1` linear heads."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = LlamaForCausalLM(config)
        n_future = int(config.mtp_config["n_future_tokens"])
        self.extra_heads = torch.nn.ModuleList(
            torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            for _ in range(n_future - 1)
        )

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of shape [batch, seq, n_future_tokens, vocab]."""
        out = self.trunk(input_ids=input_ids, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        heads = [out.logits, *(head(hidden) for head in self.extra_heads)]
        return {"logits": torch.stack(heads, dim=2)}
