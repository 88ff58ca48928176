"""MTP models called as trainers call them, `model(**batch)`: logits, hidden states, loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import wmtp
from tests import builders

TEXTS = (
    "the lazy dog jumps over the quick brown fox",
    "a head looks ahead",
    "weights load from disk",
)
# name -> (heads, vocab, layers, width)
SHAPES = {"example": (4, 256, 2, 32), "mtp": (4, 128, 2, 32), "llama_mtp": (3, 128, 2, 32)}


@pytest.fixture(params=sorted(SHAPES))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def model(models: dict[str, Path], name: str) -> Any:
    """The MTP model `name` as `wmtp.load` returns it (the example, or a test model)."""
    folder = builders.EXAMPLES / "tiny-mtp" if name == "example" else models[name]
    return wmtp.load(str(folder))


def tokenized(texts: tuple[str, ...] = TEXTS) -> dict[str, torch.Tensor]:
    """A padded batch from the tiny tokenizer, labels the input ids (unshifted) but one -100."""
    batch = dict(builders.tiny_tokenizer()(list(texts), padding=True, return_tensors="pt"))
    assert (batch["attention_mask"] == 0).any()  # some padding, to be ignored
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][0, 3] = -100
    return batch


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token by token: head k at position t against the token at t+k+1 when it counts, in
    float64; the mean per head, then over heads."""
    batch, seq, heads, _ = logits.shape
    per_head = []
    for k in range(heads):
        nll = [
            -torch.log_softmax(logits[b, t, k].double(), dim=-1)[labels[b, t + k + 1]]
            for b in range(batch)
            for t in range(seq - k - 1)
            if labels[b, t + k + 1] != -100 and mask[b, t + k + 1] == 1
        ]
        per_head.append(torch.stack(nll).mean())
    return torch.stack(per_head).mean()


def test_tiny_tokenizer_fits_the_models() -> None:
    tok = builders.tiny_tokenizer()
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert len(tok) <= 128
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok(TEXTS[0])["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) > 3
    assert tok.decode(ids, skip_special_tokens=True) == TEXTS[0]


def test_logits_and_loss(model: Any, name: str) -> None:
    heads, vocab, _, _ = SHAPES[name]
    batch = tokenized()
    with torch.no_grad():
        out = model(**batch)
    assert set(out) == {"logits", "loss"}
    logits = out["logits"]
    assert logits.shape == (*batch["input_ids"].shape, heads, vocab)
    assert out["loss"].shape == ()
    want = reference_loss(logits, batch["labels"], batch["attention_mask"])
    torch.testing.assert_close(out["loss"], want.float())
    # No labels, no loss; the logits are the same.
    with torch.no_grad():
        plain = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert set(plain) == {"logits"}
    torch.testing.assert_close(plain["logits"], logits)


def test_labels_under_padding_are_ignored(model: Any) -> None:
    batch = tokenized()
    pad = batch["attention_mask"] == 0
    with torch.no_grad():
        want = model(**batch)["loss"]
        for other in (-100, 5):
            got = model(**(batch | {"labels": batch["labels"].masked_fill(pad, other)}))["loss"]
            torch.testing.assert_close(got, want)


def test_attention_mask_and_kwargs_reach_the_trunk(model: Any) -> None:
    # Left padding with the mask and position_ids given: the real tokens' logits are those of
    # the sequence alone. A trunk that never saw the mask would attend to the padding, as it
    # does under an all-ones mask (not None: transformers reads position_ids that restart at 0
    # without a mask as packed sequences, and would keep the padding apart by itself).
    ids = builders.tiny_tokenizer()(TEXTS[1], return_tensors="pt")["input_ids"]
    padded = torch.cat([torch.full((1, 3), 7), ids], dim=1)
    mask = (torch.arange(padded.shape[1]) >= 3).long().unsqueeze(0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(ids)["logits"]
        got = model(padded, attention_mask=mask, position_ids=positions)["logits"][:, 3:]
        ones = torch.ones_like(mask)
        unmasked = model(padded, attention_mask=ones, position_ids=positions)["logits"][:, 3:]
    torch.testing.assert_close(got, alone)
    assert not torch.allclose(unmasked, alone, atol=1e-4)


def test_hidden_states_only_when_asked(model: Any, name: str) -> None:
    _, _, layers, width = SHAPES[name]
    batch = tokenized()
    with torch.no_grad():
        assert "hidden_states" not in model(**batch)
        asked = model(**batch, output_hidden_states=True)
        model.config.output_hidden_states = True
        by_config = model(**batch)
        refused = model(**batch, output_hidden_states=False)
    assert "hidden_states" not in refused
    for out in (asked, by_config):
        hidden = out["hidden_states"]
        assert isinstance(hidden, tuple) and len(hidden) == layers + 1
        assert all(h.shape == (*batch["input_ids"].shape, width) for h in hidden)
        # The trunk's own tuple: the extra heads read its last entry.
        for k, head in enumerate(model.extra_heads, start=1):
            torch.testing.assert_close(out["logits"][:, :, k], head(hidden[-1]))
    torch.testing.assert_close(asked["loss"], by_config["loss"])


def test_loss_is_differentiable(model: Any) -> None:
    model.train()
    loss = model(**tokenized())["loss"]
    assert loss.requires_grad
    loss.backward()
    for head in model.extra_heads:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    tokens = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert tokens.weight.grad is not None and tokens.weight.grad.abs().sum() > 0
