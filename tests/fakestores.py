"""Stand-ins for Google Cloud Storage and Azure Blob Storage on 127.0.0.1, for tests.

No emulator of either installs from PyPI here in a form obstore can talk to (the GCS
emulators there answer neither HEAD nor the XML listing obstore uses), so these answer as the
services do, for the requests obstore sends:

* `FakeGCS`: GCS's XML API, in memory. HEAD, ranged GET (`?generation=` honoured; If-Match
  ignored, as GCS emulators do), the `list-type=2` listing, PUT with
  `x-goog-if-generation-match`; a bearer token checked; XML errors as GCS writes them
  (`NoSuchBucket`, `NoSuchKey`, `AccessDenied`, `PreconditionFailed`).
* `Canned`: one answer (status, body) to every request: the services' error bodies (Azure's
  `ContainerNotFound`, GCS JSON API errors...) without a server behind them.

Both listen on 127.0.0.1 only, on a free port, in a daemon thread: `with FakeGCS() as gcs:`.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable, Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

XML_ERROR = (
    "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{}</Code><Message>{}</Message></Error>"
)
# GCS's own words for each error this stand-in gives.
NO_SUCH_BUCKET = (404, "NoSuchBucket", "The specified bucket does not exist.")
NO_SUCH_KEY = (404, "NoSuchKey", "The specified key does not exist.")
ACCESS_DENIED = (403, "AccessDenied", "Access denied.")
PRECONDITION = (
    412,
    "PreconditionFailed",
    "At least one of the pre-conditions you specified did not hold.",
)


class _Server:
    """A threaded HTTP server on 127.0.0.1 whose handler calls `self.answer`."""

    def __init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, data = owner.answer(self.command, self.path, self.headers, body)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.http.server_port}"
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, headers
        self._thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self._thread.start()

    def answer(
        self, method: str, path: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Canned(_Server):
    """Answers every request with `status` and `body` (a HEAD: no body, as servers do)."""

    def __init__(self, status: int, body: str, content_type: str = "application/xml") -> None:
        self.status, self.body, self.content_type = status, body.encode(), content_type
        super().__init__()

    def answer(
        self, method: str, path: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        self.requests.append((method, path, dict(headers)))
        return self.status, {"Content-Type": self.content_type}, self.body


class Blob:
    """One object: its bytes and generation."""

    def __init__(self, data: bytes, generation: int) -> None:
        self.data, self.generation = data, generation
        self.etag = f'"{hashlib.md5(data).hexdigest()}"'
        self.modified = formatdate(usegmt=True)


class FakeGCS(_Server):
    """GCS's XML API in memory (see the module's docstring); `on_request(method, key)` runs
    before a request for an object is answered (to replace it mid-download, say)."""

    def __init__(
        self, buckets: tuple[str, ...] = ("wmtp-test",), token: str = "fake-token"
    ) -> None:
        self.buckets: dict[str, dict[str, Blob]] = {b: {} for b in buckets}
        self.token = token
        self.on_request: Callable[[str, str], None] | None = None
        self._generations = itertools.count(1_700_000_000_000_001)
        self._lock = threading.Lock()
        super().__init__()

    def options(self, **more: str) -> dict[str, str]:
        """wmtp storage options for this server (a static token: no credential lookups)."""
        return {"base_url": self.endpoint, "bearer_token": self.token, "allow_http": "true"} | more

    def put(self, bucket: str, key: str, data: bytes) -> Blob:
        """Store `data` at `key` as a new generation (a replaced object gets a new one)."""
        with self._lock:
            blob = self.buckets[bucket][key] = Blob(data, next(self._generations))
        return blob

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.put(
                    bucket, f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes()
                )

    def gets(self, key: str) -> list[dict[str, list[str]]]:
        """The query of every GET of `key` so far."""
        return [
            parse_qs(urlsplit(p).query)
            for m, p, _ in self.requests
            if m == "GET" and unquote(urlsplit(p).path).endswith("/" + key)
        ]

    def answer(
        self, method: str, path: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        self.requests.append((method, path, dict(headers)))
        url = urlsplit(path)
        bucket, _, key = url.path.lstrip("/").partition("/")
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if headers.get("Authorization") != f"Bearer {self.token}":
            return _error(*ACCESS_DENIED)
        if (objects := self.buckets.get(unquote(bucket))) is None:
            return _error(*NO_SUCH_BUCKET)
        key = unquote(key)
        if method == "GET" and not key:
            return self._list(unquote(bucket), objects, query)
        if self.on_request is not None:
            self.on_request(method, key)
        if method == "PUT":
            return self._put(unquote(bucket), key, headers, body)
        blob = objects.get(key)
        if blob is None or query.get("generation", str(blob.generation)) != str(blob.generation):
            return _error(*NO_SUCH_KEY)
        meta = {
            "ETag": blob.etag,
            "Last-Modified": blob.modified,
            "x-goog-generation": str(blob.generation),
            "x-goog-metageneration": "1",
            "Content-Type": "application/octet-stream",
        }
        if method == "HEAD":
            return 200, meta | {"Content-Length": str(len(blob.data))}, b""
        if (ranged := headers.get("Range")) is None:
            return 200, meta, blob.data
        start, _, end = ranged.removeprefix("bytes=").partition("-")
        first, last = int(start), min(int(end or len(blob.data) - 1), len(blob.data) - 1)
        content_range = f"bytes {first}-{last}/{len(blob.data)}"
        return 206, meta | {"Content-Range": content_range}, blob.data[first : last + 1]

    def _put(
        self, bucket: str, key: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        match = headers.get("x-goog-if-generation-match")
        with self._lock:
            current = self.buckets[bucket].get(key)
            if match is not None and match != str(current.generation if current else 0):
                return _error(*PRECONDITION)
            blob = self.buckets[bucket][key] = Blob(body, next(self._generations))
        return 200, {"ETag": blob.etag, "x-goog-generation": str(blob.generation)}, b""

    def _list(
        self, bucket: str, objects: dict[str, Blob], query: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        keys, prefixes = [], set()
        for key in sorted(objects):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter)[0] + delimiter)
            else:
                keys.append(key)

        def contents() -> Iterator[str]:
            for key in keys:
                blob = objects[key]
                yield (
                    f"<Contents><Key>{escape(key)}</Key><Generation>{blob.generation}</Generation>"
                    f"<LastModified>2026-01-01T00:00:00.000Z</LastModified>"
                    f"<ETag>{escape(blob.etag)}</ETag><Size>{len(blob.data)}</Size></Contents>"
                )
            for common in sorted(prefixes):
                yield f"<CommonPrefixes><Prefix>{escape(common)}</Prefix></CommonPrefixes>"

        xml = (
            "<?xml version='1.0' encoding='UTF-8'?><ListBucketResult "
            "xmlns='http://doc.s3.amazonaws.com/2006-03-01'>"
            f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
            f"<KeyCount>{len(keys) + len(prefixes)}</KeyCount><MaxKeys>1000</MaxKeys>"
            f"<IsTruncated>false</IsTruncated>{''.join(contents())}</ListBucketResult>"
        )
        return 200, {"Content-Type": "application/xml"}, xml.encode()


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/xml"}, XML_ERROR.format(code, message).encode()
