"""A training run's models from one call: roles per algorithm (`resolve_roles`, `load_roles`),
config overrides and device="auto"."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import wmtp
from tests import builders
from tests.conftest import Copy
from tests.s3server import S3Server, storage_options, upload_folder
from wmtp.cli import main

LOAD = importlib.import_module("wmtp.load")  # the module; `wmtp.load` is the function


def _candidates(models: dict[str, Path]) -> list[str]:
    """Reference first, then the base model and both reward models: order matters."""
    names = ["gpt2_reference", "mtp", "gpt2_reward", "distilbert_reward"]
    return [str(models[name]) for name in names]


def _assert_equal_to_files(model: torch.nn.Module, folder: Path) -> None:
    """Every tensor of the checkpoint is in the model, unchanged (keys as saved by wmtp)."""
    state = model.state_dict()
    tensors = load_file(folder / "model.safetensors")
    assert tensors and all(torch.equal(state[key], t) for key, t in tensors.items())


def test_the_table_is_data_and_read_only() -> None:
    assert dict(wmtp.ALGORITHM_ROLES) == {
        "baseline-mtp": ("base_model",),
        "critic-wmtp": ("base_model", "reward_model"),
        "rho1-wmtp": ("base_model", "reference_model"),
    }
    with pytest.raises(TypeError):
        wmtp.ALGORITHM_ROLES["x"] = ("base_model",)  # type: ignore[index]


@pytest.mark.parametrize(
    ("algo", "expected"),
    [
        ("baseline-mtp", {"base_model": "mtp"}),
        ("critic-wmtp", {"base_model": "mtp", "reward_model": "gpt2_reward"}),
        ("rho1-wmtp", {"base_model": "mtp", "reference_model": "gpt2_reference"}),
    ],
)
def test_each_algorithm_gets_its_roles_first_in_order(
    algo: str, expected: dict[str, str], models: dict[str, Path]
) -> None:
    chosen = wmtp.resolve_roles(algo, _candidates(models))
    assert chosen == {role: str(models[name]) for role, name in expected.items()}
    assert list(chosen) == list(wmtp.ALGORITHM_ROLES[algo])  # base model first


def test_each_metadata_is_read_once(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, copy: Copy
) -> None:
    reads: list[str] = []
    real = LOAD.read_metadata
    # Copies: a read another test left running in the background is not one of these.
    paths = [str(copy(Path(p))) for p in _candidates(models)]

    def counted(location: str, **options: Any) -> Any:
        reads.extend([location] if location in paths else [])
        return real(location, **options)

    monkeypatch.setattr(LOAD, "read_metadata", counted)
    wmtp.resolve_roles("critic-wmtp", paths)
    deadline = time.monotonic() + 10  # the answer comes before the last reads end
    while len(reads) < len(paths) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a second read of any candidate would show now
    assert sorted(reads) == sorted(paths)


def test_unserved_roles_are_all_named_with_every_reason(models: dict[str, Path]) -> None:
    paths = [str(models["gpt2_reference"]), str(models["gpt2_reward"])]
    with pytest.raises(wmtp.NoCompatibleModelError) as err:
        wmtp.resolve_roles("rho1-wmtp", paths)
    lines = str(err.value).splitlines()
    assert lines[0] == "no candidate serves 'rho1-wmtp' as base_model:"
    assert (
        lines[1]
        == f"  {paths[0]}: serves rho1-wmtp but wmtp_type is 'reference_model', not 'base_model'"
    )
    assert lines[2] == f"  {paths[1]}: algorithm_compatibility is ['critic-wmtp']"
    with pytest.raises(wmtp.NoCompatibleModelError, match=r"as base_model, reward_model:"):
        wmtp.resolve_roles("critic-wmtp", [str(models["gpt2_reference"])])


def test_an_unknown_algorithm_lists_the_known_ones() -> None:
    with pytest.raises(wmtp.OptionError) as err:
        wmtp.resolve_roles("critic-wmpt", [])
    assert "baseline-mtp, critic-wmtp, rho1-wmtp" in str(err.value)
    assert "did you mean 'critic-wmtp'?" in str(err.value)


def test_an_algorithm_of_ones_own_names_its_roles(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reward"])
    data = json.loads((folder / "metadata.json").read_text())
    data["algorithm_compatibility"] = ["my-dpo"]
    (folder / "metadata.json").write_text(json.dumps(data))
    chosen = wmtp.resolve_roles("my-dpo", [str(models["mtp"]), str(folder)], roles=["reward_model"])
    assert chosen == {"reward_model": str(folder)}
    with pytest.raises(wmtp.OptionError, match=r"roles \['critic'\] are not wmtp_types"):
        wmtp.resolve_roles("my-dpo", [str(folder)], roles=["critic"])


def test_load_roles_loads_every_model_exactly(models: dict[str, Path]) -> None:
    loaded = wmtp.load_roles("critic-wmtp", _candidates(models))
    assert list(loaded) == ["base_model", "reward_model"]
    _assert_equal_to_files(loaded["base_model"], models["mtp"])
    _assert_equal_to_files(loaded["reward_model"], models["gpt2_reward"])
    cast = wmtp.load_roles("rho1-wmtp", _candidates(models), dtype="bf16")
    dtypes = {p.dtype for model in cast.values() for p in model.parameters()}
    assert dtypes == {torch.bfloat16}


def test_load_roles_reports_every_problem_before_any_weight_is_read(
    models: dict[str, Path], copy: Copy, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, reward = copy(models["mtp"]), copy(models["gpt2_reward"])
    for folder in (base, reward):  # one tensor too few in each
        tensors = dict(load_file(folder / "model.safetensors"))
        tensors.pop(sorted(tensors)[-1])
        builders.write_checkpoint(folder, tensors)
    reads: list[object] = []
    monkeypatch.setattr(LOAD, "read_tensors", lambda *a: reads.append(a))
    with pytest.raises(wmtp.WmtpError) as err:
        wmtp.load_roles("critic-wmtp", [str(base), str(reward)])
    assert reads == []  # the base model was never filled
    assert len(err.value.problems) == 2
    assert err.value.problems[0].startswith(f"base_model ({base}): ")
    assert err.value.problems[1].startswith(f"reward_model ({reward}): ")
    assert all("1 missing" in p for p in err.value.problems)


@pytest.mark.parametrize("algo", sorted(wmtp.ALGORITHM_ROLES))
def test_every_algorithm_loads_from_a_mix_of_bucket_and_disk(
    algo: str, models: dict[str, Path], s3_server: S3Server
) -> None:
    """The base model on disk, the others in the bucket: every tensor equals its file."""
    for name in ("gpt2_reference", "gpt2_reward"):
        upload_folder(s3_server, models[name], f"roles/{name}")
    remote = {n: f"s3://{s3_server.bucket}/roles/{n}" for n in ("gpt2_reference", "gpt2_reward")}
    paths = [remote["gpt2_reference"], str(models["mtp"]), remote["gpt2_reward"]]
    loaded = wmtp.load_roles(algo, paths, storage_options=storage_options(s3_server))
    where = {"base_model": "mtp", "reference_model": "gpt2_reference"}
    where["reward_model"] = "gpt2_reward"
    assert list(loaded) == list(wmtp.ALGORITHM_ROLES[algo])
    for role, model in loaded.items():
        _assert_equal_to_files(model, models[where[role]])


def test_config_overrides_are_set_before_the_model_is_built(models: dict[str, Path]) -> None:
    model: Any = wmtp.load(str(models["mtp"]), config_overrides={"output_hidden_states": True})
    out = model(torch.tensor([[1, 2, 3]]))
    assert model.config.output_hidden_states is True and "hidden_states" in out
    with pytest.raises(wmtp.WeightsError, match=r"unexpected"):  # built with 1 layer: proof
        wmtp.load(str(models["gpt2_reference"]), config_overrides={"n_layer": 1})


def test_a_misspelt_override_names_the_closest_setting(models: dict[str, Path]) -> None:
    with pytest.raises(wmtp.OptionError) as err:
        wmtp.load(str(models["mtp"]), config_overrides={"output_hiden_states": True})
    message = str(err.value)
    assert f"{models['mtp']}/config.json has no setting 'output_hiden_states'" in message
    assert "closest: output_hidden_states" in message


def test_device_auto_picks_what_this_machine_has(models: dict[str, Path]) -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    model = wmtp.load(str(models["mtp"]), device="auto")
    assert {p.device.type for p in model.parameters()} == {expected}


def test_cli_resolve_prints_each_role(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _candidates(models)
    assert main(["resolve", "critic-wmtp", *paths, "--json"]) == 0
    roles = json.loads(capsys.readouterr().out)["roles"]
    assert roles["base_model"]["location"] == paths[1]
    assert roles["reward_model"]["location"] == paths[2]
    assert roles["reward_model"]["passed_over"][paths[3]] == (
        "also serves it, but comes later in the order"
    )
    assert roles["base_model"]["passed_over"][paths[0]] == (
        "algorithm_compatibility is ['rho1-wmtp']"
    )


def test_cli_set_overrides_config(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["load", str(models["gpt2_reference"]), "--set", "n_layer=1", "--json"]) == 1
    assert "unexpected" in json.loads(capsys.readouterr().out)["message"]
    assert main(["check", str(models["mtp"]), "--set", "output_hidden_states=true"]) == 0
    assert main(["load", str(models["mtp"]), "--set", "n_layer"]) == 2
