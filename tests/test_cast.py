"""`load(dtype=...)`: floating tensors are cast, integer and bool tensors never are, and the cast
never holds the checkpoint twice in memory (each tensor's mapped pages go once it is cast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

import wmtp
from benchmarks.models import SPECS, Model, ensure_model
from tests import builders
from wmtp.weights import read_header

ODD_STATE = builders.MODELS / "odd_state" / "odd_state.py"
CONFIG: dict[str, Any] = {"n_embd": 8, "vocab_size": 16, "n_layer": 1, "n_head": 1}
REPO = Path(__file__).resolve().parents[1]


def save_odd_state(dest: Path, name: str) -> Path:
    """A folder of `tests/models/odd_state`'s class `name`, its integer state set to values
    bf16 cannot hold (counts past 2**40, codes of 10 significant bits)."""
    model = getattr(builders.import_file(ODD_STATE), name)(transformers.GPT2Config(**CONFIG))
    with torch.no_grad():
        if name == "IntegerState":
            model.counts.copy_(torch.arange(16) * 2**40 + 1)
            model.mask.copy_(torch.arange(16) % 3 == 0)
            model.codes.copy_(torch.arange(8, dtype=torch.int32) * 1001 - 3001)
    wmtp.save(model, dest, wmtp_type="base_model", algorithm_compatibility=["baseline-mtp"])
    return dest


@pytest.mark.parametrize(
    ("dtype", "cast"),
    [
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("fp64", torch.float64),
        (None, torch.float32),
    ],
)
def test_a_cast_leaves_integer_and_bool_tensors_as_the_file_holds_them(
    dtype: str | None, cast: torch.dtype, tmp_path: Path
) -> None:
    folder = save_odd_state(tmp_path / "odd", "IntegerState")
    files = load_file(folder / "model.safetensors")
    assert {t.dtype for t in files.values()} == {
        torch.float32,
        torch.int64,
        torch.bool,
        torch.int32,
    }
    model = wmtp.load(str(folder), dtype=dtype)
    state = model.state_dict()
    for key, tensor in files.items():
        want = tensor.to(cast) if tensor.is_floating_point() else tensor
        assert state[key].dtype == want.dtype, key
        assert torch.equal(state[key], want), key
    codes = model.get_parameter("codes")
    assert isinstance(codes, torch.nn.Parameter) and not codes.requires_grad
    # The same model built and loaded by torch itself, then cast as torch casts a module.
    reference = builders.import_file(ODD_STATE).IntegerState(transformers.GPT2Config(**CONFIG))
    reference.load_state_dict(files)
    reference.to(cast)
    ids = torch.tensor([[0, 3, 5, 6, 9, 15]])
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


@pytest.fixture(scope="module")
def small_mtp(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """The benchmarks' `small` MTP model (~100 MiB of float32, four 25 MiB vocabulary matrices)."""
    return ensure_model(SPECS["small"], tmp_path_factory.mktemp("bench"))


# Run in a fresh interpreter: its peak RSS (VmHWM), reset just before the load, is the load's.
MEASURE = """
import json, sys
from pathlib import Path
import wmtp
from wmtp.check import check

def status(key):
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(key + ":"))

check(sys.argv[1])  # imports the model's classes: their memory is not the load's
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
before = status("VmRSS")
model = wmtp.load(sys.argv[1], dtype="bf16")
print(json.dumps({"peak_growth": status("VmHWM") - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak RSS reset")
def test_a_cast_never_holds_the_checkpoint_twice(small_mtp: Model) -> None:
    """Each cast tensor's pages leave the process before the next is read: the peak is the
    bf16 copies plus about one float32 tensor, not the whole checkpoint plus its copies."""
    folder = Path(small_mtp.folder)
    header = read_header(folder / "model.safetensors", str(folder / "model.safetensors"))
    largest = max(end - start for start, end in (t.data_offsets for t in header.tensors.values()))
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder)],
        cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    peak = json.loads(done.stdout.splitlines()[-1])["peak_growth"]
    limit = small_mtp.weight_bytes // 2 + largest + 16 * 2**20
    assert peak <= limit, f"peak RSS grew {peak / 2**20:.0f} MiB, over {limit / 2**20:.0f} MiB"
