"""A tiny loopback TCP proxy that can cut or stall responses, for interrupted-download tests.

Point obstore at ``proxy.endpoint`` instead of the gateway's endpoint (SigV4 signs the Host
header the client sends, and the proxy forwards bytes unchanged, so signatures still match).
Then::

    cut_responses(proxy, after_bytes=1 << 20, times=1)  # next response >1 MiB is cut
    ...  # the download under test sees the connection reset mid-body

The proxy listens on 127.0.0.1 only, forwards to a 127.0.0.1 target, and stops by itself after
``lifetime`` seconds even if :func:`stop_proxy` is never called. Byte counts are per connection
and include HTTP response headers; arm with a threshold well inside the body.

A cut is a transport error the HTTP client sees. :func:`start_short_proxy` is the other kind of
bad server: one that answers a ranged GET with a well-formed response holding fewer bytes than
the range (a chunked body, ended properly, under the ``Content-Length`` of the whole range),
which the client takes as a complete, shorter body::

    short = start_short_proxy(server.endpoint, suffix="/model.safetensors", keep=1000)
    ...  # every ranged GET of a key ending in model.safetensors gets its first 1000 bytes
    stop_short_proxy(short)
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import select
import socket
import struct
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec

__all__ = [
    "S3Proxy",
    "ShortProxy",
    "cut_responses",
    "disarm",
    "start_proxy",
    "start_short_proxy",
    "stop_proxy",
    "stop_short_proxy",
]

_CHUNK = 64 * 1024
_TICK_S = 0.25


class S3Proxy(msgspec.Struct):
    """State of a running proxy; counters are updated under ``lock``."""

    endpoint: str
    port: int
    target_host: str
    target_port: int
    listener: socket.socket
    stop_event: threading.Event
    lock: threading.Lock
    threads: list[threading.Thread]
    deadline: float
    # Arming: the next ``cuts_left`` connections whose response bytes since arming exceed
    # ``after_bytes`` are cut (RST) or stalled (no more bytes forwarded).
    arm_generation: int = 0
    after_bytes: int = 0
    cuts_left: int = 0
    stall: bool = False
    # Statistics.
    connections: int = 0
    cuts_done: int = 0
    bytes_to_client: int = 0


def start_proxy(target_endpoint: str, *, lifetime: float = 600.0) -> S3Proxy:
    """Start forwarding ``http://127.0.0.1:<free port>`` to ``target_endpoint`` (loopback)."""
    parts = urlsplit(target_endpoint)
    host = parts.hostname or ""
    if host not in ("127.0.0.1", "localhost") or parts.port is None:
        raise ValueError(f"proxy target must be http://127.0.0.1:PORT, got {target_endpoint!r}")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(_TICK_S)
    port: int = listener.getsockname()[1]
    proxy = S3Proxy(
        endpoint=f"http://127.0.0.1:{port}",
        port=port,
        target_host="127.0.0.1",
        target_port=parts.port,
        listener=listener,
        stop_event=threading.Event(),
        lock=threading.Lock(),
        threads=[],
        deadline=time.monotonic() + lifetime,
    )
    acceptor = threading.Thread(target=_accept_loop, args=(proxy,), daemon=True, name="s3proxy")
    proxy.threads.append(acceptor)
    acceptor.start()
    return proxy


def cut_responses(proxy: S3Proxy, after_bytes: int, times: int = 1, *, stall: bool = False) -> None:
    """Arm the proxy: the next ``times`` connections that send more than ``after_bytes``
    response bytes (counted from now) get exactly ``after_bytes`` and are then reset, or, with
    ``stall=True``, get nothing more until the client gives up or the proxy stops.
    """
    with proxy.lock:
        proxy.arm_generation += 1
        proxy.after_bytes = after_bytes
        proxy.cuts_left = times
        proxy.stall = stall


def disarm(proxy: S3Proxy) -> None:
    """Forward everything again (stalled connections stay stalled)."""
    with proxy.lock:
        proxy.arm_generation += 1
        proxy.cuts_left = 0


def stop_proxy(proxy: S3Proxy, timeout: float = 5.0) -> None:
    """Stop accepting, close every connection and wait for the threads."""
    proxy.stop_event.set()
    with contextlib.suppress(OSError):
        proxy.listener.close()
    end = time.monotonic() + timeout
    with proxy.lock:
        threads = list(proxy.threads)
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))


def _running(proxy: S3Proxy) -> bool:
    return not proxy.stop_event.is_set() and time.monotonic() < proxy.deadline


def _accept_loop(proxy: S3Proxy) -> None:
    try:
        while _running(proxy):
            try:
                client, _ = proxy.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            thread = threading.Thread(
                target=_serve, args=(proxy, client), daemon=True, name="s3proxy-conn"
            )
            with proxy.lock:
                proxy.connections += 1
                proxy.threads = [t for t in proxy.threads if t.is_alive()]
                proxy.threads.append(thread)
            thread.start()
    finally:
        with contextlib.suppress(OSError):
            proxy.listener.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _serve(proxy: S3Proxy, client: socket.socket) -> None:
    try:
        upstream = socket.create_connection((proxy.target_host, proxy.target_port), timeout=5)
    except OSError:
        _reset(client)
        return
    seen_generation = -1
    sent_since_arm = 0
    stalled = False
    try:
        while _running(proxy):
            watch = [client] if stalled else [client, upstream]
            readable, _, _ = select.select(watch, [], [], _TICK_S)
            for sock in readable:
                data = sock.recv(_CHUNK)
                if not data:
                    return
                if sock is client:
                    if not stalled:
                        upstream.sendall(data)
                    continue
                with proxy.lock:
                    if proxy.arm_generation != seen_generation:
                        seen_generation = proxy.arm_generation
                        sent_since_arm = 0
                    limit = proxy.after_bytes if proxy.cuts_left > 0 else None
                    trip = limit is not None and sent_since_arm + len(data) > limit
                    if trip and limit is not None:
                        data = data[: max(0, limit - sent_since_arm)]
                        proxy.cuts_left -= 1
                        proxy.cuts_done += 1
                    proxy.bytes_to_client += len(data)
                    stall = proxy.stall
                if data:
                    client.sendall(data)
                sent_since_arm += len(data)
                if trip:
                    if not stall:
                        _reset(client)
                        return
                    stalled = True
                    break
    except OSError:
        return
    finally:
        with contextlib.suppress(OSError):
            upstream.close()
        with contextlib.suppress(OSError):
            client.close()


class ShortProxy(msgspec.Struct):
    """A running :func:`start_short_proxy`; ``shortened`` counts the responses cut short."""

    endpoint: str
    server: Any  # http.server.ThreadingHTTPServer
    thread: threading.Thread
    shortened: int = 0


def start_short_proxy(target_endpoint: str, *, suffix: str, keep: int) -> ShortProxy:
    """Forward GET and HEAD requests to ``target_endpoint`` (loopback), unchanged (so SigV4
    signatures hold); a 206 answer for a path ending in ``suffix`` goes back with only its
    first ``keep`` bytes, as a chunked body properly ended, its ``Content-Length`` unchanged."""
    parts = urlsplit(target_endpoint)
    if parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
        raise ValueError(f"proxy target must be http://127.0.0.1:PORT, got {target_endpoint!r}")
    target = ("127.0.0.1", parts.port)
    lock = threading.Lock()

    class Forward(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            upstream = http.client.HTTPConnection(*target, timeout=30)
            try:
                upstream.request(self.command, self.path, body, dict(self.headers.items()))
                answer = upstream.getresponse()
                data = answer.read()
            finally:
                upstream.close()
            short = answer.status == 206 and self.path.partition("?")[0].endswith(suffix)
            self.send_response_only(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in ("transfer-encoding", "connection"):
                    self.send_header(name, value)
            if short:
                self.send_header("Transfer-Encoding", "chunked")
                data = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data[:keep]), data[:keep])
                with lock:
                    proxy.shortened += 1
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_HEAD = forward  # noqa: N815 (http.server's names)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="s3shortproxy")
    proxy = ShortProxy(f"http://127.0.0.1:{server.server_address[1]}", server, thread)
    thread.start()
    return proxy


def stop_short_proxy(proxy: ShortProxy) -> None:
    """Stop serving and close the listening socket."""
    proxy.server.shutdown()
    proxy.server.server_close()
    proxy.thread.join(5)
