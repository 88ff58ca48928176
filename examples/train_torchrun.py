"""Train an MTP model sharded over ranks: each rank loads only its own shards (FSDP2).

    torchrun --nproc_per_node=2 examples/train_torchrun.py [MODEL] [--steps N]

MODEL defaults to `examples/tiny-mtp`. On GPUs each rank takes the GPU of its LOCAL_RANK and
NCCL; on CPUs, gloo. Each rank trains on its own random batch and prints its loss after every
step; FSDP2 averages the ranks' gradients.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import wmtp

BLOCKS = ("GPT2Block", "LlamaDecoderLayer")  # the layers sharded one by one


def parallelize(model: torch.nn.Module) -> None:
    """FSDP2: shard each transformer block, then the rest (embeddings, heads) at the root."""
    for module in model.modules():
        if type(module).__name__ in BLOCKS:
            fully_shard(module)
    fully_shard(model)


def main() -> None:
    """Load sharded, train a few steps on random tokens, print each rank's loss."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).parent / "tiny-mtp"
    parser.add_argument("model", nargs="?", default=str(default), help="folder or s3:// URL")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    try:
        # Built empty, sharded by `parallelize`, then each rank reads only its own shards.
        model = wmtp.load(args.model, parallelize=parallelize, device=device)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        config: Any = model.config  # the model's transformers config
        vocab = int(config.vocab_size)
        generator = torch.Generator().manual_seed(rank)  # a different batch on each rank
        ids = torch.randint(vocab, (2, 16), generator=generator).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        for step in range(args.steps):  # the same batch each step: the loss falls
            loss = model(**batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            print(f"rank {rank}: step {step}: loss {loss.item():.4f}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
