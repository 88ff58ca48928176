"""The metadata's manifest (`files`: size and sha256 per file) is enforced by `load`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import obstore
import pytest

import wmtp
from tests import builders
from tests.conftest import Copy
from tests.s3server import S3Server, make_store, storage_options, upload_folder
from tests.test_load import assert_equals_file, file_tensors


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached(cache: Path, name: str) -> list[Path]:
    """Files called `name` anywhere in the cache, and partial downloads of any file."""
    return [p for p in cache.rglob("*") if p.is_file() and (p.name == name or ".part" in p.name)]


def test_integrity_error_is_a_value_error() -> None:
    assert wmtp.IntegrityError is wmtp.errors.IntegrityError
    assert issubclass(wmtp.IntegrityError, wmtp.WmtpError)
    assert issubclass(wmtp.IntegrityError, ValueError)
    assert isinstance(wmtp.IntegrityError("x"), ValueError)


def test_size_mismatch_names_file_json_path_and_both_sizes(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["mtp"])
    actual = (folder / "model.safetensors").stat().st_size
    builders.set_manifest(folder, "model.safetensors", size=actual - 1)
    with pytest.raises(wmtp.IntegrityError) as err:
        wmtp.load(str(folder))
    assert str(err.value) == (
        f"{folder}/model.safetensors has {actual} bytes, but metadata.json's manifest "
        f"(`$.files['model.safetensors'].size`) says {actual - 1}; "
        "the file or the manifest is stale"
    )
    with pytest.raises(ValueError, match=r"\$\.files\['model\.safetensors'\]\.size"):
        wmtp.load(str(folder), verify=True)


def test_size_of_a_changed_small_file_is_checked(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reference"])
    config = folder / "config.json"
    before = config.stat().st_size
    config.write_text(config.read_text() + "\n")
    with pytest.raises(wmtp.IntegrityError) as err:
        wmtp.load(str(folder))
    message = str(err.value)
    assert message.startswith(f"{config} has {before + 1} bytes")
    assert f"(`$.files['config.json'].size`) says {before};" in message


def test_sha256_mismatch_is_caught_only_with_verify(models: dict[str, Path], copy: Copy) -> None:
    folder = copy(models["gpt2_reward"])
    wrong = "0123456789abcdef" * 4
    builders.set_manifest(folder, "model.safetensors", sha256=wrong)
    model = wmtp.load(str(folder))  # sizes agree; local files are hashed only on request
    assert_equals_file(model, file_tensors(folder))
    with pytest.raises(wmtp.IntegrityError) as err:
        wmtp.load(str(folder), verify=True)
    assert str(err.value) == (
        f"{folder}/model.safetensors has sha256 {sha256(folder / 'model.safetensors')}, but "
        f"metadata.json's manifest (`$.files['model.safetensors'].sha256`) says {wrong}; "
        "the file is corrupt or the manifest is stale (nothing was cached)"
    )


def test_corrupt_bytes_of_the_same_size_are_caught_with_verify(
    models: dict[str, Path], copy: Copy
) -> None:
    folder = copy(models["mtp"])
    weights = folder / "model.safetensors"
    expected = sha256(weights)
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte in the last tensor
    weights.write_bytes(bytes(raw))
    with pytest.raises(wmtp.IntegrityError) as err:
        wmtp.load(str(folder), verify=True)
    assert f"{weights} has sha256 {sha256(weights)}" in str(err.value)
    assert f"(`$.files['model.safetensors'].sha256`) says {expected};" in str(err.value)


def test_good_manifest_verifies(models: dict[str, Path]) -> None:
    for folder in models.values():
        model = wmtp.load(str(folder), verify=True)
        assert_equals_file(model, file_tensors(folder))


def test_remote_wrong_sha256_fails_and_caches_nothing(
    models: dict[str, Path], s3_server: S3Server, tmp_path: Path
) -> None:
    source = models["gpt2_reference"]
    prefix = f"integrity/{tmp_path.name}"
    upload_folder(s3_server, source, prefix)
    url = f"s3://{s3_server.bucket}/{prefix}"
    opts = storage_options(s3_server)
    wrong = "f" * 64
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.json").write_bytes((source / "metadata.json").read_bytes())
    builders.set_manifest(bad, "model.safetensors", sha256=wrong)
    store = make_store(s3_server, prefix)
    obstore.put(store, "metadata.json", bad / "metadata.json")

    cache = tmp_path / "cache"
    with pytest.raises(wmtp.IntegrityError) as err:
        wmtp.load(url, storage_options=opts, cache_dir=cache)
    assert str(err.value) == (
        f"{url}/model.safetensors has sha256 {sha256(source / 'model.safetensors')}, but "
        f"metadata.json's manifest (`$.files['model.safetensors'].sha256`) says {wrong}; "
        "the file is corrupt or the manifest is stale (nothing was cached)"
    )
    assert cached(cache, "model.safetensors") == []

    # The right manifest again: the same cache serves a load, bit for bit.
    obstore.put(store, "metadata.json", source / "metadata.json")
    model = wmtp.load(url, storage_options=opts, cache_dir=cache)
    assert_equals_file(model, file_tensors(source))
    (stored,) = cached(cache, "model.safetensors")
    assert stored.read_bytes() == (source / "model.safetensors").read_bytes()


def test_remote_size_mismatch_downloads_nothing(
    models: dict[str, Path], s3_server: S3Server, tmp_path: Path
) -> None:
    source = models["mtp"]
    prefix = f"integrity/{tmp_path.name}"
    folder = tmp_path / "upload"
    folder.mkdir()
    for name in ("config.json", "modeling.py", "model.safetensors", "metadata.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    actual = (folder / "model.safetensors").stat().st_size
    builders.set_manifest(folder, "model.safetensors", size=actual * 2)
    upload_folder(s3_server, folder, prefix)
    url = f"s3://{s3_server.bucket}/{prefix}"
    cache = tmp_path / "cache"
    with pytest.raises(wmtp.IntegrityError) as err:
        wmtp.load(url, storage_options=storage_options(s3_server), cache_dir=cache, trust_code=True)
    assert str(err.value) == (
        f"{url}/model.safetensors has {actual} bytes, but metadata.json's manifest "
        f"(`$.files['model.safetensors'].size`) says {actual * 2}; "
        "the file or the manifest is stale"
    )
    assert not cache.exists() or cached(cache, "model.safetensors") == []
