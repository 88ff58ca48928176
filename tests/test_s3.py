"""Remote models through the same `fetch`, against a real S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import obstore
import pytest

import wmtp
from tests import builders
from tests.s3proxy import cut_responses, disarm, start_proxy, stop_proxy
from tests.s3server import (
    S3Server,
    get_bytes_served,
    get_request_count,
    make_store,
    storage_options,
    upload_folder,
)
from tests.test_load import assert_equals_file, file_tensors
from wmtp import remote as download_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def remote(models: dict[str, Path], s3_server: S3Server) -> dict[str, str]:
    """Every test model uploaded under `s3://bucket/models/<name>`."""
    for name, folder in models.items():
        upload_folder(s3_server, folder, f"models/{name}")
    return {name: f"s3://{s3_server.bucket}/models/{name}" for name in models}


@pytest.fixture
def opts(s3_server: S3Server) -> dict[str, str]:
    return storage_options(s3_server)


def _files(cache: Path, name: str) -> list[Path]:
    return [p for p in cache.rglob(name) if p.is_file()]


@pytest.mark.parametrize(
    "name", ["mtp", "llama_mtp", "gpt2_reference", "gpt2_reward", "distilbert_reward"]
)
def test_load_every_kind_from_s3(
    models: dict[str, Path], remote: dict[str, str], opts: dict[str, str], tmp_path: Path, name: str
) -> None:
    model = wmtp.load(remote[name], storage_options=opts, cache_dir=tmp_path, trust_code=True)
    assert_equals_file(model, file_tensors(models[name]))


def test_large_file_arrives_in_parallel_parts_pinned_to_its_etag(
    models: dict[str, Path],
    remote: dict[str, str],
    opts: dict[str, str],
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    size = (models["gpt2_reference"] / "model.safetensors").stat().st_size
    monkeypatch.setattr(download_module, "PART_SIZE", 64 * 1024)
    before = get_request_count(s3_server, "models/gpt2_reference/model.safetensors")
    model = wmtp.load(remote["gpt2_reference"], storage_options=opts, cache_dir=tmp_path)
    parts = get_request_count(s3_server, "models/gpt2_reference/model.safetensors") - before
    assert parts == -(-size // (64 * 1024)) > 1
    assert_equals_file(model, file_tensors(models["gpt2_reference"]))


def test_second_load_downloads_nothing(
    remote: dict[str, str], opts: dict[str, str], s3_server: S3Server, tmp_path: Path
) -> None:
    prefix = "models/mtp/"
    wmtp.load(remote["mtp"], storage_options=opts, cache_dir=tmp_path, trust_code=True)
    gets, sent = get_request_count(s3_server, prefix), get_bytes_served(s3_server, prefix)
    model = wmtp.load(remote["mtp"], storage_options=opts, cache_dir=tmp_path, trust_code=True)
    # Only metadata.json is read again; the rest is HEADs (which download no body).
    meta_size = len(obstore.get(make_store(s3_server, "models/mtp"), "metadata.json").bytes())
    assert get_request_count(s3_server, prefix) - gets == 2  # this load + the line above
    assert get_bytes_served(s3_server, prefix) - sent == 2 * meta_size
    assert type(model).__name__ == "DistilGPT2MTP"


def test_changed_object_is_downloaded_again(
    models: dict[str, Path], s3_server: S3Server, opts: dict[str, str], tmp_path: Path
) -> None:
    upload_folder(s3_server, models["gpt2_reference"], "changing/ref")
    url = f"s3://{s3_server.bucket}/changing/ref"
    first = wmtp.load(url, storage_options=opts, cache_dir=tmp_path / "cache")
    assert_equals_file(first, file_tensors(models["gpt2_reference"]))
    folder = shutil.copytree(models["gpt2_reference"], tmp_path / "changed")
    changed = {k: v + 1 for k, v in file_tensors(folder).items()}
    builders.write_checkpoint(folder, changed)  # new weights and their manifest entry
    upload_folder(s3_server, folder, "changing/ref")
    second = wmtp.load(url, storage_options=opts, cache_dir=tmp_path / "cache")
    assert_equals_file(second, changed)
    assert len(_files(tmp_path / "cache", "model.safetensors")) == 2  # one per version


def test_interrupted_download_leaves_nothing_complete(
    remote: dict[str, str],
    opts: dict[str, str],
    s3_server: S3Server,
    tmp_path: Path,
    models: dict[str, Path],
) -> None:
    proxy = start_proxy(s3_server.endpoint, lifetime=60)
    try:
        cut = opts | {"endpoint": proxy.endpoint, "max_retries": "0"}
        cut_responses(proxy, after_bytes=20_000, times=100)
        with pytest.raises(wmtp.FetchError) as err:
            wmtp.load(remote["gpt2_reference"], storage_options=cut, cache_dir=tmp_path)
        assert "model.safetensors" in str(err.value)
        assert not _files(tmp_path, "model.safetensors")
        assert not list(tmp_path.rglob("*.part"))
    finally:
        stop_proxy(proxy)
    model = wmtp.load(remote["gpt2_reference"], storage_options=opts, cache_dir=tmp_path)
    assert_equals_file(model, file_tensors(models["gpt2_reference"]))


def _loader_process(
    url: str, options: dict[str, str], cache: Path, out: Path
) -> subprocess.Popen[bytes]:
    code = (
        "import sys, json, wmtp, hashlib\n"
        "options = json.loads(sys.argv[2])\n"
        "m = wmtp.load(sys.argv[1], storage_options=options, cache_dir=sys.argv[3])\n"
        "h = hashlib.sha256(b''.join(t.numpy().tobytes() for t in m.state_dict().values()))\n"
        "open(sys.argv[4], 'w').write(h.hexdigest())\n"
    )
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", code, url, json.dumps(options), str(cache), str(out)]
    return subprocess.Popen(argv, env=env, cwd=ROOT)


def test_killed_download_leaves_nothing_complete(
    remote: dict[str, str],
    opts: dict[str, str],
    s3_server: S3Server,
    tmp_path: Path,
    models: dict[str, Path],
) -> None:
    proxy = start_proxy(s3_server.endpoint, lifetime=60)
    try:
        cut_responses(proxy, after_bytes=20_000, times=100, stall=True)
        stalled = opts | {"endpoint": proxy.endpoint}
        process = _loader_process(remote["gpt2_reference"], stalled, tmp_path, tmp_path / "h")
        deadline = time.monotonic() + 30
        while not list(tmp_path.rglob("*.part")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.rglob("*.part")), "the download never started"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        assert not _files(tmp_path, "model.safetensors")
        disarm(proxy)
        model = wmtp.load(remote["gpt2_reference"], storage_options=stalled, cache_dir=tmp_path)
    finally:
        stop_proxy(proxy)
    assert_equals_file(model, file_tensors(models["gpt2_reference"]))
    assert not list(tmp_path.rglob("*.part"))  # the killed process's part was cleaned up


def test_two_processes_download_once(
    models: dict[str, Path], s3_server: S3Server, opts: dict[str, str], tmp_path: Path
) -> None:
    upload_folder(s3_server, models["gpt2_reward"], "twice/rm")
    url = f"s3://{s3_server.bucket}/twice/rm"
    size = (models["gpt2_reward"] / "model.safetensors").stat().st_size
    before = get_bytes_served(s3_server, "twice/rm/model.safetensors")
    procs = [_loader_process(url, opts, tmp_path / "cache", tmp_path / f"h{i}") for i in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    assert get_bytes_served(s3_server, "twice/rm/model.safetensors") - before == size
    assert (tmp_path / "h0").read_text() == (tmp_path / "h1").read_text()
    assert len(_files(tmp_path / "cache", "model.safetensors")) == 1


def test_resolve_over_s3_and_local(
    remote: dict[str, str], opts: dict[str, str], models: dict[str, Path]
) -> None:
    paths = [remote["gpt2_reference"], str(models["mtp"]), remote["distilbert_reward"]]
    assert wmtp.resolve("critic-wmtp", paths, storage_options=opts) == str(models["mtp"])
    assert wmtp.resolve("critic-wmtp", paths, storage_options=opts, role="reward_model") == paths[2]
    with pytest.raises(wmtp.NoCompatibleModelError) as err:
        wmtp.resolve(
            "nothing", [*paths, remote["gpt2_reference"] + "-missing"], storage_options=opts
        )
    assert f"{remote['gpt2_reference']}: algorithm_compatibility is ['rho1-wmtp']" in str(err.value)
    assert f"{remote['gpt2_reference']}-missing: ModelFileError:" in str(err.value)


def test_wrong_secret_is_a_permission_error(
    remote: dict[str, str], opts: dict[str, str], tmp_path: Path
) -> None:
    start = time.monotonic()
    with pytest.raises(wmtp.StoreAccessError) as err:
        wmtp.load(remote["mtp"], storage_options=opts | {"secret_access_key": "wrong-secret"})
    assert time.monotonic() - start < 5  # not retried
    assert isinstance(err.value, PermissionError)
    assert f"{remote['mtp']}/metadata.json: access denied" in str(err.value)
    assert "AWS_SECRET_ACCESS_KEY" in str(err.value)


def test_missing_remote_file_names_location(
    models: dict[str, Path], s3_server: S3Server, opts: dict[str, str], tmp_path: Path
) -> None:
    folder = shutil.copytree(models["gpt2_reference"], tmp_path / "src")
    (folder / "model.safetensors").unlink()
    upload_folder(s3_server, folder, "missing/ref")
    url = f"s3://{s3_server.bucket}/missing/ref"
    with pytest.raises(wmtp.ModelFileError, match=rf"'model.safetensors' not found at {url}"):
        wmtp.load(url, storage_options=opts, cache_dir=tmp_path / "cache")


def test_unreachable_endpoint_fails_within_the_bound(opts: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    bounded = opts | {
        "endpoint": f"http://127.0.0.1:{port}",
        "max_retries": "2",
        "retry_timeout": "2",
    }
    start = time.monotonic()
    with pytest.raises(wmtp.FetchError) as err:
        wmtp.load("s3://bucket/model", storage_options=bounded)
    assert time.monotonic() - start < 10
    assert "s3://bucket/model/metadata.json" in str(err.value)
    assert f"127.0.0.1:{port}" in str(err.value)


def test_remote_custom_code_needs_trust(
    remote: dict[str, str], opts: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(wmtp.UntrustedCodeError) as err:
        wmtp.load(remote["mtp"], storage_options=opts, cache_dir=tmp_path)
    assert f"{remote['mtp']}/modeling.py would run as code here" in str(err.value)
    assert "trust_code=True" in str(err.value)
    assert not list(tmp_path.rglob("*.safetensors"))  # refused before downloading


def test_environment_configures_the_store(
    remote: dict[str, str],
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    models: dict[str, Path],
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    with pytest.raises(wmtp.StoreAccessError):
        wmtp.load(remote["gpt2_reference"], cache_dir=tmp_path)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    model = wmtp.load(remote["gpt2_reference"], cache_dir=tmp_path)
    assert_equals_file(model, file_tensors(models["gpt2_reference"]))
    # An explicit option wins over the environment.
    with pytest.raises(wmtp.StoreAccessError):
        wmtp.load(remote["gpt2_reference"], storage_options={"secret_access_key": "wrong-secret"})


def test_cache_dir_from_environment(
    remote: dict[str, str], opts: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WMTP_CACHE_DIR", str(tmp_path / "env-cache"))
    assert wmtp.cache_root() == tmp_path / "env-cache"
    wmtp.load(remote["gpt2_reward"], storage_options=opts)
    assert _files(tmp_path / "env-cache", "model.safetensors")


def test_checked_size_refuses_a_short_object(
    remote: dict[str, str], opts: dict[str, str], tmp_path: Path, models: dict[str, Path]
) -> None:
    """A cached file whose length differs from the object's is never taken for complete."""
    wmtp.load(remote["gpt2_reward"], storage_options=opts, cache_dir=tmp_path)
    [cached] = _files(tmp_path, "model.safetensors")
    size = cached.stat().st_size
    with cached.open("r+b") as f:
        f.truncate(size - 1)
    model = wmtp.load(remote["gpt2_reward"], storage_options=opts, cache_dir=tmp_path)
    assert cached.stat().st_size == size
    assert_equals_file(model, file_tensors(models["gpt2_reward"]))


def test_progress_bar_when_asked(
    remote: dict[str, str], opts: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wmtp.load(remote["gpt2_reward"], storage_options=opts, cache_dir=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "wmtp:" in err and "100%" in err
    wmtp.load(remote["gpt2_reward"], storage_options=opts, cache_dir=tmp_path / "b", progress=False)
    assert capsys.readouterr().err == ""


def test_cli_loads_from_s3(
    remote: dict[str, str], s3_server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wmtp.cli import main

    options = [f"-o{k}={v}" for k, v in storage_options(s3_server).items()]
    argv = ["load", remote["mtp"], *options, "--cache-dir", str(tmp_path), "--json"]
    assert main(argv) == 1  # remote custom code is not trusted by default
    assert "would run as code here" in json.loads(capsys.readouterr().out)["message"]
    assert main([*argv, "--trust-code"]) == 0
    assert json.loads(capsys.readouterr().out)["class"] == "DistilGPT2MTP"
    assert main(["load", remote["mtp"], "-o", "endpoint"]) == 2
