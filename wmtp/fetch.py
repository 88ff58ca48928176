"""`fetch`: local paths of a model's files, checked against the manifest. Remote files come
from the cache, which `wmtp.download` fills."""

import hashlib
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import obstore

from wmtp.errors import IntegrityError, ModelFileError
from wmtp.metadata import FileEntry
from wmtp.store import StorageOptions, join, local_root, open_store, translate

PARALLEL: Final = 8


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

    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(zip(names, pool.map(head, names), strict=True))


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
    """Local paths of `files` (names in the folder or URL `location`), downloading remote ones
    first; options as for `wmtp.load`, with the `manifest` to check sizes (always) and hashes
    (of downloads, and of local or cached copies with `verify`) against.

    Raises `ModelFileError` naming every missing file, `IntegrityError`, `StoreAccessError`
    or `FetchError` (after bounded retries, or when a file changed mid-download).
    """
    manifest = manifest or {}
    found = require(location, heads(location, files, storage_options))
    for name, meta in found.items():
        check_size(location, name, manifest, int(meta["size"]))
    if (root := local_root(location)) is None:
        from wmtp.download import cached

        return cached(location, found, manifest, storage_options, cache_dir, progress, verify)
    with ThreadPoolExecutor(PARALLEL) as pool:  # hashing releases the GIL
        list(
            pool.map(lambda n: check_hash(location, n, manifest, root / n), files if verify else [])
        )
    return {name: root / name for name in files}


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
