"""Multi-rank loading under `torchrun --nproc_per_node=2` (gloo, CPU, 127.0.0.1): each rank
fills only its own shards (FSDP2's, or tensor parallelism's: Shard(0), Shard(1), Replicate),
equal to the file's, also cast (`dtype=`), and the sharded model computes what a plain load
computes. Error paths that need no second rank run in this process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import wmtp
from tests import builders
from tests.s3server import S3Server, get_bytes_served, storage_options, upload_folder

WORKER = Path(__file__).with_name("dist_worker.py")
REPO = WORKER.parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(job: dict[str, Any], tmp_path: Path, **env: str) -> list[dict[str, Any]]:
    """Run the worker on 2 ranks (bounded); the per-rank results, or the failure's output."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (tmp_path / "job.json").write_text(json.dumps(job | {"out": str(out)}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               str(WORKER), str(tmp_path / "job.json")]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)} | env,
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    if done.returncode:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stderr[-20000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _assert_sharded_exactly(results: list[dict[str, Any]]) -> None:
    for result in results:
        assert result["wrong"] == [], result
        assert result["checked"] > 0
        assert result["max_diff"] < 1e-5, result  # the sharded forward equals a plain load's
        # Private memory: this rank's shards, not the model (plus a small constant).
        limit = result["model_bytes"] / result["world"] + 16 * 2**20
        assert result["rss_growth"] <= limit, result


@pytest.fixture(scope="module")
def remapped_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Llama MTP model (rotary buffers) whose checkpoint keys carry a prefix to remove."""
    folder = builders.save_llama_mtp(tmp_path_factory.mktemp("dist") / "llama_mtp")
    tensors = load_file(folder / "model.safetensors")
    save_file({f"model.{k}": t for k, t in tensors.items()}, folder / "model.safetensors")
    builders.refresh_manifest(folder, "model.safetensors")
    builders.edit_metadata(folder, state_dict_mapping={"remove_prefix": "model."})
    return folder


@pytest.fixture(scope="module")
def medium_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 reward model of 68 MB: big enough that a whole copy per rank would show."""
    shrink = {"n_embd": 512, "n_layer": 4, "n_head": 8, "vocab_size": 8192, "n_positions": 128}
    dest = tmp_path_factory.mktemp("dist") / "medium_gpt2"
    return builders.save_hf(dest, "tiny-reward-model-gpt2", "AutoModelForCausalLM", shrink)


@pytest.mark.parametrize("name", ["llama_mtp", "gpt2_reward", "medium_gpt2"])
def test_each_rank_fills_its_own_fsdp2_shards(
    name: str, remapped_llama: Path, medium_gpt2: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    folders = {"llama_mtp": remapped_llama, "medium_gpt2": medium_gpt2}
    folder = folders.get(name) or models[name]
    results = torchrun({"location": str(folder), "folder": str(folder)}, tmp_path)
    _assert_sharded_exactly(results)


@pytest.fixture(scope="module")
def biased_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Llama MTP model with biases on its attention and MLP projections: row-wise
    parallelism leaves those of o_proj and down_proj replicated."""
    config = transformers.LlamaConfig.from_dict(
        builders.LLAMA | {"attention_bias": True, "mlp_bias": True}
    )
    torch.manual_seed(0)
    model = builders.import_file(builders.LLAMA_MODULE).LlamaMTP(config)
    dest = tmp_path_factory.mktemp("dist") / "biased_llama"
    wmtp.save(model, dest, wmtp_type="base_model", algorithm_compatibility=["baseline-mtp"])
    return dest


def test_each_rank_fills_its_tensor_parallel_shards(biased_llama: Path, tmp_path: Path) -> None:
    """`parallelize_module` with Colwise/Rowwise styles: every placement but Partial, each
    local shard the slice torch's `distribute_tensor` cuts; and a mesh on another device than
    the one asked for is an OptionError on every rank."""
    job = {"location": str(biased_llama), "folder": str(biased_llama), "plan": "tp",
           "probe_device": True}  # fmt: skip
    results = torchrun(job, tmp_path)
    _assert_sharded_exactly(results)
    for result in results:
        assert result["placements"] == ["R", "S(0)", "S(1)"], result
        assert result["device_error"] == (
            "OptionError: device 'cuda:0', but the mesh of parallelize is on {'cpu'}"
        )


def test_each_rank_fills_its_fsdp2_shards_cast(medium_gpt2: Path, tmp_path: Path) -> None:
    """`dtype="bf16"` with `fully_shard`: the shards hold the cast file, tied weights too, and
    a rank casts only its shards (its private memory stays within its share of the cast
    model, not the whole cast checkpoint)."""
    folder = medium_gpt2
    job = {"location": str(folder), "folder": str(folder), "dtype": "bf16"}
    results = torchrun(job, tmp_path)
    _assert_sharded_exactly(results)
    for result in results:
        assert result["dtypes"] == ["torch.bfloat16"], result
        assert result["placements"] == ["S(0)"], result


def test_two_ranks_download_once_from_a_bucket(
    models: dict[str, Path], s3_server: S3Server, tmp_path: Path
) -> None:
    upload_folder(s3_server, models["gpt2_reward"], "dist/gpt2_reward")
    before = get_bytes_served(s3_server, "dist/gpt2_reward/model.safetensors")
    job = {"location": f"s3://{s3_server.bucket}/dist/gpt2_reward",
           "folder": str(models["gpt2_reward"]),
           "options": {"storage_options": storage_options(s3_server),
                       "cache_dir": str(tmp_path / "cache")}}  # fmt: skip
    _assert_sharded_exactly(torchrun(job, tmp_path))
    size = (models["gpt2_reward"] / "model.safetensors").stat().st_size
    assert get_bytes_served(s3_server, "dist/gpt2_reward/model.safetensors") - before == size


def test_a_failing_rank_is_named_on_every_rank(models: dict[str, Path], tmp_path: Path) -> None:
    job = {"location": str(models["gpt2_reward"]), "folder": str(models["gpt2_reward"])}
    with pytest.raises(AssertionError) as failed:
        torchrun(job, tmp_path, WMTP_TEST_FAIL_RANK="1")
    output = str(failed.value)
    assert (
        "rank 1 failed to load its shards: MetadataError: parallelize(GPT2LMHeadModel) failed"
        in output
    )
    assert "this rank was told to fail" in output


def test_parallelize_without_a_process_group_fills_plain_parameters(
    models: dict[str, Path],
) -> None:
    """A `parallelize` that shards nothing: every parameter filled whole, equal to the file."""
    folder = models["gpt2_reward"]
    model = wmtp.load(str(folder), parallelize=lambda model: None)
    files = load_file(folder / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], t) for k, t in files.items())
    assert model.lm_head.weight is model.transformer.wte.weight  # type: ignore[union-attr]
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_a_parameter_parallelize_adds_is_refused(models: dict[str, Path]) -> None:
    def adds(model: torch.nn.Module) -> None:
        model.register_parameter("extra", torch.nn.Parameter(torch.empty(2, device="meta")))

    with pytest.raises(
        wmtp.MetadataError, match=r"parallelize\(GPT2LMHeadModel\) added or removed extra;"
    ):
        wmtp.load(str(models["gpt2_reward"]), parallelize=adds)


def test_a_buffer_parallelize_adds_or_a_module_it_removes_is_named(
    models: dict[str, Path],
) -> None:
    with pytest.raises(wmtp.MetadataError, match=r"added or removed steps; it may shard"):
        wmtp.load(str(models["gpt2_reward"]), parallelize=builders.parallelize_adding_a_buffer)
    with pytest.raises(wmtp.MetadataError, match=r"added or removed transformer\.h\.1\.attn"):
        wmtp.load(str(models["gpt2_reward"]), parallelize=builders.parallelize_removing_a_block)


def test_a_failing_parallelize_is_a_metadata_error(models: dict[str, Path]) -> None:
    def fails(model: torch.nn.Module) -> None:
        raise ValueError("no mesh")

    with pytest.raises(wmtp.MetadataError, match=r"parallelize\(GPT2LMHeadModel\) failed"):
        wmtp.load(str(models["gpt2_reward"]), parallelize=fails)


def test_load_roles_takes_a_parallelize_per_role(models: dict[str, Path]) -> None:
    """One process: the base model through a (no-op) parallelize, the reward model plainly."""
    seen: list[str] = []
    paths = [str(models["mtp"]), str(models["gpt2_reward"])]
    loaded = wmtp.load_roles(
        "critic-wmtp", paths, parallelize={"base_model": lambda m: seen.append(type(m).__name__)}
    )
    assert seen == ["DistilGPT2MTP"]
    for role, name in (("base_model", "mtp"), ("reward_model", "gpt2_reward")):
        state = loaded[role].state_dict()
        files = load_file(models[name] / "model.safetensors")
        assert all(torch.equal(state[k], t) for k, t in files.items())
