"""`fetch`: local paths of a model's files, downloading remote ones into a crash-safe cache.

A local folder's files are used where they are. A remote file is downloaded
once per version: `<cache>/<location>/<version>/<name>`, where the version is
the object's ETag (or version id). Large files come in ranged GETs of
`PART_SIZE`, `PARALLEL` in flight, each pinned to the ETag with If-Match so a
file replaced mid-download is never mixed, written in place into a
process-unique temporary file that is fsynced and renamed only when complete.
A lock per file makes concurrent processes download it once; correctness
never depends on the lock.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import hashlib
import os
import re
import sys
import uuid
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
import obstore
from obstore.store import ObjectStore

if TYPE_CHECKING:
    from obstore import GetOptions

from wmtp.errors import FetchError, IntegrityError, ModelFileError
from wmtp.metadata import FileEntry
from wmtp.store import StorageOptions, join, local_root, open_store, translate

# sync_file_range(2) where libc has it (Linux): flush one written range without the rest.
_SYNC_FILE_RANGE: Final = getattr(ctypes.CDLL(None), "sync_file_range", None)
PART_SIZE: Final = 16 * 2**20
CHUNK_SIZE: Final = 2**20  # a part is written as it streams, in chunks of about this
PARALLEL: Final = 8
T = TypeVar("T")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where downloads go: `cache_dir`, else `$WMTP_CACHE_DIR`, else `$XDG_CACHE_HOME/wmtp`,
    else `~/.cache/wmtp`. Deleting it is always safe between loads."""
    if cache_dir is not None:
        return Path(cache_dir)
    if env := os.environ.get("WMTP_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wmtp"


def read_file(location: str, name: str, storage_options: StorageOptions | None = None) -> bytes:
    """The bytes of a small file (metadata, config) at `location`, never cached.

    Raises:
        ModelFileError: no such file there.
        StoreAccessError, FetchError: the store refused or could not be reached.
    """
    store = open_store(location, storage_options)
    with translate(join(location, name)):
        return bytes(obstore.get(store, name).bytes())


def file_manifest(
    location: str, names: Sequence[str], storage_options: StorageOptions | None = None
) -> dict[str, FileEntry]:
    """Size and SHA-256 of each file, streamed through the store (local or remote).

    Example:
        >>> file_manifest("examples/tiny-mtp", ["config.json"])
        {'config.json': FileEntry(size=929, sha256='…')}
    """
    store = open_store(location, storage_options)
    out = {}
    for name in names:
        sha, size = hashlib.sha256(), 0
        with translate(join(location, name)):
            for chunk in obstore.get(store, name).stream(min_chunk_size=8 * 2**20):
                sha.update(chunk)
                size += len(chunk)
        out[name] = FileEntry(size=size, sha256=sha.hexdigest())
    return out


def file_sizes(
    location: str, names: Sequence[str], storage_options: StorageOptions | None = None
) -> dict[str, int | None]:
    """Each file's size from a HEAD (all at once), None where it is missing; reads no data."""
    store = open_store(location, storage_options)

    async def heads() -> list[Mapping[str, Any] | None]:
        return await asyncio.gather(*(_head(store, location, name) for name in names))

    found = run_sync(heads())
    return {n: None if h is None else int(h["size"]) for n, h in zip(names, found, strict=True)}


def fetch(
    location: str,
    files: Sequence[str],
    *,
    storage_options: StorageOptions | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    manifest: Mapping[str, FileEntry] | None = None,
    verify: bool = False,
    only_check: Collection[str] = (),
) -> dict[str, Path]:
    """Local paths of `files` at `location`, downloading the remote ones first.

    Args:
        location: model folder or URL (`s3://bucket/prefix`, ...).
        files: names relative to it (the metadata's `required_files`).
        storage_options: obstore configuration; wins over the environment.
        cache_dir: where downloads go (see `cache_root`).
        progress: a progress bar on stderr; None shows one when stderr is a terminal.
        manifest: expected size and sha256 per file. Sizes are always checked; a
            download is hashed while it is written; a local file is hashed if `verify`.
        verify: hash local (and already cached) files against the manifest, reading
            them once more; fresh downloads are always hashed as they are written.
        only_check: names among `files` to check (exist, manifest size) but not
            download; they are left out of the result.

    Raises:
        ModelFileError: files are missing (all named, with the location).
        IntegrityError: a size or hash differs from the manifest (nothing is cached).
        StoreAccessError: the credentials were refused.
        FetchError: the store failed after bounded retries, or a file changed mid-download.

    Example:
        >>> fetch("s3://models/tiny-mtp", ["config.json", "model.safetensors"])
        {'config.json': PosixPath('/root/.cache/wmtp/s3_models_tiny-mtp-1c2d…/…/config.json'), …}
    """
    store = open_store(location, storage_options)
    root = local_root(location)
    folder = root or cache_root(cache_dir) / _slug(location, storage_options)
    plan = _Plan(location=location, root=root, folder=folder, manifest=manifest or {})
    return run_sync(_fetch(store, plan, files, progress, verify=verify, only_check=only_check))


class _Plan(msgspec.Struct, frozen=True, kw_only=True):
    """Where a fetch reads from and writes to, and what the files must be."""

    location: str
    root: Path | None  # the folder itself when local
    folder: Path  # where the files end up
    manifest: Mapping[str, FileEntry]


async def _fetch(
    store: ObjectStore,
    plan: _Plan,
    files: Sequence[str],
    progress: bool | None,
    *,
    verify: bool,
    only_check: Collection[str],
) -> dict[str, Path]:
    heads = await asyncio.gather(*(_head(store, plan.location, name) for name in files))
    found = {name: head for name, head in zip(files, heads, strict=True) if head is not None}
    if missing := [name for name in files if name not in found]:
        raise ModelFileError(
            f"required file(s) {', '.join(map(repr, missing))} not found at {plan.location}; "
            "add them there, or remove them from loading_strategy.required_files"
        )
    for name, head in found.items():
        _check_size(plan, name, int(head["size"]))
    if plan.root is not None:
        if verify:
            await asyncio.gather(*(_verify(plan, n, plan.root / n) for n in files))
        return {name: plan.root / name for name in files if name not in only_check}
    wanted = [name for name in files if name not in only_check]
    targets = {name: plan.folder / _version(found[name]) / name for name in wanted}
    todo = [name for name in wanted if not _complete(targets[name], found[name]["size"])]
    if verify:  # cached copies were hashed when downloaded, but the manifest may be newer
        await asyncio.gather(*(_verify(plan, n, targets[n]) for n in wanted if n not in todo))
    with _progress(sum(found[n]["size"] for n in todo), progress) as advance:
        limit = asyncio.Semaphore(PARALLEL)
        await _all(_download(store, plan, n, found[n], targets[n], limit, advance) for n in todo)
    return targets


async def _head(store: ObjectStore, location: str, name: str) -> Mapping[str, Any] | None:
    try:
        with translate(join(location, name)):
            head: Mapping[str, Any] = await obstore.head_async(store, name)
            return head
    except ModelFileError:
        return None


def _check_size(plan: _Plan, name: str, size: int) -> None:
    if (entry := plan.manifest.get(name)) is not None and entry.size != size:
        raise IntegrityError(
            f"{join(plan.location, name)} has {size} bytes, but metadata.json's manifest "
            f"(`$.files[{name!r}].size`) says {entry.size}; the file or the manifest is stale"
        )


def _check_hash(plan: _Plan, name: str, digest: str) -> None:
    if (entry := plan.manifest.get(name)) is not None and entry.sha256 != digest:
        raise IntegrityError(
            f"{join(plan.location, name)} has sha256 {digest}, but metadata.json's manifest "
            f"(`$.files[{name!r}].sha256`) says {entry.sha256}; the file is corrupt or the "
            "manifest is stale (nothing was cached)"
        )


async def _verify(plan: _Plan, name: str, path: Path) -> None:
    if name in plan.manifest:
        with path.open("rb") as f:
            digest = await asyncio.to_thread(hashlib.file_digest, f, "sha256")
        _check_hash(plan, name, digest.hexdigest())


async def _download(
    store: ObjectStore,
    plan: _Plan,
    name: str,
    head: Mapping[str, Any],
    dest: Path,
    limit: asyncio.Semaphore,
    advance: Callable[[int], object],
) -> None:
    url, size, etag = join(plan.location, name), int(head["size"]), head.get("e_tag")
    dest.parent.mkdir(parents=True, exist_ok=True)
    async with _locked(dest):
        if _complete(dest, size):  # another process finished it while we waited
            return
        for stale in dest.parent.glob(f".{dest.name}.*.part"):  # left by a killed process
            stale.unlink(missing_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.ftruncate(fd, size)
            # Hash only what the manifest can be checked against: hashing costs a core.
            want_hash = name in plan.manifest
            digest = await _write_parts(store, name, url, etag, fd, size, limit, advance, want_hash)
            os.fsync(fd)
            _check_hash(plan, name, digest)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        if (got := tmp.stat().st_size) != size:
            tmp.unlink(missing_ok=True)
            raise FetchError(f"{url}: downloaded {got} bytes, the object has {size}")
        tmp.replace(dest)
        _fsync_dir(dest.parent)


async def _write_parts(
    store: ObjectStore,
    name: str,
    url: str,
    etag: str | None,
    fd: int,
    size: int,
    limit: asyncio.Semaphore,
    advance: Callable[[int], object],
    want_hash: bool,
) -> str:
    """Download `name` in ranged parts into `fd`, and (if `want_hash`) its sha256 computed
    on the way; "" otherwise.

    Each part streams into the file in chunks as they arrive (no part is held whole just to
    be written). Parts finish in any order but are hashed in order, by one thread; a part's
    chunks wait in memory for its predecessors, at most `2 * PARALLEL` parts per file.
    """
    loop = asyncio.get_running_loop()
    sha = hashlib.sha256()
    held: dict[int, list[Any]] = {}
    hashed = [0]  # offset up to which the file is queued for hashing
    window = asyncio.Semaphore(2 * PARALLEL)
    hashing: list[asyncio.Future[None]] = []

    async def part(start: int, end: int, hasher: Executor) -> None:
        # If-Match pins every part to the version HEAD saw: a replaced object fails.
        options: GetOptions = {"range": (start, end)}
        if etag:
            options["if_match"] = etag
        await window.acquire()
        chunks, offset = [], start
        async with limit:
            with translate(url):
                got = await obstore.get_async(store, name, options=options)
                async for chunk in got.stream(min_chunk_size=CHUNK_SIZE):
                    os.pwrite(fd, chunk, offset)  # a page-cache copy; shorter than a thread hop
                    offset += len(chunk)
                    advance(len(chunk))
                    if want_hash:
                        chunks.append(chunk)
        if offset != end:
            raise FetchError(f"{url}: {offset - start} bytes at {start}, not {end - start}")
        _start_writeback(fd, start, end - start)
        if not want_hash:
            window.release()
            return
        held[start] = chunks
        while hashed[0] in held:
            queued = held.pop(hashed[0])
            hashed[0] += sum(len(c) for c in queued)
            hashing.append(loop.run_in_executor(hasher, _update, sha, queued))
            hashing[-1].add_done_callback(lambda _: window.release())

    # Leaving the executor waits for its running job, so no hash outlives the download.
    with ThreadPoolExecutor(1) as hasher:
        ends = [(s, min(s + PART_SIZE, size)) for s in range(0, size, PART_SIZE)]
        await _all(part(start, end, hasher) for start, end in ends)
        await asyncio.gather(*hashing)
    return sha.hexdigest() if want_hash else ""


def _update(sha: Any, chunks: list[Any]) -> None:
    for chunk in chunks:
        sha.update(chunk)


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a finished part to disk (Linux), so the fsync before the rename has
    less left to wait for."""
    if _SYNC_FILE_RANGE is not None:  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait
        _SYNC_FILE_RANGE(fd, ctypes.c_int64(offset), ctypes.c_int64(length), ctypes.c_uint(2))


async def _all(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Like `asyncio.gather`, but the first failure cancels the rest and waits for them."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _complete(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _version(head: Mapping[str, Any]) -> str:
    """A folder name for this version of an object: from its ETag, version id, or mtime+size."""
    tag = head.get("e_tag") or head.get("version") or f"{head['last_modified']}-{head['size']}"
    return hashlib.sha256(str(tag).encode()).hexdigest()[:20]


def _slug(location: str, storage_options: StorageOptions | None) -> str:
    """A readable, unique folder name for a location (the endpoint is part of its identity)."""
    options = storage_options or {}
    endpoint = options.get("endpoint") or options.get("aws_endpoint") or ""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT", "")
    digest = hashlib.sha256(f"{endpoint}|{location.rstrip('/')}".encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', location.rstrip('/'))[:80]}-{digest}"


@contextmanager
def _progress(total: int, progress: bool | None) -> Iterator[Callable[[int], object]]:
    """A function to call with each chunk's size: a tqdm bar's update, or nothing."""
    if not (progress if progress is not None else sys.stderr.isatty()) or total == 0:
        yield lambda _: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="wmtp") as bar:
        yield bar.update


@asynccontextmanager
async def _locked(dest: Path) -> AsyncIterator[None]:
    """Hold an exclusive lock on `dest`'s lock file (closing the file releases it)."""
    fd = os.open(dest.with_name(f".{dest.name}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion, also from code already inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
