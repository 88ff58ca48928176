"""DistilGPT2MTP: a GPT-2 trunk that predicts the next `n_future_tokens` tokens at once.

The trunk's own LM head predicts token t+1; each extra head predicts one more
token ahead from the same hidden state. The LM head is tied to the token
embedding, so a checkpoint stores that matrix once.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel


class DistilGPT2MTP(torch.nn.Module):
    """GPT-2 plus `n_future_tokens - 1` bias-free linear heads for tokens further ahead."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.n_future_tokens = int(config.mtp_config["n_future_tokens"])
        self.base_model = GPT2LMHeadModel(config)
        self.extra_heads = torch.nn.ModuleList(
            torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
            for _ in range(self.n_future_tokens - 1)
        )

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of shape [batch, seq, n_future_tokens, vocab]."""
        out = self.base_model(input_ids=input_ids, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        heads = [out.logits, *(head(hidden) for head in self.extra_heads)]
        return {"logits": torch.stack(heads, dim=2)}
