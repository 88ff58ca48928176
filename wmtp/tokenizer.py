"""The tokenizer stored beside a model (placeholder until the tokenizer work lands)."""

from __future__ import annotations

from typing import Any


def load_tokenizer(location: str, **options: Any) -> Any:
    """Not yet implemented."""
    raise NotImplementedError(location)
