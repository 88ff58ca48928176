"""Downloads into the cache, crash-safe: ranged GETs of `PART_SIZE` on plain threads (obstore's
sync calls release the GIL), each pinned to the ETag with If-Match, streamed into a temporary
file named after its owner, fsynced, then renamed. A lock per file makes processes download it
once; correctness never depends on it, as a process deletes only its own temporary files or
those of a dead process on the same host.
"""

from __future__ import annotations

import ctypes
import os
import socket
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import obstore
from filelock import FileLock
from tqdm import tqdm

from wmtp.errors import FetchError
from wmtp.fetch import PARALLEL, check_hash, complete, run_all, wait_all
from wmtp.metadata import FileEntry
from wmtp.store import StorageOptions, join, open_store, translate

PART_SIZE: Final = 16 * 2**20
HOST: Final = socket.gethostname()
# sync_file_range(2) (Linux): start writing a finished part, so the fsync has less to wait for.
_SYNC_FILE_RANGE: Final = getattr(ctypes.CDLL(None), "sync_file_range", None)


def download(
    location: str,
    found: Mapping[str, Any],
    paths: Mapping[str, Path],
    manifest: Mapping[str, FileEntry],
    storage_options: StorageOptions | None,
    progress: bool | None,
) -> None:
    """Download each file of `found` (name -> object metadata from HEAD) to `paths[name]`."""
    store = open_store(location, storage_options)
    size = sum(meta["size"] for meta in found.values())
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

        def one(name: str) -> None:
            size, etag, dest = int(found[name]["size"]), found[name].get("e_tag"), paths[name]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with _locked(dest):
                if complete(dest, size):  # another process finished it while we waited
                    return
                tmp = dest.with_name(f".{dest.name}.{HOST}~{os.getpid()}~{uuid.uuid4().hex}.part")
                try:
                    with tmp.open("xb") as f:
                        f.truncate(size)
                        ends = [min(s + PART_SIZE, size) for s in range(0, size, PART_SIZE)]
                        wait_all([parts.submit(part, name, etag, f.fileno(), e) for e in ends])
                        os.fsync(f.fileno())
                    check_hash(location, name, manifest, tmp)
                    tmp.replace(dest)
                    fd = os.open(dest.parent, os.O_RDONLY)  # make the rename itself durable
                    os.fsync(fd)
                    os.close(fd)
                finally:
                    tmp.unlink(missing_ok=True)

        run_all(one, found)


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
