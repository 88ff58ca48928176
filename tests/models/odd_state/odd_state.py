"""Custom models whose state is unusual, built from a GPT-2 config (`n_embd`, `vocab_size`).

`IntegerState` keeps integer and bool tensors beside a float layer: a cast must leave them
alone. `MetaScratch` creates a non-persistent buffer on the meta device, which no checkpoint
fills: a loader must refuse it rather than return a model that cannot run.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config


class IntegerState(torch.nn.Module):
    """A linear layer, a persistent int64 buffer of counts, a bool mask and a frozen int32
    parameter (codes); `forward(ids)` uses all of them."""

    counts: torch.Tensor
    mask: torch.Tensor

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.proj = torch.nn.Linear(config.n_embd, config.n_embd)
        self.register_buffer("counts", torch.zeros(config.vocab_size, dtype=torch.int64))
        self.register_buffer("mask", torch.zeros(config.vocab_size, dtype=torch.bool))
        codes = torch.zeros(config.n_embd, dtype=torch.int32)
        self.codes = torch.nn.Parameter(codes, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.codes.to(self.proj.weight.dtype).expand(*ids.shape, -1)
        kept = self.mask[ids].unsqueeze(-1) * self.counts[ids].unsqueeze(-1)
        out: torch.Tensor = self.proj(hidden) * kept.to(self.proj.weight.dtype)
        return out


class MetaScratch(torch.nn.Module):
    """A linear layer and a scratch buffer made on the meta device (a bug a loader must name)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.proj = torch.nn.Linear(config.n_embd, config.n_embd)
        self.register_buffer("scratch", torch.empty(4, device="meta"), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x)
        return out
