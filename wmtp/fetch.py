"""`fetch`: local paths of a model's files, downloading remote ones into a crash-safe cache.

A remote file is downloaded once per version, to `<cache>/<location>-<hash>/<etag-hash>/<name>`:
ranged GETs of `PART_SIZE` on plain threads (obstore's sync calls release the GIL), each
pinned to the ETag with If-Match, written in place into a temporary file named after its
owner, fsynced, then renamed. A lock per file makes processes download it once; correctness
never depends on it, as a process deletes only its own temporary files or a dead process's.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import obstore

from wmtp.errors import FetchError, IntegrityError, ModelFileError
from wmtp.metadata import FileEntry
from wmtp.store import StorageOptions, join, local_root, open_store, translate

PART_SIZE: Final = 16 * 2**20
PARALLEL: Final = 8
HOST: Final = socket.gethostname()
# sync_file_range(2) (Linux): start writing a finished part, so the fsync has less to wait for.
_SYNC_FILE_RANGE: Final = getattr(ctypes.CDLL(None), "sync_file_range", None)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where downloads go: `cache_dir`, else `$WMTP_CACHE_DIR`, else `$XDG_CACHE_HOME/wmtp`,
    else `~/.cache/wmtp`. Deleting it is always safe between loads."""
    if cache_dir is not None or (cache_dir := os.environ.get("WMTP_CACHE_DIR")):
        return Path(cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wmtp"


def heads(
    location: str, names: Sequence[str], options: StorageOptions | None = None
) -> dict[str, Any]:
    """Each file's object metadata (`size`, `e_tag`, ...), by HEADs at once; None if missing."""
    store = open_store(location, options)

    def head(name: str) -> Any:
        try:
            with translate(join(location, name)):
                return obstore.head(store, name)
        except ModelFileError:
            return None

    return dict(zip(names, _all(head, names), strict=True))


def require(location: str, found: dict[str, Any]) -> dict[str, Any]:
    """`found` (from `heads`), or `ModelFileError` naming every missing file at once."""
    if missing := [name for name, meta in found.items() if meta is None]:
        raise ModelFileError(
            f"required file(s) {', '.join(map(repr, missing))} not found at {location}; "
            "add them there, or remove them from loading_strategy.required_files"
        )
    return found


def fetch(
    location: str,
    files: Sequence[str],
    *,
    storage_options: StorageOptions | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    manifest: Mapping[str, FileEntry] | None = None,
    verify: bool = False,
) -> dict[str, Path]:
    """Local paths of `files` at `location` (a folder or URL), downloading remote ones first.

    Args:
        files: names relative to the location (the metadata's `required_files`).
        storage_options, cache_dir, progress: as for `wmtp.load`.
        manifest: expected size and sha256 per file: sizes are always checked, downloads
            hashed, local and cached files hashed with `verify`.

    Raises:
        ModelFileError: files are missing (all named, with the location).
        IntegrityError: a size or hash differs from the manifest (nothing is cached).
        StoreAccessError, FetchError: credentials refused; the store failed after bounded
            retries, or a file changed mid-download.

    Example:
        >>> fetch("s3://models/tiny-mtp", ["config.json"])
        {'config.json': PosixPath('/root/.cache/wmtp/s3_models_tiny-mtp-1c2d…/…/config.json')}
    """
    store, manifest = open_store(location, storage_options), manifest or {}
    found, root = require(location, heads(location, files, storage_options)), local_root(location)
    for name, meta in found.items():
        check_size(location, name, manifest, int(meta["size"]))
    cache = cache_root(cache_dir)
    paths = {
        n: root / n if root else cache / _folder(location, storage_options, m) / n
        for n, m in found.items()
    }
    todo = [n for n in files if root is None and not _complete(paths[n], found[n]["size"])]
    if verify:  # cached copies were hashed when downloaded, but the manifest may be newer
        _all(lambda n: check_hash(location, n, manifest, paths[n]), set(files) - set(todo))
    if not todo:
        return paths
    from tqdm import tqdm

    size = sum(found[n]["size"] for n in todo)
    shown = None if progress is None else not progress  # None: only on a terminal
    with (
        tqdm(total=size, unit="B", unit_scale=True, desc="wmtp", disable=shown) as bar,
        ThreadPoolExecutor(PARALLEL) as parts,
    ):

        def part(name: str, etag: str | None, fd: int, end: int) -> None:
            # If-Match pins every part to the version HEAD saw: a replaced object fails.
            start = offset = (end - 1) // PART_SIZE * PART_SIZE
            options: Any = {"range": (start, end)} | ({"if_match": etag} if etag else {})
            with translate(url := join(location, name)):
                for chunk in obstore.get(store, name, options=options).stream(2**20):
                    os.pwrite(fd, chunk, offset)  # streamed: no part is held whole in memory
                    offset += len(chunk)
                    bar.update(len(chunk))
            if offset != end:
                raise FetchError(f"{url}: the part at byte {start} ended at {offset}, not {end}")
            if _SYNC_FILE_RANGE is not None:  # SYNC_FILE_RANGE_WRITE: start writeback, no wait
                _SYNC_FILE_RANGE(fd, ctypes.c_int64(start), ctypes.c_int64(end - start), 2)

        def download(name: str) -> None:
            size, etag, dest = int(found[name]["size"]), found[name].get("e_tag"), paths[name]
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

        _all(download, todo)
    return paths


def check_size(location: str, name: str, manifest: Mapping[str, FileEntry], size: int) -> None:
    """Raise `IntegrityError` when the manifest lists `name` with another size."""
    if (entry := manifest.get(name)) is not None and size != entry.size:
        raise IntegrityError(
            f"{join(location, name)} has {size} bytes, but metadata.json's manifest "
            f"(`$.files[{name!r}].size`) says {entry.size}; the file or the manifest is stale"
        )


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


def _all(work: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """`work` on every item in threads; the first failure cancels what has not started."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        return _wait([pool.submit(work, item) for item in items])


def _wait(futures: list[Future[Any]]) -> list[Any]:
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        wait(futures)  # no write outlives the file it writes to
        raise


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Hold `dest`'s download lock, first deleting temporary files of dead owners here."""
    from filelock import FileLock

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
