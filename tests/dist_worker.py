"""One rank of a multi-rank load, run by tests/test_torchrun.py under `torchrun`.

`python tests/dist_worker.py JOB.json`: loads the model the job names with FSDP2 `fully_shard`
on each block (gloo, CPU), then writes `<out>/rank<r>.json`: whether every local shard equals
its slice of the file's tensor, the largest difference of `model(**batch)` from a plain load,
and how much private memory (`RssAnon`) the load added.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import wmtp
from wmtp.build import remap_state_dict
from wmtp.check import check

BLOCKS = ("GPT2Block", "LlamaDecoderLayer")


def rss_anon() -> int:
    """This process's private resident memory, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def parallelize(model: torch.nn.Module) -> None:
    """FSDP2 on every transformer block, then on the root (rank 1 fails when asked to)."""
    if os.environ.get("WMTP_TEST_FAIL_RANK") == str(dist.get_rank()):
        raise RuntimeError("this rank was told to fail")
    for module in model.modules():
        if type(module).__name__ in BLOCKS:
            fully_shard(module)
    fully_shard(model)


def main(job: dict[str, Any]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    options = job.get("options", {})
    check(job["folder"])  # imports the model's classes first: their memory is not the load's
    before = rss_anon()
    model = wmtp.load(job["location"], parallelize=parallelize, **options)
    grown = rss_anon() - before
    folder = Path(job["folder"])  # the same model on disk, to compare with
    meta = wmtp.read_metadata(str(folder))
    mapping = meta.loading_strategy.state_dict_mapping
    files = remap_state_dict(load_file(folder / "model.safetensors"), mapping)
    aliases: dict[int, list[str]] = {}  # tied names share one parameter, stored once
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    wrong = []
    for name, param in model.named_parameters():
        full = next(files[n] for n in aliases[id(param)] if n in files)
        if isinstance(param, DTensor):
            local, expected = param.to_local(), full.chunk(world, dim=0)[rank]
        else:
            local, expected = param, full
        if not torch.equal(local, expected):
            wrong.append(name)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():  # transformers' outputs are dicts too
        out, plain = model(**batch)["logits"], wmtp.load(str(folder))(**batch)["logits"]
    bytes_ = sum(t.numel() * t.element_size() for t in files.values())
    result = {"rank": rank, "wrong": wrong, "checked": len(list(model.parameters())),
              "max_diff": float((out - plain).abs().max()), "rss_growth": grown,
              "model_bytes": bytes_, "world": world}  # fmt: skip
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
