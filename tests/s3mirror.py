"""A hostile S3 "mirror" on 127.0.0.1: it serves the bytes it is given under the ETags it is
given (say, another server's), with any credentials, for the cache-poisoning tests.

    mirror = start_mirror({"bucket/models/mtp/model.safetensors": (data, '"etag"')})
    ...  # storage_options={"endpoint_url": mirror.endpoint, ...}
    mirror.shutdown()

Path-style requests only (`virtual_hosted_style_request: false`): HEAD and GET, whole or
one `Range: bytes=a-b`, with `If-Match` honoured (412 when it differs).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

LAST_MODIFIED = "Tue, 01 Dec 2026 00:00:00 GMT"


class Mirror(ThreadingHTTPServer):
    """The server; `objects` maps `bucket/key` to (bytes, ETag as sent, quotes and all)."""

    daemon_threads = True
    objects: Mapping[str, tuple[bytes, str]] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Mirror

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _object(self) -> tuple[bytes, str] | None:
        found = self.server.objects.get(unquote(urlsplit(self.path).path).lstrip("/"))
        if found is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        return found

    def _answer(self, body: bool) -> None:
        if (found := self._object()) is None:
            return
        data, etag = found
        if (wanted := self.headers.get("If-Match")) and wanted != etag:
            self.send_response(412)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, len(data)
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if ranged and body:
            start, end = int(ranged[1]), min(int(ranged[2] or len(data) - 1) + 1, len(data))
        self.send_response(206 if ranged and body else 200)
        if ranged and body:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", LAST_MODIFIED)
        self.end_headers()
        if body:
            self.wfile.write(data[start:end])

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)


def start_mirror(objects: Mapping[str, tuple[bytes, str]]) -> Mirror:
    """Serve `objects` on a free loopback port, in a daemon thread, until `shutdown()`."""
    server = Mirror(("127.0.0.1", 0), _Handler)
    server.objects = objects
    threading.Thread(target=server.serve_forever, daemon=True, name="s3-mirror").start()
    return server
