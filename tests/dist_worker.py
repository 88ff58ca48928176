"""One rank of a multi-rank load, run by tests/test_torchrun.py under `torchrun`.

`python tests/dist_worker.py JOB.json`: loads the model the job names (gloo, CPU) with the
job's `plan`: FSDP2 `fully_shard` on each block ("fsdp", the default) or tensor parallelism by
`parallelize_module` ("tp": Colwise/Rowwise on the Llama MTP model's linear layers), and with
the job's `dtype`, if any. Then it writes `<out>/rank<r>.json`: the local shards that differ
from their slice of the file's tensor (the slice torch's own `distribute_tensor` cuts, under
the parameter's placements), the placements and dtypes seen, the largest difference of
`model(**batch)` from a plain load, and how much private memory (`RssAnon`) the load added.
With `probe_device`, it first asks `fill_shards` for cuda:0 under a CPU mesh and writes the
error every rank raises (`device_error`).
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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

import wmtp
from wmtp.build import remap_state_dict
from wmtp.check import check
from wmtp.shard import fill_shards

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


def tensor_parallel(model: torch.nn.Module) -> None:
    """Megatron-style on the Llama trunk: q, k, v, gate and up column-wise (weights and biases
    Shard(0)), o and down row-wise (weights Shard(1), biases Replicate); each extra head
    column-wise, its logits gathered. Embeddings, norms and the LM head stay plain."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plan: dict[str, ParallelStyle] = {}
    for name, _ in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            plan[name] = ColwiseParallel()
        elif leaf in ("o_proj", "down_proj"):
            plan[name] = RowwiseParallel()
        elif name.startswith("extra_heads."):
            plan[name] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, mesh, plan)


PLANS = {"fsdp": parallelize, "tp": tensor_parallel}


def wrong_device() -> str:
    """`fill_shards` told to fill cuda:0 under a CPU mesh: the error this rank raises."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, device="meta"))
    tensors, groups = {"0.weight": torch.ones(4, 4), "0.bias": torch.zeros(4)}, [("0.weight",)]
    try:
        fill_shards(model, tensors, [*groups, ("0.bias",)], fully_shard, torch.device("cuda", 0))
    except wmtp.WmtpError as e:
        return f"{type(e).__name__}: {e}"
    return ""


def main(job: dict[str, Any]) -> None:
    dist.init_process_group("gloo")
    said = wrong_device() if job.get("probe_device") else None
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = job.get("dtype")
    options = job.get("options", {}) | {"dtype": dtype}
    check(job["folder"])  # imports the model's classes first: their memory is not the load's
    before = rss_anon()
    model = wmtp.load(job["location"], parallelize=PLANS[job.get("plan", "fsdp")], **options)
    grown = rss_anon() - before
    folder = Path(job["folder"])  # the same model on disk, to compare with
    plain = wmtp.load(str(folder), dtype=dtype)
    meta = wmtp.read_metadata(str(folder))
    mapping = meta.loading_strategy.state_dict_mapping
    files = remap_state_dict(load_file(folder / "model.safetensors"), mapping)
    if dtype is not None:  # floating tensors cast as the job asks: "bf16", "float16"...
        cast = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype))
        files = {k: t.to(cast) if t.is_floating_point() else t for k, t in files.items()}
    aliases: dict[int, list[str]] = {}  # tied names share one parameter, stored once
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    wrong, placements, dtypes = [], set(), set()
    for name, param in model.named_parameters():
        full = next(files[n] for n in aliases[id(param)] if n in files)
        dtypes.add(str(param.dtype))
        if isinstance(param, DTensor):
            local = param.to_local()
            slice_ = distribute_tensor(
                full, param.device_mesh, param.placements, src_data_rank=None
            )
            expected = slice_.to_local()
            placements |= {str(p) for p in param.placements}
        else:
            local, expected = param, full
        if local.dtype != expected.dtype or not torch.equal(local, expected):
            wrong.append(name)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():  # transformers' outputs are dicts too
        out, want = model(**batch)["logits"], plain(**batch)["logits"]
    bytes_ = sum(t.numel() * t.element_size() for t in files.values())
    result = {"rank": rank, "wrong": wrong, "checked": len(list(model.parameters())),
              "max_diff": float((out.float() - want.float()).abs().max()),
              "rss_growth": grown, "model_bytes": bytes_, "world": world,
              "placements": sorted(placements), "dtypes": sorted(dtypes),
              "device_error": said}  # fmt: skip
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
