"""Remote locations: their stores, configured once from obstore's environment variables and
`storage_options` (which win), and the cache of their files, crash-safe:
`<cache>/<location>-<hash>/<version>/<name>`.

A file is downloaded once per version (its ETag): ranged GETs of `PART_SIZE` on plain threads
(obstore's sync calls release the GIL), each pinned to the ETag with If-Match, streamed into a
temporary file named after its owner, fsynced, then renamed. A lock per file makes processes
download it once; correctness never depends on it, as a process deletes only its own
temporary files or those of a dead process on the same host.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

import obstore
from filelock import FileLock
from obstore.store import ObjectStore, from_url
from tqdm import tqdm

from wmtp.errors import FetchError, IntegrityError, OptionError
from wmtp.metadata import FileEntry
from wmtp.store import PARALLEL, StorageOptions, join, translate

# obstore's HTTP client settings go to `client_options`, not to the store's config, where
# obstore panics on them.
CLIENT_KEYS: Final = frozenset(
    "allow_http allow_invalid_certificates connect_timeout default_content_type "
    "default_headers http1_only http2_keep_alive_interval http2_keep_alive_timeout "
    "http2_keep_alive_while_idle http2_only pool_idle_timeout pool_max_idle_per_host "
    "proxy_ca_certificate proxy_excludes proxy_url randomize_addresses read_timeout "
    "root_certificate timeout user_agent".split()
)
# Model files are large: obstore's 30 s limit on a whole request would cut a slow part. A
# part is at most 16 MiB, so 300 s allows 56 KB/s; a stalled read fails after 60 s.
CLIENT_DEFAULTS: Final = {"connect_timeout": "10s", "timeout": "300s", "read_timeout": "60s"}
ENV_PREFIXES: Final = dict(s3="AWS_", s3a="AWS_", gs="GOOGLE_", az="AZURE_", abfs="AZURE_")
Manifest = Mapping[str, FileEntry]
PART_SIZE: Final = 16 * 2**20
HOST: Final = socket.gethostname()
# sync_file_range(2) (Linux): start writing a finished part, so the fsync has less to wait for.
_SYNC_FILE_RANGE: Final = getattr(ctypes.CDLL(None), "sync_file_range", None)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where downloads go: `cache_dir`, else `$WMTP_CACHE_DIR`, else `$XDG_CACHE_HOME/wmtp`,
    else `~/.cache/wmtp`. Deleting it is always safe between loads."""
    if cache_dir is not None or (cache_dir := os.environ.get("WMTP_CACHE_DIR")):
        return Path(cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wmtp"


def open_remote(location: str, storage_options: StorageOptions | None = None) -> ObjectStore:
    """The obstore store of URL `location`, from obstore's store and client settings
    (`endpoint`, `region`, `allow_http`, `timeout`...) and `max_retries` (default 5) and
    `retry_timeout` (s, default 60); `FetchError` when obstore refuses the URL or an option,
    `OptionError` for a retry option that is not a number."""
    config: dict[str, Any] = dict(storage_options or {})
    # obstore reads client settings from the environment only when given no client options.
    prefix = ENV_PREFIXES.get(urlparse(location).scheme, "")
    client = {k: v for k in CLIENT_KEYS if (v := os.environ.get(f"{prefix}{k.upper()}"))}
    client = CLIENT_DEFAULTS | client | {k: config.pop(k) for k in CLIENT_KEYS & config.keys()}
    client |= {"allow_http": "true"} if location.startswith("http://") else {}  # as asked
    try:
        retry: Any = {"max_retries": int(config.pop("max_retries", 5))}  # backoff: obstore's
        retry["retry_timeout"] = timedelta(seconds=float(config.pop("retry_timeout", 60)))
        if retry["max_retries"] < 0 or retry["retry_timeout"] < timedelta(0):
            raise ValueError("they cannot be negative")
    except ValueError as e:
        raise OptionError(
            f"storage options max_retries and retry_timeout are numbers: {e}"
        ) from None
    with translate(location):
        store: ObjectStore = from_url(
            location.rstrip("/"), config=config, client_options=client, retry_config=retry
        )  # type: ignore[call-overload]
    return store


def cached(
    location: str,
    found: Mapping[str, Any],
    manifest: Mapping[str, FileEntry],
    storage_options: StorageOptions | None,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool | None,
    verify: bool,
) -> dict[str, Path]:
    """Cached copies of the files of `found` (name -> object metadata from HEAD), downloading
    those not cached yet; with `verify`, hashing the cached ones against the manifest."""
    root = cache_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(
            f"the download cache {str(root)!r} cannot be created ({e.strerror}); pass cache_dir= "
            "(CLI: --cache-dir) or set WMTP_CACHE_DIR to a writable folder"
        ) from None
    paths = {n: root / _folder(location, storage_options, m) / n for n, m in found.items()}
    todo = {n: m for n, m in found.items() if not _complete(paths[n], m["size"])}
    check_hashes(location, {n: paths[n] for n in found.keys() - todo if verify}, manifest)
    if not todo:
        return paths
    shown = None if progress is None else not progress  # None: only when stderr is a terminal
    with (
        tqdm(
            total=sum(m["size"] for m in todo.values()),
            unit="B",
            unit_scale=True,
            desc="wmtp",
            disable=shown,
        ) as bar,
        ThreadPoolExecutor(PARALLEL) as parts,
    ):
        get = _getter(open_remote(location, storage_options), location, manifest, parts, bar.update)
        _all(lambda n: get(n, todo[n], paths[n]), todo)
    return paths


def _getter(
    store: Any,
    location: str,
    manifest: Mapping[str, FileEntry],
    parts: ThreadPoolExecutor,
    advance: Callable[[int], object],
) -> Callable[[str, Any, Path], None]:
    def part(name: str, etag: str | None, fd: int, end: int) -> None:
        # If-Match pins every part to the version HEAD saw: a replaced object fails.
        start = offset = (end - 1) // PART_SIZE * PART_SIZE
        options: Any = {"range": (start, end)} | ({"if_match": etag} if etag else {})
        with translate(url := join(location, name)):
            for chunk in obstore.get(store, name, options=options).stream(2**20):
                os.pwrite(fd, chunk, offset)  # streamed: no part is held whole in memory
                offset += len(chunk)
                advance(len(chunk))
        if offset != end:
            raise FetchError(f"{url}: the part at byte {start} ended at {offset}, not {end}")
        if _SYNC_FILE_RANGE is not None:  # SYNC_FILE_RANGE_WRITE: start writeback, no wait
            _SYNC_FILE_RANGE(fd, ctypes.c_int64(start), ctypes.c_int64(end - start), 2)

    def get(name: str, meta: Any, dest: Path) -> None:
        size, etag = int(meta["size"]), meta.get("e_tag")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _locked(dest):
            if _complete(dest, size):  # another process finished it while we waited
                return
            tmp = dest.with_name(f".{dest.name}.{HOST}~{os.getpid()}~{uuid.uuid4().hex}.part")
            try:
                with tmp.open("xb") as f:
                    f.truncate(size)
                    ends = [min(s + PART_SIZE, size) for s in range(0, size, PART_SIZE)]
                    _wait([parts.submit(part, name, etag, f.fileno(), e) for e in ends])
                    os.fsync(f.fileno())
                check_hash(location, name, manifest, tmp)
                tmp.replace(dest)
                fd = os.open(dest.parent, os.O_RDONLY)  # make the rename itself durable
                os.fsync(fd)
                os.close(fd)
            finally:
                tmp.unlink(missing_ok=True)

    return get


def check_hash(location: str, name: str, manifest: Mapping[str, FileEntry], path: Path) -> None:
    """Raise `IntegrityError` when the manifest lists `name` with another SHA-256 than `path`'s."""
    if (entry := manifest.get(name)) is None:
        return
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != entry.sha256:
        raise IntegrityError(
            f"{join(location, name)} has sha256 {digest}, but metadata.json's manifest "
            f"(`$.files[{name!r}].sha256`) says {entry.sha256}; the file is corrupt or the "
            "manifest is stale (nothing was cached)"
        )


def check_hashes(
    location: str, paths: Mapping[str, Path], manifest: Mapping[str, FileEntry]
) -> None:
    """`check_hash` of every file in `paths` (name -> local copy), in threads."""
    _all(lambda n: check_hash(location, n, manifest, paths[n]), paths)


def _all(work: Callable[[Any], Any], items: Iterable[Any]) -> None:
    """`work` on every item in threads; the first failure cancels what has not started."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        _wait([pool.submit(work, item) for item in items])


def _wait(futures: list[Future[Any]]) -> None:
    try:
        for future in futures:
            future.result()
    except BaseException:
        for future in futures:
            future.cancel()
        wait(futures)  # no write outlives the file it writes to
        raise


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Hold `dest`'s download lock, first deleting temporary files of dead owners here."""
    with FileLock(dest.with_name(f".{dest.name}.lock")):
        for part in dest.parent.glob(f".{dest.name}.*.part"):
            host, _, pid = part.name.removeprefix(f".{dest.name}.").partition("~")
            try:  # never someone else's: a broken lock costs bandwidth, never a failure
                os.kill(int(pid.partition("~")[0]), 0)
            except ProcessLookupError:
                if host == HOST:
                    part.unlink(missing_ok=True)
            except (ValueError, OSError):
                pass
        yield


def _complete(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _folder(location: str, options: StorageOptions | None, meta: Mapping[str, Any]) -> str:
    """`<location>-<hash>/<version>`: readable, unique per endpoint and location, and per
    version of the object (its ETag, version id, or mtime and size)."""
    options, env = options or {}, os.environ
    endpoint = options.get("endpoint") or options.get("aws_endpoint") or env.get("AWS_ENDPOINT_URL")
    where = f"{endpoint or env.get('AWS_ENDPOINT') or ''}|{location.rstrip('/')}"
    tag = meta.get("e_tag") or meta.get("version") or f"{meta['last_modified']}-{meta['size']}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", location.rstrip("/"))[:80]
    digest = hashlib.sha256(where.encode()).hexdigest()[:10]
    return f"{slug}-{digest}/{hashlib.sha256(str(tag).encode()).hexdigest()[:20]}"
