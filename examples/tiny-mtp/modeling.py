"""DistilGPT2MTP: a GPT-2 trunk that predicts the next `n_future_tokens` tokens at once.

The trunk's own LM head predicts token t+1; each extra head predicts one more
token ahead from the same hidden state. The LM head is tied to the token
embedding, so a checkpoint stores that matrix once.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def mtp_loss(
    logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean over heads k of the cross-entropy of logits[:, :-(k+1), k] against labels[:, k+1:]."""
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, -100)
    losses = [
        torch.nn.functional.cross_entropy(
            logits[:, : -(k + 1), k].flatten(0, 1).float(), labels[:, k + 1 :].flatten()
        )
        for k in range(logits.shape[2])
    ]
    return torch.stack(losses).mean()


class DistilGPT2MTP(torch.nn.Module):
    """GPT-2 plus `n_future_tokens - 1` bias-free linear heads for tokens further ahead.

    `forward(input_ids, attention_mask=None, labels=None, **kwargs)`, called as trainers call
    it (`model(**batch)`), returns a dict with:

    - `logits` [batch, seq, n_future_tokens, vocab]: head k at position t predicts token
      t+k+1 (head 0 is the trunk's LM head, the next token);
    - `hidden_states`, the trunk's tuple as transformers returns it (embeddings, then each
      layer), only when `output_hidden_states=True` is passed or, when it is not passed,
      `config.output_hidden_states` is set;
    - `loss`, only when `labels` [batch, seq] are given (the input ids, unshifted, as for a
      transformers causal LM): the mean over heads k of the cross-entropy (mean over target
      tokens) between logits[:, :-(k+1), k] and labels[:, k+1:]. Labels -100 are ignored, and
      so are positions where `attention_mask` is 0 (their labels are set to -100 inside). A
      head left with no target (every sequence shorter than k+2 tokens) makes the loss nan.

    `attention_mask` and any other keyword arguments (`position_ids`, ...) go to the trunk.
    """

    # The loss is a mean per batch: transformers' Trainer, reading this, scales it for gradient
    # accumulation itself instead of passing `num_items_in_batch`.
    accepts_loss_kwargs = False

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.n_future_tokens = int(config.mtp_config["n_future_tokens"])
        self.base_model = GPT2LMHeadModel(config)
        self.extra_heads = torch.nn.ModuleList(
            torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
            for _ in range(self.n_future_tokens - 1)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`logits`, and `hidden_states` and `loss` when asked for (see the class)."""
        trunk_kwargs = {"use_cache": False, **kwargs, "return_dict": True}
        out = self.base_model(
            input_ids, attention_mask=attention_mask, output_hidden_states=True, **trunk_kwargs
        )
        hidden = out.hidden_states[-1]
        heads = [out.logits, *(head(hidden) for head in self.extra_heads)]
        result: dict[str, Any] = {"logits": torch.stack(heads, dim=2)}
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_hidden_states:
            result["hidden_states"] = out.hidden_states
        if labels is not None:
            result["loss"] = mtp_loss(result["logits"], labels, attention_mask)
        return result
