"""Smoke tests of the local S3 test server (tests/s3server.py) and the cutting proxy."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import obstore
import pytest
from obstore.exceptions import GenericError, PermissionDeniedError, PreconditionError
from obstore.store import S3Store, from_url

from tests.s3proxy import S3Proxy, cut_responses, start_proxy, stop_proxy
from tests.s3server import (
    S3Server,
    get_bytes_served,
    get_request_count,
    make_store,
    split_storage_options,
    storage_options,
    upload_folder,
)


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[S3Proxy]:
    started = start_proxy(s3_server.endpoint, lifetime=120.0)
    try:
        yield started
    finally:
        stop_proxy(started)


def test_upload_head_get_and_counter(s3_server: S3Server, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    body = os.urandom(300_000)
    (tmp_path / "model.safetensors").write_bytes(body)
    (tmp_path / "sub" / "config.json").write_bytes(b'{"a": 1}')
    upload_folder(s3_server, tmp_path, "smoke/upload")

    s3, client = split_storage_options(storage_options(s3_server))
    # A flat dict[str, str] is not the S3Config/ClientConfig TypedDicts mypy wants.
    url = f"s3://{s3_server.bucket}/smoke/upload"
    store = from_url(url, config=s3, client_options=client)  # type: ignore[call-overload]
    assert sorted(m["path"] for m in obstore.list(store).collect()) == [
        "model.safetensors",
        "sub/config.json",
    ]

    gets = get_request_count(s3_server, "smoke/upload/")
    meta = obstore.head(store, "model.safetensors")
    assert meta["size"] == len(body)
    assert meta["e_tag"] is not None and meta["e_tag"].startswith('"')
    assert get_request_count(s3_server, "smoke/upload/") == gets  # HEAD downloads nothing

    served = get_bytes_served(s3_server, "smoke/upload/")
    assert bytes(obstore.get(store, "model.safetensors").bytes()) == body
    assert get_request_count(s3_server, "smoke/upload/") == gets + 1
    assert get_bytes_served(s3_server, "smoke/upload/") == served + len(body)

    async def ranged(etag: str) -> bytes:
        result = await obstore.get_async(
            store, "model.safetensors", options={"range": (10, 1010), "if_match": etag}
        )
        return bytes(await result.bytes_async())

    assert asyncio.run(ranged(meta["e_tag"])) == body[10:1010]
    assert get_request_count(s3_server, "smoke/upload/") == gets + 2

    obstore.put(store, "model.safetensors", os.urandom(1000))
    assert obstore.head(store, "model.safetensors")["e_tag"] != meta["e_tag"]
    with pytest.raises(PreconditionError):
        asyncio.run(ranged(meta["e_tag"]))


def test_wrong_secret_is_rejected(s3_server: S3Server) -> None:
    obstore.put(make_store(s3_server, "smoke/auth"), "x.bin", b"x")
    bad = S3Store(
        s3_server.bucket,
        prefix="smoke/auth",
        endpoint=s3_server.endpoint,
        region="us-east-1",
        access_key_id=s3_server.access_key,
        secret_access_key="not-the-secret",
        client_options={"allow_http": True},
        retry_config={"max_retries": 0},
    )
    with pytest.raises(PermissionDeniedError, match="403"):
        obstore.get(bad, "x.bin")
    with pytest.raises(FileNotFoundError):
        obstore.head(make_store(s3_server, "smoke/auth"), "missing.bin")


def test_proxy_cuts_a_download(s3_server: S3Server, proxy: S3Proxy) -> None:
    body = os.urandom(4_000_000)
    obstore.put(make_store(s3_server, "smoke/cut"), "big.bin", body)

    def via_proxy(max_retries: int) -> S3Store:
        return S3Store(
            s3_server.bucket,
            prefix="smoke/cut",
            endpoint=proxy.endpoint,
            region="us-east-1",
            access_key_id=s3_server.access_key,
            secret_access_key=s3_server.secret_key,
            client_options={"allow_http": True},
            retry_config={"max_retries": max_retries},
        )

    assert bytes(obstore.get(via_proxy(0), "big.bin").bytes()) == body

    cut_responses(proxy, after_bytes=1_000_000)
    with pytest.raises(GenericError, match="body"):
        obstore.get(via_proxy(0), "big.bin").bytes()
    assert proxy.cuts_done == 1

    # With retries, obstore resumes the cut body with a ranged GET and still gets it all.
    gets = get_request_count(s3_server, "smoke/cut/")
    cut_responses(proxy, after_bytes=1_000_000)
    assert bytes(obstore.get(via_proxy(3), "big.bin").bytes()) == body
    assert proxy.cuts_done == 2
    assert get_request_count(s3_server, "smoke/cut/") == gets + 2
