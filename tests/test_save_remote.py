"""`save` to a bucket: the same folder as a local save, uploaded with metadata.json last, so an
upload that fails or is killed never leaves a model that loads half-written (real S3 server)."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest
import torch

import wmtp
from tests import builders
from tests.s3proxy import S3Proxy, cut_responses, start_proxy, stop_proxy
from tests.s3server import REGION, S3Server, make_store, storage_options
from tests.test_save import assert_same_state

ROOT = Path(__file__).resolve().parents[1]
SAVE = sys.modules["wmtp.save"]  # `wmtp.save` is the function; its module holds PART_SIZE
ROLE: dict[str, Any] = {"wmtp_type": "reference_model", "algorithm_compatibility": ["rho1-wmtp"]}
# Parts of the failing uploads: over config.json's 1 KB, so model.safetensors alone goes in
# parts, over 60 of them.
SMALL_PART = 2048
# Response bytes a proxied connection may carry before it is cut or stalled. The first one
# carries config.json's PUT (287 bytes of answer), CreateMultipartUpload (556) and a part
# (287): past the first two, so the upload begins and a part is what fails; 60 parts'
# answers on the at most 9 connections of an upload pass 1200 on one of them long before
# the upload completes.
AFTER_BYTES = 1200


def gpt2(seed: int = 0, **shrink: Any) -> torch.nn.Module:
    config = builders.fixture_config("distilgpt2", **(builders.GPT2_SHRINK_ALL | shrink))
    return builders.hf_model("AutoModelForCausalLM", config, seed)


@pytest.fixture
def opts(s3_server: S3Server) -> dict[str, str]:
    return storage_options(s3_server)


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix in the bucket for each test."""
    return f"saved/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[S3Proxy]:
    proxy = start_proxy(s3_server.endpoint, lifetime=180)
    yield proxy
    stop_proxy(proxy)


def url(server: S3Server, prefix: str) -> str:
    return f"s3://{server.bucket}/{prefix}"


def through(proxy: S3Proxy, opts: dict[str, str]) -> dict[str, str]:
    """Options that reach the server through `proxy`, failing at once (no retries)."""
    return opts | {"endpoint": proxy.endpoint, "max_retries": "0"}


def s3_get(server: S3Server, query: dict[str, str]) -> str:
    """A SigV4-signed GET on the bucket: for what obstore has no call for (multipart listings)."""
    now = datetime.datetime.now(datetime.UTC)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    path, qs = f"/{server.bucket}", urllib.parse.urlencode(sorted(query.items()), safe="-_.~")
    empty = hashlib.sha256(b"").hexdigest()
    headers = {"host": f"127.0.0.1:{server.port}", "x-amz-content-sha256": empty}
    headers["x-amz-date"] = stamp
    names = ";".join(sorted(headers))
    lines = [f"{k}:{headers[k]}" for k in sorted(headers)]
    canonical = "\n".join(["GET", path, qs, *lines, "", names, empty])
    scope = f"{day}/{REGION}/s3/aws4_request"
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    key = ("AWS4" + server.secret_key).encode()
    for part in (day, REGION, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{digest}".encode(), "sha256")
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={server.access_key}/{scope}, "
        f"SignedHeaders={names}, Signature={signature.hexdigest()}"
    )
    request = urllib.request.Request(f"{server.endpoint}{path}?{qs}", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


def pending_uploads(server: S3Server, prefix: str) -> list[str]:
    """Keys of the multipart uploads begun under `prefix` and neither completed nor aborted."""
    xml = s3_get(server, {"uploads": "", "prefix": f"{prefix}/"})
    return re.findall(r"<Upload>.*?<Key>(.*?)</Key>", xml, re.DOTALL)


def stored(server: S3Server, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, by name."""
    store = make_store(server, prefix)
    names = [str(o["path"]) for batch in obstore.list(store) for o in batch]
    return {name: bytes(obstore.get(store, name).bytes()) for name in names}


def multipart_etag(data: bytes, part_size: int) -> str:
    """The ETag S3 gives an object uploaded in parts of `part_size`: md5 of the parts' md5s."""
    parts = [hashlib.md5(data[i : i + part_size]).digest() for i in range(0, len(data), part_size)]
    return f'"{hashlib.md5(b"".join(parts)).hexdigest()}-{len(parts)}"'


@pytest.mark.parametrize("kind", ["mtp", "gpt2_with_tokenizer"])
def test_save_to_s3_then_load_gives_back_every_tensor(
    s3_server: S3Server,
    opts: dict[str, str],
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    original = builders.mtp_model(seed=3) if kind == "mtp" else gpt2(seed=3)
    tokenizer = builders.tiny_tokenizer() if kind != "mtp" else None
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    location = url(s3_server, prefix)
    meta = wmtp.save(original, location, **ROLE, tokenizer=tokenizer, storage_options=opts)
    assert not any(work.iterdir())  # no local folder named "s3:"

    objects = stored(s3_server, prefix)
    files = meta.files or {}
    assert sorted(objects) == sorted([*files, "metadata.json"])
    assert set(files) == {
        *meta.loading_strategy.required_files,
        *meta.loading_strategy.tokenizer_files,
    }
    for name, entry in files.items():  # the manifest is true of the uploaded bytes
        assert entry.size == len(objects[name]), name
        assert entry.sha256 == hashlib.sha256(objects[name]).hexdigest(), name
    assert wmtp.read_metadata(location, storage_options=opts) == meta

    cache = tmp_path / "cache"
    loaded = wmtp.load(location, storage_options=opts, cache_dir=cache, trust_code=True)
    assert_same_state(original, loaded)
    assert type(loaded).__name__ == type(original).__name__
    if tokenizer is not None:
        again = wmtp.load_tokenizer(location, storage_options=opts, cache_dir=cache)
        text = builders.TOKENIZER_TEXT[0]
        assert again(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_large_file_goes_up_in_parallel_parts(
    s3_server: S3Server,
    opts: dict[str, str],
    prefix: str,
    proxy: S3Proxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    part = 16 * 1024
    monkeypatch.setattr(SAVE, "PART_SIZE", part)
    original = gpt2(seed=4)
    location = url(s3_server, prefix)
    before = proxy.connections
    wmtp.save(original, location, **ROLE, storage_options=through(proxy, opts))
    assert proxy.connections - before > 1  # parts in flight at once, each on its connection

    store, data = make_store(s3_server, prefix), stored(s3_server, prefix)
    weights = data["model.safetensors"]
    assert len(weights) > 4 * part
    assert obstore.head(store, "model.safetensors")["e_tag"] == multipart_etag(weights, part)
    assert "-" not in str(obstore.head(store, "config.json")["e_tag"])  # small: one PUT
    loaded = wmtp.load(location, storage_options=opts, cache_dir=tmp_path, verify=True)
    assert_same_state(original, loaded)


@pytest.mark.parametrize(
    ("part", "after_bytes"),
    [(SMALL_PART, AFTER_BYTES), (80 * 1024, 990)],
    ids=["a-part-mid-upload", "a-part-of-the-last-flight"],  # the second: 2 parts, the first cut
)
def test_failed_upload_is_aborted_and_leaves_no_metadata(
    s3_server: S3Server,
    opts: dict[str, str],
    prefix: str,
    proxy: S3Proxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    part: int,
    after_bytes: int,
) -> None:
    monkeypatch.setattr(SAVE, "PART_SIZE", part)
    location = url(s3_server, prefix)
    cut_responses(proxy, after_bytes=after_bytes, times=1)
    with pytest.raises(wmtp.FetchError) as err:
        wmtp.save(gpt2(seed=5), location, **ROLE, storage_options=through(proxy, opts))
    assert str(err.value).startswith(f"{location}/model.safetensors: ")
    assert "?partNumber=" in str(err.value)  # a part failed, once the upload had begun
    assert proxy.cuts_done == 1
    assert pending_uploads(s3_server, prefix) == []  # the parts sent were discarded
    assert "metadata.json" not in stored(s3_server, prefix)
    with pytest.raises(wmtp.ModelFileError, match=r"metadata\.json does not exist"):
        wmtp.load(location, storage_options=opts, cache_dir=tmp_path)


@pytest.mark.parametrize("same_config", [True, False])
def test_failed_save_over_a_model_keeps_its_metadata(
    s3_server: S3Server,
    opts: dict[str, str],
    prefix: str,
    proxy: S3Proxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    same_config: bool,
) -> None:
    location = url(s3_server, prefix)
    first = gpt2(seed=6)
    meta = wmtp.save(first, location, **ROLE, storage_options=opts)
    monkeypatch.setattr(SAVE, "PART_SIZE", SMALL_PART)
    cut_responses(proxy, after_bytes=AFTER_BYTES, times=1)
    second = gpt2(seed=7) if same_config else gpt2(seed=7, n_layer=3)
    with pytest.raises(wmtp.FetchError):
        wmtp.save(second, location, **ROLE, storage_options=through(proxy, opts))
    assert pending_uploads(s3_server, prefix) == []

    assert wmtp.read_metadata(location, storage_options=opts) == meta
    if same_config:  # only model.safetensors differed, and it was never replaced
        assert_same_state(first, wmtp.load(location, storage_options=opts, cache_dir=tmp_path))
    else:  # config.json was replaced: the old manifest refuses it, never a mixed model
        with pytest.raises(wmtp.IntegrityError, match=r"config\.json"):
            wmtp.load(location, storage_options=opts, cache_dir=tmp_path)


def _saver(location: str, options: dict[str, str], tmp: Path) -> subprocess.Popen[bytes]:
    code = (
        "import json, sys\n"
        "import wmtp\n"
        "from tests.test_save_remote import ROLE, SAVE, SMALL_PART, gpt2\n"
        "SAVE.PART_SIZE = SMALL_PART\n"
        "wmtp.save(gpt2(seed=8), sys.argv[1], **ROLE, storage_options=json.loads(sys.argv[2]))\n"
    )
    env = os.environ | {"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}  # its staging folder
    argv = [sys.executable, "-c", code, location, json.dumps(options)]
    return subprocess.Popen(argv, env=env, cwd=ROOT)


def test_killed_save_leaves_no_metadata(
    s3_server: S3Server, opts: dict[str, str], prefix: str, proxy: S3Proxy, tmp_path: Path
) -> None:
    location = url(s3_server, prefix)
    cut_responses(proxy, after_bytes=AFTER_BYTES, times=1000, stall=True)  # every connection
    process = _saver(location, opts | {"endpoint": proxy.endpoint}, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not pending_uploads(s3_server, prefix) and time.monotonic() < deadline:
            assert process.poll() is None, "the save ended before it was stalled"
            time.sleep(0.05)
        assert pending_uploads(s3_server, prefix) == [f"{prefix}/model.safetensors"]
        time.sleep(0.5)  # parts arrive until each connection stalls
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    # config.json went up before, model.safetensors' parts were going up (a killed process
    # cannot abort them: a bucket's lifecycle rule can), and metadata.json never came.
    assert sorted(stored(s3_server, prefix)) == ["config.json"]
    with pytest.raises(wmtp.ModelFileError, match=r"metadata\.json does not exist"):
        wmtp.load(location, storage_options=opts, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    ("bucket", "option", "error"),
    [
        ("no-such-bucket", {}, wmtp.ModelFileError),
        (None, {"secret_access_key": "wrong-secret"}, wmtp.StoreAccessError),
    ],
)
def test_refused_upload_names_the_url(
    s3_server: S3Server,
    opts: dict[str, str],
    bucket: str | None,
    option: dict[str, str],
    error: type[Exception],
) -> None:
    location = f"s3://{bucket or s3_server.bucket}/saved/refused"
    with pytest.raises(error, match=re.escape(f"{location}/config.json")):
        wmtp.save(gpt2(), location, **ROLE, storage_options=opts | option)


def test_file_url_is_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    original = gpt2(seed=9)
    wmtp.save(original, (tmp_path / "out").as_uri(), **ROLE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no folder named "file:"
    assert_same_state(original, wmtp.load(str(tmp_path / "out")))
