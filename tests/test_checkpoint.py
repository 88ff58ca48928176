"""Training checkpoints in one process: a resume equals uninterrupted training bitwise, locally
and through the S3 test server; a checkpoint that does not fit is refused before anything
changes; a save killed half way is never taken for a checkpoint; no pickle runs code; the
export loads back with `wmtp.load`."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import wmtp
from tests import builders
from tests.s3server import S3Server, storage_options
from wmtp.cli import main

EXAMPLE = str(builders.EXAMPLES / "tiny-mtp")
ROOT = Path(__file__).resolve().parents[1]
Model = torch.nn.Module
Optimizer = torch.optim.Optimizer


def fresh(lr: float = 1e-2) -> tuple[Model, Optimizer]:
    """The example model as `wmtp.load` gives it (weights: private mapped views) and AdamW."""
    model = wmtp.load(EXAMPLE).train()
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def train(model: Model, optimizer: Optimizer, steps: range) -> None:
    """Steps whose data and dropout depend on the step alone, whatever ran before."""
    for step in steps:
        torch.manual_seed(step)
        ids = torch.randint(0, 256, (2, 16))
        model(input_ids=ids, labels=ids)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()


def assert_same(a: Model, oa: Optimizer, b: Model, ob: Optimizer) -> None:
    """Every parameter and buffer, and every optimizer state tensor, bitwise equal."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    da, db = oa.state_dict(), ob.state_dict()
    assert da["param_groups"] == db["param_groups"]
    assert da["state"].keys() == db["state"].keys()
    for index, state in da["state"].items():
        assert state.keys() == db["state"][index].keys()
        assert all(torch.equal(t, db["state"][index][n]) for n, t in state.items()), index


def snapshot(model: Model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: Model, before: dict[str, torch.Tensor], optimizer: Optimizer) -> None:
    after = model.state_dict()
    assert all(torch.equal(after[k], t) for k, t in before.items())
    assert not optimizer.state  # no state made, none left


@pytest.fixture(scope="module")
def straight() -> tuple[Model, Optimizer]:
    """5 uninterrupted steps: what every resumed run must equal."""
    model, optimizer = fresh()
    train(model, optimizer, range(5))
    return model, optimizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint after 3 steps."""
    model, optimizer = fresh()
    train(model, optimizer, range(3))
    location = tmp_path_factory.mktemp("ckpt") / "step-3"
    extra = {"mlflow_run_id": "run-7", "loss": 2.5}
    assert wmtp.save_checkpoint(location, model, optimizer, step=3, epoch=1, extra=extra) == str(
        location
    )
    return location


def test_resume_then_two_steps_equals_five_straight(
    saved: Path, straight: tuple[Model, Optimizer]
) -> None:
    info = json.loads((saved / "checkpoint.json").read_text())
    assert info["format"] == "wmtp-checkpoint"
    assert (info["step"], info["epoch"], info["world_size"]) == (3, 1, 1)
    assert (info["model"], info["optimizer"]) == ("DistilGPT2MTP", "AdamW")
    listed = {p.name: p.stat().st_size for p in saved.iterdir() if p.name != "checkpoint.json"}
    assert info["files"] == listed
    model, optimizer = fresh()
    state = wmtp.load_checkpoint(saved, model, optimizer)
    assert state == wmtp.TrainingState(3, 1, {"mlflow_run_id": "run-7", "loss": 2.5})
    with pytest.raises(AttributeError):
        state.step = 4  # type: ignore[misc]  # frozen
    train(model, optimizer, range(3, 5))
    assert_same(*straight, model, optimizer)


def test_background_save_returns_a_future_and_resumes_the_same(
    tmp_path: Path, straight: tuple[Model, Optimizer]
) -> None:
    model, optimizer = fresh()
    train(model, optimizer, range(3))
    future = wmtp.save_checkpoint(tmp_path / "step-3", model, optimizer, step=3, background=True)
    train(model, optimizer, range(3, 5))  # the loop goes on while the files are written
    assert future.result(timeout=60) == str(tmp_path / "step-3")
    again, opt_again = fresh()
    assert wmtp.load_checkpoint(tmp_path / "step-3", again, opt_again).step == 3
    train(again, opt_again, range(3, 5))
    assert_same(*straight, again, opt_again)


def test_latest_checkpoint_takes_the_highest_complete_step(saved: Path, tmp_path: Path) -> None:
    assert wmtp.latest_checkpoint(tmp_path / "none-yet") is None
    assert wmtp.latest_checkpoint(tmp_path) is None
    model, _ = fresh()
    for step in (9, 10):
        wmtp.save_checkpoint(tmp_path / f"step-{step}", model, step=step)
    (tmp_path / "step-11").mkdir()  # a save that never finished
    (tmp_path / "step-11" / "__0_0.distcp").write_bytes(b"half")
    (tmp_path / "step-12").mkdir()
    (tmp_path / "step-12" / "checkpoint.json").write_text("{not json")
    assert wmtp.latest_checkpoint(tmp_path) == str(tmp_path / "step-10")  # not "step-9"
    assert wmtp.latest_checkpoint(saved.parent) == str(saved)


def test_a_complete_checkpoint_is_overwritten_only_when_asked(tmp_path: Path) -> None:
    model, optimizer = fresh()
    wmtp.save_checkpoint(tmp_path / "c", model, optimizer, step=1)
    with pytest.raises(wmtp.OptionError, match=r"already holds a complete checkpoint \(step 1\)"):
        wmtp.save_checkpoint(tmp_path / "c", model, optimizer, step=2)
    train(model, optimizer, range(1))
    wmtp.save_checkpoint(tmp_path / "c", model, optimizer, step=2, overwrite=True)
    again, opt_again = fresh()
    assert wmtp.load_checkpoint(tmp_path / "c", again, opt_again).step == 2
    assert_same(model, optimizer, again, opt_again)


def test_bad_arguments_are_option_errors(tmp_path: Path) -> None:
    model, _ = fresh()
    with pytest.raises(wmtp.OptionError, match="step=-1"):
        wmtp.save_checkpoint(tmp_path / "c", model, step=-1)
    with pytest.raises(wmtp.OptionError, match="JSON-able"):
        wmtp.save_checkpoint(tmp_path / "c", model, step=1, extra={"x": object()})
    assert not (tmp_path / "c").exists()


def test_another_models_checkpoint_is_refused_before_anything_changes(saved: Path) -> None:
    module = builders.import_file(builders.MTP_MODULE)
    config = json.loads((builders.EXAMPLES / "tiny-mtp" / "config.json").read_text())
    other = module.DistilGPT2MTP(transformers.GPT2Config.from_dict(config | {"vocab_size": 300}))
    optimizer = torch.optim.AdamW(other.parameters())
    before = snapshot(other)
    with pytest.raises(wmtp.WeightsError) as refused:
        wmtp.load_checkpoint(saved, other, optimizer)
    message = str(refused.value)
    assert f"checkpoint {saved} does not fit DistilGPT2MTP" in message
    wte = "'base_model.transformer.wte.weight'"
    assert f"{wte}: the checkpoint has float32 [256, 32], the model float32 [300, 32]" in message
    assert_untouched(other, before, optimizer)

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict(builders.GPT2_SHRINK_ALL))
    with pytest.raises(wmtp.WeightsError, match=r"missing \(in the model, not in the checkpoint\)"):
        wmtp.load_checkpoint(saved, gpt2)


def test_an_optimizer_of_another_kind_is_refused(saved: Path) -> None:
    model, _ = fresh()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = snapshot(model)
    with pytest.raises(wmtp.WeightsError, match="holds AdamW state, not SGD state"):
        wmtp.load_checkpoint(saved, model, sgd)
    assert_untouched(model, before, sgd)
    assert wmtp.load_checkpoint(saved, model).step == 3  # the model alone loads


def test_a_model_only_checkpoint_has_no_optimizer_state(tmp_path: Path) -> None:
    model, optimizer = fresh()
    wmtp.save_checkpoint(tmp_path / "m", model, step=1)
    with pytest.raises(wmtp.WeightsError, match="holds no optimizer state"):
        wmtp.load_checkpoint(tmp_path / "m", model, optimizer)


@pytest.mark.parametrize("damage", ["missing", "truncated", "no checkpoint.json"])
def test_a_damaged_checkpoint_is_refused_before_anything_changes(
    saved: Path, tmp_path: Path, damage: str
) -> None:
    import shutil

    broken = Path(shutil.copytree(saved, tmp_path / "broken"))
    shard = sorted(broken.glob("*.distcp"))[-1]
    error: type[wmtp.WmtpError]
    if damage == "missing":
        shard.unlink()
        error, match = wmtp.ModelFileError, shard.name
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
        error, match = wmtp.IntegrityError, rf"{shard.name} has \d+ bytes, but checkpoint.json says"
    else:
        (broken / "checkpoint.json").unlink()
        error, match = wmtp.ModelFileError, "holds no complete checkpoint"
    model, optimizer = fresh()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        wmtp.load_checkpoint(broken, model, optimizer)
    assert_untouched(model, before, optimizer)


class RunsCode:
    """Unpickled, it would run a shell command (what a hostile checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def old_checkpoint(model: Model, optimizer: Optimizer, **more: Any) -> dict[str, Any]:
    """What the old trainer saved: one dict, one file."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"model": state, "optimizer": optimizer.state_dict(), "epoch": 1, "step": 3,
            "mlflow_run_id": "old-run", **more}  # fmt: skip


def test_an_old_single_file_checkpoint_resumes(
    tmp_path: Path, straight: tuple[Model, Optimizer]
) -> None:
    model, optimizer = fresh()
    train(model, optimizer, range(3))
    torch.save(old_checkpoint(model, optimizer, loss=1.5), tmp_path / "checkpoint.pt")
    again, opt_again = fresh()
    state = wmtp.load_checkpoint(tmp_path / "checkpoint.pt", again, opt_again)
    assert state == wmtp.TrainingState(3, 1, {"mlflow_run_id": "old-run", "loss": 1.5})
    train(again, opt_again, range(3, 5))
    assert_same(*straight, again, opt_again)


def test_an_old_checkpoint_for_another_optimizer_is_refused(tmp_path: Path) -> None:
    model, optimizer = fresh()
    train(model, optimizer, range(1))
    torch.save(old_checkpoint(model, optimizer), tmp_path / "c.pt")
    again = wmtp.load(EXAMPLE)
    sgd = torch.optim.SGD(again.parameters(), lr=0.1, momentum=0.9)
    before = snapshot(again)
    with pytest.raises(wmtp.WeightsError, match="optimizer of another kind than SGD"):
        wmtp.load_checkpoint(tmp_path / "c.pt", again, sgd)
    assert_untouched(again, before, sgd)


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path, saved: Path) -> None:
    import shutil

    model, optimizer = fresh()
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.pt"
    torch.save(old_checkpoint(model, optimizer, callback=RunsCode(marker)), hostile)
    before = snapshot(model)
    refused = rf"{hostile}: this file holds a pickle that would run code"
    with pytest.raises(wmtp.MetadataError, match=refused):
        wmtp.load_checkpoint(hostile, model, optimizer)
    assert not marker.exists()
    assert_untouched(model, before, optimizer)

    # DCP's own `.metadata` is a pickle too: read by an unpickler that builds records only.
    broken = Path(shutil.copytree(saved, tmp_path / "broken"))
    hostile_metadata = pickle.dumps(RunsCode(marker))  # then padding: the size checks pass
    size = (broken / ".metadata").stat().st_size
    (broken / ".metadata").write_bytes(hostile_metadata + b"\0" * (size - len(hostile_metadata)))
    refused = r"\.metadata: not DCP checkpoint metadata, refused: posix.system"
    with pytest.raises(wmtp.MetadataError, match=refused):
        wmtp.load_checkpoint(broken, model, optimizer)
    assert not marker.exists()
    assert_untouched(model, before, optimizer)


KILLED = """
import sys, time, torch, wmtp
from pathlib import Path
from torch.distributed.checkpoint import filesystem
import wmtp.checkpoint as ckpt

root, point = Path(sys.argv[1]), sys.argv[2]
model = wmtp.load(sys.argv[3])
optimizer = torch.optim.AdamW(model.parameters())
wmtp.save_checkpoint(root / "step-1", model, optimizer, step=1)

def stall(*args, **kwargs):
    (root / "stalled").touch()
    time.sleep(600)

if point == "writing":
    filesystem._FileSystemWriter.write_data = stall
else:  # every file written, before checkpoint.json
    ckpt._finish = stall
wmtp.save_checkpoint(root / "step-2", model, optimizer, step=2)
"""


@pytest.mark.parametrize("point", ["writing", "before checkpoint.json"])
def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path: Path, point: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(tmp_path), point, EXAMPLE],
        cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "stalled").exists():
            assert child.poll() is None, "the child ended before it was killed"
            assert time.monotonic() < deadline, "the child never reached the kill point"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(30)
    assert wmtp.latest_checkpoint(tmp_path) == str(tmp_path / "step-1")
    model, optimizer = fresh()
    with pytest.raises(wmtp.ModelFileError, match="holds no complete checkpoint"):
        wmtp.load_checkpoint(tmp_path / "step-2", model, optimizer)
    assert wmtp.load_checkpoint(tmp_path / "step-1", model, optimizer).step == 1
    wmtp.save_checkpoint(tmp_path / "step-2", model, optimizer, step=2)  # not complete: no refusal


def test_export_loads_back_tensor_for_tensor(saved: Path, tmp_path: Path) -> None:
    model, optimizer = fresh()
    wmtp.load_checkpoint(saved, model, optimizer)
    dest = wmtp.export_checkpoint(saved, tmp_path / "trained", like=EXAMPLE)
    assert dest == str(tmp_path / "trained")
    exported = wmtp.load(dest, verify=True)
    want, got = model.state_dict(), exported.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    base: Any = exported.get_submodule("base_model")
    assert base.lm_head.weight is base.transformer.wte.weight  # tied, stored once
    meta = wmtp.read_metadata(dest)
    like = wmtp.read_metadata(EXAMPLE)
    assert meta.wmtp_type == like.wmtp_type
    assert meta.algorithm_compatibility == like.algorithm_compatibility
    assert (tmp_path / "trained" / "modeling.py").read_bytes() == builders.MTP_MODULE.read_bytes()

    command = ["export", str(saved), str(tmp_path / "bf16"), "--like", EXAMPLE, "--dtype", "bf16"]
    assert main(command) == 0
    half = wmtp.load(str(tmp_path / "bf16"))
    assert all(torch.equal(t.to(torch.bfloat16), half.state_dict()[k]) for k, t in want.items())


def test_export_of_another_models_checkpoint_is_refused(
    saved: Path, tmp_path: Path, models: dict[str, Path]
) -> None:
    with pytest.raises(wmtp.WeightsError, match=f"checkpoint {saved} does not fit the model of"):
        wmtp.export_checkpoint(saved, tmp_path / "x", like=str(models["gpt2_reward"]))
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "y"), "--like", EXAMPLE]) == 1


def test_save_in_shards_loads_back(tmp_path: Path) -> None:
    model, optimizer = fresh()
    train(model, optimizer, range(1))
    meta = wmtp.save(model, tmp_path / "m", wmtp_type="base_model",
                     algorithm_compatibility=["baseline-mtp"], max_shard_size="100KB")  # fmt: skip
    names = meta.loading_strategy.required_files
    assert names[:2] == ("config.json", "model.safetensors.index.json")
    shards = [n for n in names if n.startswith("model-")]
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(meta.files or {}) == set(names)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all((tmp_path / "m" / n).stat().st_size <= 100_000 for n in shards)
    loaded = wmtp.load(str(tmp_path / "m"), verify=True)
    want, got = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(wmtp.OptionError, match="max_shard_size='lots' is not a size"):
        wmtp.save(model, tmp_path / "n", wmtp_type="base_model",
                  algorithm_compatibility=["baseline-mtp"], max_shard_size="lots")  # fmt: skip


def test_through_a_bucket(
    s3_server: S3Server, tmp_path: Path, straight: tuple[Model, Optimizer]
) -> None:
    opts = storage_options(s3_server)
    root = f"s3://{s3_server.bucket}/runs/{uuid.uuid4().hex[:8]}"
    model, optimizer = fresh()
    train(model, optimizer, range(3))
    assert wmtp.latest_checkpoint(root, storage_options=opts) is None
    wmtp.save_checkpoint(f"{root}/step-2", model, step=2, storage_options=opts)
    where = wmtp.save_checkpoint(f"{root}/step-3", model, optimizer, step=3, storage_options=opts)
    with pytest.raises(wmtp.OptionError, match="already holds a complete checkpoint"):
        wmtp.save_checkpoint(where, model, optimizer, step=3, storage_options=opts)
    assert wmtp.latest_checkpoint(root, storage_options=opts) == where
    again, opt_again = fresh()
    assert wmtp.load_checkpoint(where, again, opt_again, storage_options=opts).step == 3
    train(again, opt_again, range(3, 5))
    assert_same(*straight, again, opt_again)

    exported = f"{root}/exported"
    wmtp.export_checkpoint(where, exported, like=EXAMPLE, storage_options=opts)
    back = wmtp.load(exported, storage_options=opts, trust_code=True)
    want, got = model.state_dict(), back.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


FRESH = """
import json, sys, torch, wmtp
assert "wmtp.checkpoint" not in sys.modules  # imported on first use only
root, example = sys.argv[1], sys.argv[2]
model = wmtp.load(example).train()
optimizer = torch.optim.AdamW(model.parameters())
ids = torch.randint(0, 256, (2, 8))
model(input_ids=ids, labels=ids)["loss"].backward()
optimizer.step()
wmtp.save_checkpoint(f"{root}/step-1", model, optimizer, step=1, extra={"mlflow_run_id": "r"})
again = wmtp.load(example)
resume = wmtp.latest_checkpoint(root)
state = wmtp.load_checkpoint(resume, again, torch.optim.AdamW(again.parameters()))
pairs = zip(model.state_dict().values(), again.state_dict().values())
same = all(torch.equal(a, b) for a, b in pairs)
wmtp.export_checkpoint(f"{root}/step-1", f"{root}/model", like=example)
print(json.dumps([state.step, state.extra, same, type(wmtp.load(f"{root}/model")).__name__]))
"""


def test_the_public_calls_in_a_fresh_interpreter(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FRESH, str(tmp_path), EXAMPLE], cwd=ROOT, capture_output=True,
        text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found == [1, {"mlflow_run_id": "r"}, True, "DistilGPT2MTP"]
    assert "Warning" not in done.stderr, done.stderr


def test_print_the_refusals(saved: Path) -> None:
    """Smoke: every refusal message is one readable paragraph naming the checkpoint."""
    model = wmtp.load(EXAMPLE)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        wmtp.load_checkpoint(saved, model, sgd)
    except wmtp.WmtpError as e:
        assert str(saved) in str(e)
        assert textwrap.dedent(str(e)) == str(e)
