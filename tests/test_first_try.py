"""What a new user meets first: `load_roles` in a fresh interpreter, options per role,
`pathlib.Path` locations, a package that does not import, and `save` after config overrides."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import wmtp
from tests import builders
from wmtp.check import check, inspect_model
from wmtp.migrate import migrate

ROOT = Path(__file__).resolve().parents[1]

FRESH_ROLES = """
import json, sys, torch, wmtp
from safetensors.torch import load_file
algo, paths = sys.argv[1], sys.argv[2:]
models = wmtp.load_roles(algo, paths)
chosen = wmtp.resolve_roles(algo, paths)
for role, model in models.items():  # every tensor as stored
    state = model.state_dict()
    for key, t in load_file(chosen[role] + "/model.safetensors").items():
        assert torch.equal(state[key], t), (role, key)
print(json.dumps(sorted(models)))
"""


def _candidates(models: dict[str, Path]) -> list[str]:
    return [str(models[n]) for n in ("mtp", "gpt2_reward", "gpt2_reference")]


@pytest.mark.parametrize("algo", ["critic-wmtp", "rho1-wmtp"])
def test_load_roles_is_the_first_thing_in_a_fresh_interpreter(
    models: dict[str, Path], algo: str
) -> None:
    """Two models checked in two threads: transformers' lazy imports used to race there
    (ImportError: cannot import name 'CONFIG_MAPPING'), 9 times in 10."""
    argv = [sys.executable, "-c", FRESH_ROLES, algo, *_candidates(models)]

    def run(_: int) -> subprocess.CompletedProcess[str]:
        env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
        return subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)

    with ThreadPoolExecutor(2) as pool:
        for done in pool.map(run, range(4)):
            assert done.returncode == 0, done.stderr[-3000:]
            assert json.loads(done.stdout) == sorted(wmtp.ALGORITHM_ROLES[algo])


def test_a_package_that_does_not_import_is_a_wmtp_error_naming_it(
    models: dict[str, Path],
) -> None:
    code = textwrap.dedent(f"""
        import sys, wmtp
        BLOCKED = "transformers.models.gpt2.modeling_gpt2"
        class Block:  # as if that part of transformers were missing
            def find_spec(self, name, path=None, target=None):
                if name == BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Block())
        try:
            wmtp.load({str(models["gpt2_reward"])!r})
        except wmtp.PackageError as e:
            assert isinstance(e, ImportError) and isinstance(e, wmtp.WmtpError)
            print(e)
    """)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the model needs transformers.models.gpt2.modeling_gpt2" in done.stdout
    assert f"{models['gpt2_reward']}/metadata.json" in done.stdout
    assert "pip install transformers" in done.stdout


def test_options_per_role(models: dict[str, Path]) -> None:
    loaded = wmtp.load_roles(
        "rho1-wmtp",
        _candidates(models),
        dtype={"reference_model": "bf16"},
        config_overrides={"reference_model": {"output_hidden_states": True}},
    )
    base, reference = loaded["base_model"], loaded["reference_model"]
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    assert getattr(reference, "config").output_hidden_states is True  # noqa: B009 (typed Any)
    assert getattr(base, "config").output_hidden_states is False  # noqa: B009
    stored = load_file(models["gpt2_reference"] / "model.safetensors")
    state = reference.state_dict()
    assert all(torch.equal(state[k], t.to(torch.bfloat16)) for k, t in stored.items())


def test_reference_and_reward_models_come_back_frozen_the_base_model_trainable(
    models: dict[str, Path],
) -> None:
    for algo, other in (("rho1-wmtp", "reference_model"), ("critic-wmtp", "reward_model")):
        loaded = wmtp.load_roles(algo, _candidates(models))
        assert all(p.requires_grad for p in loaded["base_model"].parameters())
        assert not any(p.requires_grad for p in loaded[other].parameters())


def test_per_role_options_are_checked_before_any_model_is_read(models: dict[str, Path]) -> None:
    with pytest.raises(wmtp.OptionError, match="reward_model, but rho1-wmtp loads"):
        wmtp.load_roles("rho1-wmtp", _candidates(models), dtype={"reward_model": "bf16"})
    with pytest.raises(wmtp.OptionError, match=r"\['dtpye'\], which wmtp.load does not take"):
        wmtp.load_roles("rho1-wmtp", _candidates(models), dtpye="bf16")


def test_a_path_is_a_location_everywhere(models: dict[str, Path], tmp_path: Path) -> None:
    folder = models["mtp"]
    assert isinstance(folder, Path)
    model = wmtp.load(folder)
    stored = load_file(folder / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], t) for k, t in stored.items())
    assert wmtp.read_metadata(folder).wmtp_type == "base_model"
    assert wmtp.resolve("baseline-mtp", [folder]) == str(folder)
    paths = [models["mtp"], models["gpt2_reward"]]
    assert wmtp.resolve_roles("critic-wmtp", paths)["reward_model"] == str(paths[1])
    assert set(wmtp.load_roles("critic-wmtp", paths)) == {"base_model", "reward_model"}
    assert check(folder).problems == ()
    assert inspect_model(folder)["tensors"]["count"] == len(stored)
    saved = tmp_path / "saved"
    wmtp.save(model, saved, wmtp_type="base_model", algorithm_compatibility=["baseline-mtp"])
    assert wmtp.load(Path(f"{saved}")).state_dict().keys() == model.state_dict().keys()
    tokenized = builders.save_mtp(tmp_path / "with-tokenizer")
    wmtp.save(
        wmtp.load(tokenized),
        tokenized,
        wmtp_type="base_model",
        algorithm_compatibility=["baseline-mtp"],
        tokenizer=builders.tiny_tokenizer(),
    )
    assert wmtp.load_tokenizer(tokenized)("a b").input_ids
    assert migrate(folder).location == str(folder)


def test_save_writes_config_json_as_it_was_not_the_runs_overrides(
    models: dict[str, Path], tmp_path: Path
) -> None:
    folder = models["gpt2_reference"]
    model = wmtp.load(folder, config_overrides={"output_hidden_states": True, "n_ctx": 32})
    config: Any = getattr(model, "config")  # noqa: B009 (a transformers config)
    assert config.output_hidden_states is True
    before = json.loads((folder / "config.json").read_text())
    meta = {"wmtp_type": "reference_model", "algorithm_compatibility": ["rho1-wmtp"]}
    wmtp.save(model, tmp_path / "kept", **meta)  # type: ignore[arg-type]
    saved = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert saved.get("output_hidden_states", False) is False
    assert saved["n_ctx"] == before["n_ctx"] != 32
    assert config.output_hidden_states is True  # the model itself keeps them
    wmtp.save(model, tmp_path / "asked", keep_overrides=True, **meta)  # type: ignore[arg-type]
    asked = json.loads((tmp_path / "asked" / "config.json").read_text())
    assert asked["output_hidden_states"] is True and asked["n_ctx"] == 32
