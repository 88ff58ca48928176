"""Training checkpoints under `torchrun --nproc_per_node=2` (gloo, CPU, 127.0.0.1), FSDP2:
a checkpoint saved at world size 2 resumes at world size 2 (from a folder or a bucket) and at
world size 1 with the same state, bitwise; `wmtp.save` of the sharded model writes the model's
own class and loads back; a rank killed mid-save leaves the previous checkpoint the latest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

import wmtp
from tests import builders
from tests.s3server import S3Server, storage_options
from tests.test_torchrun import _free_port

WORKER = Path(__file__).with_name("ckpt_worker.py")
REPO = WORKER.parent.parent
EXAMPLE = str(builders.EXAMPLES / "tiny-mtp")


def torchrun(job: dict[str, Any], out: Path, fails: bool = False) -> list[dict[str, Any]]:
    """Run the worker on 2 ranks (bounded); the per-rank results (none when it must fail)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps(job | {"out": str(out)}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               str(WORKER), str(out / "job.json")]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    if fails:
        assert done.returncode != 0, "the run was meant to fail"
        return []
    if done.returncode:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_fsdp2_checkpoint_resumes_at_world_sizes_2_and_1(
    s3_server: S3Server, tmp_path: Path
) -> None:
    opts = storage_options(s3_server)
    bucket = f"s3://{s3_server.bucket}/dist-ckpt/{uuid.uuid4().hex[:8]}/step-3"
    ckpt, saved = tmp_path / "ckpt" / "step-3", tmp_path / "saved"
    job = {"task": "train", "checkpoint": str(ckpt), "saved": str(saved), "bucket": bucket,
           "storage_options": opts}  # fmt: skip
    for result in torchrun(job, tmp_path / "train"):
        assert result["state"] == [3, 1, {"mlflow_run_id": "run-7"}]
        assert result["resumed_vs_straight"] == []  # 3 steps, save, resume, 2 steps == 5 steps
        assert result["classes"] == ["FSDPDistilGPT2MTP", ["DistilGPT2MTP"]]
        assert result["required_files"][:2] == ["config.json", "model.safetensors.index.json"]
    info = json.loads((ckpt / "checkpoint.json").read_text())
    assert info["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(info["files"])
    reference = torch.load(tmp_path / "train" / "reference.pt", weights_only=True)

    # wmtp.save of the sharded model: the model's own class, module and full tensors.
    plain = wmtp.load(str(saved), verify=True).state_dict()
    assert [k for k, v in reference["model"].items() if not torch.equal(v, plain[k])] == []
    assert (saved / "modeling.py").read_bytes() == builders.MTP_MODULE.read_bytes()

    # World size 2 again, in fresh processes, from the bucket each rank uploaded to.
    job = {"task": "resume", "checkpoint": bucket, "storage_options": opts, "saved": str(saved),
           "reference": str(tmp_path / "train" / "reference.pt")}  # fmt: skip
    for result in torchrun(job, tmp_path / "resume"):
        assert result["state"] == [3, 1, {"mlflow_run_id": "run-7"}]
        assert result["vs_reference"] == []
        assert result["saved_vs_reference"] == []

    # World size 1: this process, no process group, a plain model.
    model = wmtp.load(EXAMPLE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert wmtp.load_checkpoint(ckpt, model, optimizer).step == 3
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    states: tuple[dict[str, Any], dict[str, Any]] = get_state_dict(
        model, optimizer, options=options
    )
    model_state, optim_state = states
    assert [k for k, v in reference["model"].items() if not torch.equal(v, model_state[k])] == []
    assert reference["optim"].keys() == optim_state.keys()
    for key, value in reference["optim"].items():
        same = torch.equal(value, optim_state[key]) if isinstance(value, torch.Tensor) else None
        assert same or value == optim_state[key], key


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    torchrun({"task": "kill", "root": str(root)}, tmp_path / "kill", fails=True)
    assert (root / "step-2").is_dir()  # rank 0 wrote its files: the folder exists
    assert wmtp.latest_checkpoint(root) == str(root / "step-1")
    model = wmtp.load(EXAMPLE)
    with pytest.raises(wmtp.ModelFileError, match="holds no complete checkpoint"):
        wmtp.load_checkpoint(root / "step-2", model)
    assert wmtp.load_checkpoint(root / "step-1", model).step == 1
