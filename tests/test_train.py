"""`load(train=True)`: the model comes back in train mode, its weights exactly the files', and
their pages already private copies (an optimizer's first step then takes no copy-on-write
fault per page); the file itself never changes. Without it, nothing is copied."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wmtp
from wmtp.pages import populate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/smaps, the advice")

# In a fresh interpreter, as a user first calls it: private (copied) bytes of the file's maps
# from /proc/self/smaps, the weights against the file, then one AdamW step.
FRESH = """
import hashlib, json, sys, torch, wmtp
from safetensors.torch import load_file
folder, train = sys.argv[1], sys.argv[2] == "1"
weights = folder + "/model.safetensors"
before = hashlib.sha256(open(weights, "rb").read()).hexdigest()
model = wmtp.load(folder, train=train)

def copied() -> int:
    total, mine = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split()[0]:  # a mapping's first line: does it map the weights?
            mine = line.rstrip().endswith(weights)
        elif mine and line.startswith("Anonymous:"):
            total += int(line.split()[1]) * 1024
    return total

private = copied()
state = model.state_dict()
assert all(torch.equal(state[k], t) for k, t in load_file(weights).items())
ids = torch.arange(8).unsqueeze(0)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
model(input_ids=ids, labels=ids)["loss"].backward()
optimizer.step()
changed = any(not torch.equal(state[k], t) for k, t in load_file(weights).items())
after = hashlib.sha256(open(weights, "rb").read()).hexdigest()
print(json.dumps([model.training, private, changed, before == after]))
"""


def _fresh(folder: Path, train: bool) -> list[object]:
    done = subprocess.run(
        [sys.executable, "-c", FRESH, str(folder), str(int(train))],
        capture_output=True,
        text=True,
        timeout=180,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: list[object] = json.loads(done.stdout)
    return result


def test_train_copies_every_weight_page_up_front(models: dict[str, Path]) -> None:
    data = (models["mtp"] / "model.safetensors").stat().st_size
    training, private, changed, file_kept = _fresh(models["mtp"], train=True)
    assert training is True
    assert isinstance(private, int) and private >= 0.9 * data  # every weight page, the header not
    assert changed and file_kept  # the step changed the weights, never the file


def test_without_train_nothing_is_copied(models: dict[str, Path]) -> None:
    training, private, changed, file_kept = _fresh(models["mtp"], train=False)
    assert training is False and private == 0
    assert changed and file_kept  # the first write copies the pages it touches, privately


def test_train_in_load_roles_is_per_role(models: dict[str, Path]) -> None:
    paths = [str(models[n]) for n in ("mtp", "gpt2_reward")]
    loaded = wmtp.load_roles("critic-wmtp", paths, train={"base_model": True})
    assert loaded["base_model"].training and not loaded["reward_model"].training
    assert all(m.training for m in loaded["base_model"].modules())
    assert all(p.requires_grad for p in loaded["base_model"].parameters())
    assert not any(p.requires_grad for p in loaded["reward_model"].parameters())


def test_populate_keeps_values_and_skips_what_it_cannot_advise() -> None:
    tensors = [torch.arange(3 << 20, dtype=torch.float32), torch.empty(0), torch.ones(2)[1:]]
    expected = [t.clone() for t in tensors]
    populate([*tensors, torch.empty(4, device="meta")])  # meta: no CPU pages to advise
    assert all(torch.equal(a, b) for a, b in zip(tensors, expected, strict=True))
