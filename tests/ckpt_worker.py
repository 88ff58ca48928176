"""One rank of a checkpoint job, run by tests/test_checkpoint_dist.py under `torchrun`.

`python tests/ckpt_worker.py JOB.json`: the example MTP model loaded with FSDP2 `fully_shard` on
each block (gloo, CPU), AdamW, then the job's `task`:

- `train`: 5 steps straight (model A); 3 steps (model B), `save_checkpoint`, then a fresh model
  C resumed from it for 2 steps: A and C must be equal. B's full state (model and optimizer,
  gathered) goes to `<out>/reference.pt` for the other runs to compare with; B is also saved
  to `bucket` when given (each rank uploads its files) and with `wmtp.save(max_shard_size=...)`
  (a collective).
- `resume`: a fresh model resumed from `checkpoint` (a folder or bucket URL); its full state
  against `reference.pt`; and the folder `wmtp.save` wrote, loaded with `parallelize=`.
- `kill`: save step 1, then save step 2 with rank 1 killed (SIGKILL) mid-write.

Each rank writes `<out>/rank<r>.json` with what it found.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard

import wmtp

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-mtp"


def parallelize(model: torch.nn.Module) -> None:
    """FSDP2 on every transformer block, then on the root."""
    for module in model.modules():
        if type(module).__name__ == "GPT2Block":
            fully_shard(module)
    fully_shard(model)


def fresh(location: str | Path = EXAMPLE) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = wmtp.load(str(location), parallelize=parallelize)
    return model.train(), torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    """Steps on the same data and dropout, whatever the run: seeded by step and rank."""
    for step in steps:
        torch.manual_seed(1000 * step + dist.get_rank())
        ids = torch.randint(0, 256, (2, 16))
        model(input_ids=ids, labels=ids)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole model and optimizer state, gathered on every rank (small model)."""
    options = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optim": optim_state}


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ (tensors bitwise), in either part."""
    wrong = []
    for part in ("model", "optim"):
        if a[part].keys() != b[part].keys():
            wrong.append(f"{part}: keys differ")
        for key in a[part].keys() & b[part].keys():
            x, y = a[part][key], b[part][key]
            same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
            if not same:
                wrong.append(f"{part}.{key}")
    return sorted(wrong)


def main(job: dict[str, Any]) -> None:
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(job["out"])
    result: dict[str, Any] = {"rank": rank}
    if job["task"] == "train":
        a, opt_a = fresh()
        train(a, opt_a, range(5))
        b, opt_b = fresh()
        train(b, opt_b, range(3))
        extra = {"mlflow_run_id": "run-7"}
        location = wmtp.save_checkpoint(job["checkpoint"], b, opt_b, step=3, epoch=1, extra=extra)
        if "bucket" in job:  # each rank uploads its own files
            options = job["storage_options"]
            wmtp.save_checkpoint(job["bucket"], b, opt_b, step=3, epoch=1, extra=extra,
                                 storage_options=options)  # fmt: skip
        reference = full_state(b, opt_b)
        if rank == 0:
            torch.save(reference, out / "reference.pt")
        role: dict[str, Any] = {"wmtp_type": "base_model", "algorithm_compatibility": ["mtp"]}
        saved = wmtp.save(b, job["saved"], max_shard_size=100_000, **role)
        c, opt_c = fresh()
        state = wmtp.load_checkpoint(location, c, opt_c)
        result["state"] = [state.step, state.epoch, state.extra]
        train(c, opt_c, range(3, 5))
        result["resumed_vs_straight"] = differences(full_state(a, opt_a), full_state(c, opt_c))
        result["required_files"] = list(saved.loading_strategy.required_files)
        config = json.loads(Path(job["saved"], "config.json").read_text())
        result["classes"] = [type(b).__name__, config["architectures"]]
    elif job["task"] == "resume":
        model, optimizer = fresh()
        options = job.get("storage_options")
        state = wmtp.load_checkpoint(job["checkpoint"], model, optimizer, storage_options=options)
        result["state"] = [state.step, state.epoch, state.extra]
        reference = torch.load(job["reference"], weights_only=True)
        result["vs_reference"] = differences(reference, full_state(model, optimizer))
        back = wmtp.load(job["saved"], parallelize=parallelize)  # what wmtp.save wrote
        gathered = full_state(back, torch.optim.AdamW(back.parameters()))["model"]
        result["saved_vs_reference"] = [
            k for k, v in reference["model"].items() if not torch.equal(v, gathered[k])
        ]
    elif job["task"] == "kill":
        model, optimizer = fresh()
        wmtp.save_checkpoint(Path(job["root"], "step-1"), model, optimizer, step=1)
        if rank == 1:  # dies while its files are being written
            from torch.distributed.checkpoint import filesystem

            def die(*args: Any, **kwargs: Any) -> Any:
                os.kill(os.getpid(), signal.SIGKILL)

            filesystem._FileSystemWriter.write_data = die  # type: ignore[method-assign]
        wmtp.save_checkpoint(Path(job["root"], "step-2"), model, optimizer, step=2)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
