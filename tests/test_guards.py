"""The checks `load` makes after the headers fit, each tripped on purpose: a checkpoint that
changes between its header and its mapping, and a module that leaves a tensor on meta."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import wmtp
from tests.conftest import Copy
from tests.test_cast import save_odd_state

LOAD = importlib.import_module("wmtp.load")  # the module; `wmtp.load` is the function


def test_a_checkpoint_that_grows_while_it_loads_is_refused(
    models: dict[str, Path], copy: Copy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes appended after the header was judged (a writer still at work): the mapping is
    not the file that was checked, so nothing of it is used."""
    folder = copy(models["gpt2_reference"])
    weights = folder / "model.safetensors"
    read_tensors = LOAD.read_tensors

    def grown(files: Sequence[tuple[Path, Any]], *args: Any) -> Any:
        with weights.open("ab") as f:
            f.write(bytes(4096))
        return read_tensors(files, *args)

    monkeypatch.setattr(LOAD, "read_tensors", grown)
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    assert str(err.value).startswith(f"{weights} changed while it was being loaded")


def test_a_buffer_left_on_meta_is_named(tmp_path: Path) -> None:
    """A non-persistent buffer the module creates on meta: no checkpoint fills it, and a model
    holding it would fail at its first forward, far from the cause."""
    folder = save_odd_state(tmp_path / "scratch", "MetaScratch")
    with pytest.raises(wmtp.MetadataError) as err:
        wmtp.load(str(folder))
    assert str(err.value).startswith("MetaScratch leaves scratch on meta")
