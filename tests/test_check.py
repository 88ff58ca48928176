"""`check` and `inspect_model`: every problem of a folder in one report, without weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import wmtp
from tests import builders
from tests.builders import EXAMPLES
from tests.conftest import Copy
from tests.s3server import (
    S3Server,
    get_bytes_served,
    get_request_count,
    storage_options,
    upload_folder,
)
from wmtp.check import CheckReport, check, inspect_model
from wmtp.cli import main

KINDS = [  # name, class, how many of its state tensors are tied copies (not stored)
    ("mtp", "DistilGPT2MTP", 1),
    ("llama_mtp", "LlamaMTP", 0),
    ("gpt2_reference", "GPT2LMHeadModel", 1),
    ("gpt2_reward", "GPT2LMHeadModel", 1),
    ("distilbert_reward", "DistilBertForSequenceClassification", 0),
]


def header_end(path: Path) -> int:
    """Where the data section of a safetensors file starts: 8 + the header's length."""
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("name", "cls", "tied"), KINDS)
def test_good_model_has_no_problems(
    models: dict[str, Path], name: str, cls: str, tied: int
) -> None:
    report = check(str(models[name]))
    assert isinstance(report, CheckReport)
    assert report.problems == ()
    assert report.model_class == cls
    assert report.location == str(models[name])
    # Every tensor of the model was compared: the stored ones plus the tied copies.
    assert report.model_tensors == len(load_file(models[name] / "model.safetensors")) + tied
    assert report.seconds >= 0


def test_good_model_passes_with_verified_hashes(models: dict[str, Path]) -> None:
    report = check(str(models["mtp"]), verify_hashes=True)
    assert report.problems == ()
    assert report.model_class == "DistilGPT2MTP"


def test_real_mtp_fixture_reports_both_mistakes(models: dict[str, Path], tmp_path: Path) -> None:
    folder = builders.with_real_metadata(models["mtp"], "distilgpt2-mtp", tmp_path / "m")
    report = check(str(folder))
    text = "\n".join(report.problems)
    trunk = len(load_file(folder / "model.safetensors")) - 3  # all but the 3 extra heads
    assert (
        "model_class_name 'GPTMTPForCausalLM' is not defined in modeling.py "
        "(defined: DistilGPT2MTP)" in text
    )
    assert "set model_class_name to 'DistilGPT2MTP'" in text
    assert (
        f"remove_prefix 'base_model.' makes {trunk} keys unexpected; the checkpoint keys "
        "already match without it: set remove_prefix to null" in text
    )
    assert text.startswith(f"{folder}/metadata.json: ")
    assert report.model_class is None  # the named class does not exist


def test_check_reads_no_weight_bytes_locally(models: dict[str, Path], copy: Copy) -> None:
    """Garbage in place of every weight, same size: the headers still fit, so check passes;
    only hashing notices."""
    folder = copy(models["mtp"])
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    start = header_end(weights)
    weights.write_bytes(raw[:start] + b"\xa5" * (len(raw) - start))
    assert weights.stat().st_size == len(raw)
    report = check(str(folder))
    assert report.problems == ()
    assert report.model_class == "DistilGPT2MTP"
    verified = check(str(folder), verify_hashes=True)
    expected = hashlib.sha256(raw).hexdigest()
    assert verified.problems == (
        f"{weights} has sha256 {sha256(weights)}, but metadata.json's manifest "
        f"(`$.files['model.safetensors'].sha256`) says {expected}; the file is corrupt "
        "or the manifest is stale (nothing was cached)",
    )


def test_check_on_s3_reads_only_the_safetensors_header(
    models: dict[str, Path], s3_server: S3Server, tmp_path: Path
) -> None:
    prefix = f"check/{tmp_path.name}"
    upload_folder(s3_server, models["mtp"], prefix)
    key = f"{prefix}/model.safetensors"
    gets, sent = get_request_count(s3_server, key), get_bytes_served(s3_server, key)
    report = check(
        f"s3://{s3_server.bucket}/{prefix}",
        storage_options=storage_options(s3_server),
        trust_code=True,
        cache_dir=str(tmp_path / "cache"),
    )
    assert report.problems == ()
    assert report.model_class == "DistilGPT2MTP"
    # Two ranged reads: the 8-byte length, then the header itself.
    assert get_request_count(s3_server, key) - gets == 2
    assert get_bytes_served(s3_server, key) - sent == header_end(
        models["mtp"] / "model.safetensors"
    )
    assert not [p for p in (tmp_path / "cache").rglob("model.safetensors*")]


def test_remote_custom_code_needs_trust(
    models: dict[str, Path], s3_server: S3Server, tmp_path: Path
) -> None:
    prefix = f"check/{tmp_path.name}"
    upload_folder(s3_server, models["mtp"], prefix)
    url = f"s3://{s3_server.bucket}/{prefix}"
    report = check(url, storage_options=storage_options(s3_server), cache_dir=str(tmp_path))
    assert report.problems == (
        f"{url}/modeling.py would run as code here; pass trust_code=True "
        "(CLI: --trust-code) if you trust whoever can write there",
    )


def test_missing_files_are_listed_at_once(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["mtp"])
    (folder / "modeling.py").unlink()
    (folder / "model.safetensors").unlink()
    report = check(str(folder))
    assert report.problems == (
        f"required file(s) 'model.safetensors', 'modeling.py' not found at {folder}; "
        "add them there, or remove them from loading_strategy.required_files",
    )
    assert report.model_class is None


def test_missing_metadata_is_a_problem(tmp_path: Path) -> None:
    report = check(str(tmp_path))
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{tmp_path}/metadata.json does not exist")


def test_manifest_size_mismatch_names_file_and_both_sizes(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["gpt2_reference"])
    actual = (folder / "config.json").stat().st_size
    builders.set_manifest(folder, "config.json", size=actual + 7)
    report = check(str(folder))
    assert report.problems == (
        f"{folder}/config.json has {actual} bytes, but metadata.json's manifest "
        f"(`$.files['config.json'].size`) says {actual + 7}; the file or the manifest is stale",
    )
    # The rest was still checked: the model is built and fits.
    assert report.model_class == "GPT2LMHeadModel"


def test_wrong_sha256_is_reported_only_with_verify_hashes(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["gpt2_reward"])
    wrong = "ab" * 32
    builders.set_manifest(folder, "model.safetensors", sha256=wrong)
    assert check(str(folder)).problems == ()  # documented: hashes only with verify_hashes
    report = check(str(folder), verify_hashes=True)
    actual = sha256(folder / "model.safetensors")
    assert report.problems == (
        f"{folder}/model.safetensors has sha256 {actual}, but metadata.json's manifest "
        f"(`$.files['model.safetensors'].sha256`) says {wrong}; the file is corrupt or the "
        "manifest is stale (nothing was cached)",
    )
    assert report.model_class == "GPT2LMHeadModel"


def test_every_manifest_problem_in_one_report(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["mtp"])
    sizes = {n: (folder / n).stat().st_size for n in ("config.json", "modeling.py")}
    builders.set_manifest(folder, "config.json", size=1)
    builders.set_manifest(folder, "modeling.py", size=2)
    problems = check(str(folder)).problems
    assert len(problems) == 2
    assert f"{folder}/config.json has {sizes['config.json']} bytes" in problems[0]
    assert "(`$.files['config.json'].size`) says 1;" in problems[0]
    assert f"{folder}/modeling.py has {sizes['modeling.py']} bytes" in problems[1]
    assert "(`$.files['modeling.py'].size`) says 2;" in problems[1]


def test_inspect_tiny_mtp_from_headers() -> None:
    folder = EXAMPLES / "tiny-mtp"
    info = inspect_model(str(folder))
    stored = load_file(folder / "model.safetensors")
    assert info["location"] == str(folder)
    assert info["tensors"]["count"] == len(stored) == 31
    assert info["tensors"]["dtypes"] == {"F32": len(stored)}
    assert info["tensors"]["bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    # The same bytes as the loaded model's parameters (the tied head stored once).
    params = list(wmtp.load(str(folder)).parameters())
    assert info["tensors"]["bytes"] == sum(p.numel() * p.element_size() for p in params)
    assert all(p.dtype == torch.float32 for p in params)
    assert info["files"] == {
        name: (folder / name).stat().st_size
        for name in ("config.json", "model.safetensors", "modeling.py")
    }
    assert info["metadata"]["loading_strategy"]["model_class_name"] == "DistilGPT2MTP"


def test_inspect_names_a_missing_file_with_no_size(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    (folder / "model.safetensors").unlink()
    info = inspect_model(str(folder))
    assert info["files"] == {
        "config.json": (folder / "config.json").stat().st_size,
        "model.safetensors": None,
    }
    assert info["tensors"] == {"count": 0, "dtypes": {}, "bytes": 0}


def test_cli_check_good_model_exits_0(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(models["distilbert_reward"])]) == 0
    out = capsys.readouterr().out
    assert f"location: {models['distilbert_reward']}" in out.splitlines()
    assert "model_class: DistilBertForSequenceClassification" in out.splitlines()
    assert "problems: none" in out.splitlines()


def test_cli_check_real_fixture_exits_1_with_problems(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = builders.with_real_metadata(models["mtp"], "distilgpt2-mtp", tmp_path / "m")
    assert main(["check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "model_class_name 'GPTMTPForCausalLM' is not defined in modeling.py" in out
    assert "set remove_prefix to null" in out
    assert main(["check", str(folder), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["location"] == str(folder)
    assert result["model_class"] is None
    assert list(result["problems"]) == list(check(str(folder)).problems)


def test_cli_check_json_on_good_model(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(models["mtp"]), "--json", "--verify-hashes"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["problems"] == []
    assert result["model_class"] == "DistilGPT2MTP"
    assert result["model_tensors"] == 32


def test_cli_check_verify_hashes_flag(
    models: dict[str, Path], copy: Copy, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy(models["mtp"])
    builders.set_manifest(folder, "modeling.py", sha256="0" * 64)
    assert main(["check", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []
    assert main(["check", str(folder), "--json", "--verify-hashes"]) == 1
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert f"{folder}/modeling.py has sha256 {sha256(folder / 'modeling.py')}" in problem
    assert f"says {'0' * 64}" in problem


def test_cli_inspect_json(capsys: pytest.CaptureFixture[str]) -> None:
    folder = EXAMPLES / "tiny-mtp"
    assert main(["inspect", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(json.dumps(inspect_model(str(folder))))
    assert result["tensors"]["count"] == 31
    assert result["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size


def test_cli_inspect_missing_metadata_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["error"] == "ModelFileError"
    assert result["message"].startswith(f"{tmp_path}/metadata.json does not exist")


def test_remote_verify_hashes_downloads_into_cache_dir_only(
    models: dict[str, Path],
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    default = tmp_path / "default-cache"
    monkeypatch.setenv("WMTP_CACHE_DIR", str(default))
    prefix = f"check/{tmp_path.name}"
    upload_folder(s3_server, models["gpt2_reference"], prefix)
    report = check(
        f"s3://{s3_server.bucket}/{prefix}",
        storage_options=storage_options(s3_server),
        verify_hashes=True,
        cache_dir=str(tmp_path / "cache"),
    )
    assert report.problems == ()
    assert not default.exists(), sorted(p.name for p in default.rglob("*") if p.is_file())
    (stored,) = [p for p in (tmp_path / "cache").rglob("model.safetensors") if p.is_file()]
    assert sha256(stored) == sha256(models["gpt2_reference"] / "model.safetensors")


def test_remote_verify_hashes_also_hashes_cached_files(
    models: dict[str, Path], s3_server: S3Server, tmp_path: Path
) -> None:
    source = models["gpt2_reference"]
    prefix = f"check/{tmp_path.name}"
    upload_folder(s3_server, source, prefix)
    url, opts = f"s3://{s3_server.bucket}/{prefix}", storage_options(s3_server)
    cache = tmp_path / "cache"
    wmtp.load(url, storage_options=opts, cache_dir=cache)  # model.safetensors now cached
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "metadata.json").write_bytes((source / "metadata.json").read_bytes())
    builders.set_manifest(edited, "model.safetensors", sha256="0" * 64)
    upload_folder(s3_server, edited, prefix)  # replaces metadata.json only
    report = check(url, storage_options=opts, cache_dir=str(cache), verify_hashes=True)
    assert report.problems == (
        f"{url}/model.safetensors has sha256 {sha256(source / 'model.safetensors')}, but "
        f"metadata.json's manifest (`$.files['model.safetensors'].sha256`) says {'0' * 64}; "
        "the file is corrupt or the manifest is stale (nothing was cached)",
    )
