"""LlamaMTP: a tiny Llama trunk with extra future-token heads.

Its rotary embedding keeps `inv_freq` as a non-persistent buffer computed at
construction, which a checkpoint does not store: the loader must leave it real.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


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


class LlamaMTP(torch.nn.Module):
    """Llama plus `n_future_tokens - 1` linear heads.

    `forward(input_ids, attention_mask=None, labels=None, **kwargs)`, as trainers call it
    (`model(**batch)`), returns a dict with `logits` [batch, seq, n_future_tokens, vocab] (head
    k at position t predicts token t+k+1); `hidden_states`, the trunk's tuple, only when
    `output_hidden_states=True` is passed or, when it is not passed, `config.output_hidden_states`
    is set; and `loss` when `labels` (unshifted) are given: the mean over heads k of the
    cross-entropy between logits[:, :-(k+1), k] and labels[:, k+1:], ignoring labels -100 and
    positions where `attention_mask` is 0 (their labels are set to -100 inside).
    `attention_mask` and other keyword arguments go to the trunk.
    """

    accepts_loss_kwargs = False  # a mean per batch: transformers' Trainer scales it itself

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = LlamaForCausalLM(config)
        n_future = int(config.mtp_config["n_future_tokens"])
        self.extra_heads = torch.nn.ModuleList(
            torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            for _ in range(n_future - 1)
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
        out = self.trunk(
            input_ids, attention_mask=attention_mask, output_hidden_states=True, **trunk_kwargs
        )
        heads = [out.logits, *(head(out.hidden_states[-1]) for head in self.extra_heads)]
        result: dict[str, Any] = {"logits": torch.stack(heads, dim=2)}
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_hidden_states:
            result["hidden_states"] = out.hidden_states
        if labels is not None:
            result["loss"] = mtp_loss(result["logits"], labels, attention_mask)
        return result
