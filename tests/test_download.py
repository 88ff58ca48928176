"""What the download cache must never keep, and how it makes what it keeps durable, against the
S3 server on 127.0.0.1: an object replaced between HEAD and its parts, a server that sends a
part short, and the order of writes, fsyncs and the rename. The model's manifest lists no hash
for the weights here, so only the download's own checks can refuse a wrong file."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import obstore
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import wmtp
from tests.s3proxy import start_short_proxy, stop_short_proxy
from tests.s3server import S3Server, make_store, storage_options, upload_folder
from tests.test_load import assert_equals_file, file_tensors
from wmtp import remote

WEIGHTS = "model.safetensors"


def unlisted(folder: Path) -> Path:
    """`folder` with the weights dropped from its metadata's manifest (no size, no hash)."""
    path = folder / "metadata.json"
    data = json.loads(path.read_text())
    del data["files"][WEIGHTS]
    path.write_text(json.dumps(data, indent=2))
    return folder


def cached(cache: Path) -> list[Path]:
    """The weights anywhere in the cache, and partial downloads of any file."""
    return [p for p in cache.rglob("*") if p.is_file() and (p.name == WEIGHTS or ".part" in p.name)]


@pytest.fixture
def uploaded(models: dict[str, Path], s3_server: S3Server, tmp_path: Path) -> tuple[str, Path]:
    """The GPT-2 reference model, its weights unlisted, at a fresh URL; and its local folder."""
    folder = unlisted(shutil.copytree(models["gpt2_reference"], tmp_path / "source"))
    upload_folder(s3_server, folder, prefix(tmp_path))
    return f"s3://{s3_server.bucket}/{prefix(tmp_path)}", folder


def prefix(tmp_path: Path) -> str:
    """The key prefix of a test's model in the bucket."""
    return f"download/{tmp_path.name}"


def test_an_object_replaced_between_its_parts_fails_and_caches_nothing(
    uploaded: tuple[str, Path],
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The object is replaced, same size and header, once the first part's GET has begun and
    before any other: every later part would come from the new version. Parts pinned to the
    version HEAD saw are refused; unpinned, they would make a file of both versions."""
    url, folder = uploaded
    newer = {key: tensor + 1 for key, tensor in file_tensors(folder).items()}
    replacement = tmp_path / "newer.safetensors"
    with safe_open(folder / WEIGHTS, "pt") as f:  # the same header: the same size
        save_file(newer, replacement, metadata=f.metadata())
    assert replacement.stat().st_size == (folder / WEIGHTS).stat().st_size
    monkeypatch.setattr(remote, "PART_SIZE", 4096)
    assert (folder / WEIGHTS).stat().st_size > 8 * 4096  # parts after the replacement
    get, lock, gets = obstore.get, threading.Lock(), list[str]()

    def racing(store: Any, path: str, **kwargs: Any) -> Any:
        with lock:  # the other parts wait while the first begins and the object is replaced
            gets.append(path)
            result = get(store, path, **kwargs)
            if path == WEIGHTS and gets.count(WEIGHTS) == 1:
                obstore.put(make_store(s3_server, prefix(tmp_path)), WEIGHTS, replacement)
        return result

    monkeypatch.setattr(obstore, "get", racing)
    cache = tmp_path / "cache"
    with pytest.raises(wmtp.FetchError) as err:
        wmtp.load(url, storage_options=storage_options(s3_server), cache_dir=cache)
    assert str(err.value).startswith(f"{url}/{WEIGHTS}")
    assert gets.count(WEIGHTS) > 1  # a part was asked for after the replacement
    assert cached(cache) == []
    monkeypatch.setattr(obstore, "get", get)
    model = wmtp.load(url, storage_options=storage_options(s3_server), cache_dir=cache)
    assert_equals_file(model, newer)  # the next load takes the new version, whole


def test_a_part_the_server_sends_short_fails_and_caches_nothing(
    uploaded: tuple[str, Path], s3_server: S3Server, tmp_path: Path
) -> None:
    """A well-formed answer with fewer bytes than the range (the HTTP client sees no error):
    the part is refused, the file never renamed into the cache."""
    url, folder = uploaded
    size, cache = (folder / WEIGHTS).stat().st_size, tmp_path / "cache"
    proxy = start_short_proxy(s3_server.endpoint, suffix=f"/{WEIGHTS}", keep=1000)
    try:
        short = storage_options(s3_server) | {"endpoint": proxy.endpoint, "max_retries": "0"}
        with pytest.raises(wmtp.FetchError) as err:
            wmtp.load(url, storage_options=short, cache_dir=cache)
        assert proxy.shortened == 1
    finally:
        stop_short_proxy(proxy)
    message = str(err.value)
    assert message.startswith(f"{url}/{WEIGHTS}") and "1000" in message and str(size) in message
    assert cached(cache) == []
    model = wmtp.load(url, storage_options=storage_options(s3_server), cache_dir=cache)
    assert_equals_file(model, file_tensors(folder))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds by /proc")
def test_a_download_is_fsynced_before_its_rename_and_its_folder_after(
    uploaded: tuple[str, Path],
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash at any moment leaves the cache without the file or with all of it: its bytes
    reach the disk before the rename makes it complete, and the rename itself after."""
    url, folder = uploaded
    events: list[tuple[str, str]] = []
    pwrite, fsync, replace = os.pwrite, os.fsync, os.replace

    def named(fd: int) -> str:
        return str(Path(f"/proc/self/fd/{fd}").readlink())

    def wrote(fd: int, data: Any, offset: int) -> int:
        events.append(("write", named(fd)))
        return pwrite(fd, data, offset)

    def synced(fd: int) -> None:
        events.append(("fsync", named(fd)))
        fsync(fd)

    def renamed(src: Any, dst: Any, **kwargs: Any) -> None:
        events.append(("rename", f"{os.path.realpath(src)} -> {os.path.realpath(dst)}"))
        replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "pwrite", wrote)
    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", renamed)
    model = wmtp.load(url, storage_options=storage_options(s3_server), cache_dir=tmp_path / "c")
    monkeypatch.undo()
    assert_equals_file(model, file_tensors(folder))
    (dest,) = (p.resolve() for p in (tmp_path / "c").rglob(WEIGHTS))
    ((at, rename),) = [(i, e[1]) for i, e in enumerate(events) if e[1].endswith(f"-> {dest}")]
    part = rename.partition(" -> ")[0]
    assert Path(part).parent == dest.parent and ".part" in Path(part).name
    writes = [i for i, e in enumerate(events) if e == ("write", part)]
    synced_at = [i for i, e in enumerate(events) if e == ("fsync", part)]
    assert writes and synced_at, events
    assert max(writes) < min(synced_at) < at  # every part written, then fsynced, then renamed
    assert ("fsync", str(dest.parent)) in events[at + 1 :]  # the rename made durable
