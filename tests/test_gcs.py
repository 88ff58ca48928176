"""gs:// locations against a GCS stand-in on 127.0.0.1 (`tests/fakestores.py`): loads whose
ranged GETs are pinned to the generation HEAD saw (a GCS emulator ignores If-Match), and
`migrate --write`, whose conditional put GCS takes only on the generation."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import obstore
import pytest
from obstore.store import from_url

import wmtp
from tests import builders
from tests.fakestores import FakeGCS
from tests.test_load import assert_equals_file, file_tensors
from tests.test_migrate import NO_STRATEGY
from wmtp import remote
from wmtp.cli import main
from wmtp.migrate import migrate, write_migration

BUCKET = "wmtp-test"
PART = 64 * 1024


@pytest.fixture
def gcs() -> Iterator[FakeGCS]:
    with FakeGCS((BUCKET,)) as server:
        yield server


def test_parts_are_pinned_to_the_generation_head_saw(
    models: dict[str, Path], gcs: FakeGCS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "PART_SIZE", PART)
    source = models["gpt2_reference"]
    gcs.upload_folder(source, BUCKET, "ref")
    blob = gcs.buckets[BUCKET]["ref/model.safetensors"]
    model = wmtp.load(f"gs://{BUCKET}/ref", storage_options=gcs.options(), cache_dir=tmp_path)
    assert_equals_file(model, file_tensors(source))
    gets = gcs.gets("ref/model.safetensors")
    assert len(gets) == -(-len(blob.data) // PART) > 1
    assert all(query == {"generation": [str(blob.generation)]} for query in gets)


def test_object_replaced_mid_download_fails_then_loads_whole(
    models: dict[str, Path], gcs: FakeGCS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "PART_SIZE", PART)
    source = models["gpt2_reference"]
    new = shutil.copytree(source, tmp_path / "new")
    changed = {k: v + 1 for k, v in file_tensors(new).items()}
    builders.write_checkpoint(new, changed)  # the same size, new bytes, the manifest to match
    gcs.upload_folder(source, BUCKET, "ref")
    old = gcs.buckets[BUCKET]["ref/model.safetensors"]
    replaced: list[str] = []

    def replace(method: str, key: str) -> None:  # a save lands while the first part is asked
        if method == "GET" and key == "ref/model.safetensors" and not replaced:
            replaced.append(key)
            for name in ("model.safetensors", "metadata.json"):
                gcs.put(BUCKET, f"ref/{name}", (new / name).read_bytes())

    gcs.on_request = replace
    url, cache = f"gs://{BUCKET}/ref", tmp_path / "cache"
    with pytest.raises(wmtp.FetchError) as err:
        wmtp.load(url, storage_options=gcs.options(), cache_dir=cache)
    assert str(err.value) == (
        f"{url}/model.safetensors changed since it was first read (NoSuchKey: The specified key "
        "does not exist.); run again"
    )
    assert {q["generation"][0] for q in gcs.gets("ref/model.safetensors")} == {str(old.generation)}
    assert not [*cache.rglob("model.safetensors"), *cache.rglob("*.part")]  # nothing kept
    model = wmtp.load(url, storage_options=gcs.options(), cache_dir=cache)  # the new one, whole
    assert_equals_file(model, changed)


@pytest.mark.parametrize(
    ("url", "config", "pins"),
    [
        ("gs://b/m", {"bearer_token": "t"}, {"if_match": '"e"', "version": "7"}),
        (
            "az://c/m",
            {"account_name": "a", "account_key": "Zm9v"},
            {"if_match": '"e"', "version": "7"},
        ),
        # S3: If-Match pins it; a versionId would need s3:GetObjectVersion rights.
        ("s3://b/m", {"region": "us-east-1"}, {"if_match": '"e"'}),
    ],
)
def test_ranged_gets_pin_the_version_where_head_gave_one(
    url: str,
    config: dict[str, str],
    pins: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[dict[str, Any]] = []

    class Response:
        def stream(self, min_chunk_size: int) -> Iterator[bytes]:
            yield b"abc"

    def get(store: Any, name: str, *, options: dict[str, Any]) -> Response:
        seen.append(options)
        return Response()

    monkeypatch.setattr(obstore, "get", get)  # nothing is sent anywhere
    store = from_url(url, config=config)  # type: ignore[call-overload]
    with ThreadPoolExecutor(1) as parts:
        fetch = remote._getter(store, url, {}, parts, lambda n: None)
        fetch("f", {"size": 3, "e_tag": '"e"', "version": "7"}, tmp_path / "f")
        fetch("g", {"size": 3, "e_tag": '"e"', "version": None}, tmp_path / "g")
    assert seen == [{"range": (0, 3), **pins}, {"range": (0, 3), "if_match": '"e"'}]
    assert (tmp_path / "f").read_bytes() == b"abc"


def old_model(models: dict[str, Path], gcs: FakeGCS, tmp_path: Path) -> str:
    folder = shutil.copytree(models["gpt2_reward"], tmp_path / "src")
    shutil.copy(NO_STRATEGY / "tiny-reward-model" / "metadata.json", folder / "metadata.json")
    gcs.upload_folder(folder, BUCKET, "migrate/rm")
    return f"gs://{BUCKET}/migrate/rm"


def test_cli_migrate_writes_back_to_gcs(
    models: dict[str, Path], gcs: FakeGCS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = old_model(models, gcs, tmp_path)
    old = (NO_STRATEGY / "tiny-reward-model" / "metadata.json").read_bytes()
    options = [f"-o{key}={value}" for key, value in gcs.options().items()]
    assert main(["migrate", url, "--algorithm", "critic-wmtp", "--write", *options]) == 0
    out = capsys.readouterr().out
    backup = out.rsplit("written (old file kept at ", 1)[1].removesuffix(")\n")
    assert backup.startswith(f"{url}/metadata.json.") and backup.endswith(".bak")
    objects = gcs.buckets[BUCKET]
    assert objects[backup.removeprefix(f"gs://{BUCKET}/")].data == old
    written = objects["migrate/rm/metadata.json"].data
    assert b'"loader_type": "huggingface"' in written
    model = wmtp.load(url, storage_options=gcs.options(), cache_dir=tmp_path / "cache")
    assert_equals_file(model, file_tensors(tmp_path / "src"))


def test_migrate_write_on_gcs_refuses_a_change_meanwhile(
    models: dict[str, Path], gcs: FakeGCS, tmp_path: Path
) -> None:
    url = old_model(models, gcs, tmp_path)
    migration = migrate(url, algorithms=["critic-wmtp"], storage_options=gcs.options())
    edited = b'{"edited": "by someone else, after write_migration read it"}'

    def meddle(method: str, key: str) -> None:  # between the read and the conditional put
        if method == "PUT" and key.endswith(".bak"):
            gcs.put(BUCKET, "migrate/rm/metadata.json", edited)

    gcs.on_request = meddle
    with pytest.raises(wmtp.FetchError) as err:
        write_migration(migration, storage_options=gcs.options())
    assert str(err.value) == (
        f"{url}/metadata.json changed since it was first read (PreconditionFailed: At least one "
        "of the pre-conditions you specified did not hold.); run again"
    )
    assert gcs.buckets[BUCKET]["migrate/rm/metadata.json"].data == edited
