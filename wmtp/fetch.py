"""`fetch`: local paths of a model's files, checked against the manifest; a remote file is
downloaded once per version (`wmtp.download`), to `<cache>/<location>-<hash>/<version>/<name>`.
"""

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
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

    return dict(zip(names, run_all(head, names), strict=True))


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
    manifest = manifest or {}
    found, root = require(location, heads(location, files, storage_options)), local_root(location)
    for name, meta in found.items():
        check_size(location, name, manifest, int(meta["size"]))
    cache = cache_root(cache_dir)
    paths = {
        n: root / n if root else cache / _folder(location, storage_options, m) / n
        for n, m in found.items()
    }
    todo = [n for n in files if root is None and not complete(paths[n], found[n]["size"])]
    if verify:  # cached copies were hashed when downloaded, but the manifest may be newer
        run_all(lambda n: check_hash(location, n, manifest, paths[n]), set(files) - set(todo))
    if not todo:
        return paths
    from wmtp.download import download

    download(location, {n: found[n] for n in todo}, paths, manifest, storage_options, progress)
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


def run_all(work: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """`work` on every item in threads; the first failure cancels what has not started."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        return wait_all([pool.submit(work, item) for item in items])


def wait_all(futures: list[Future[Any]]) -> list[Any]:
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        wait(futures)  # no write outlives the file it writes to
        raise


def complete(path: Path, size: int) -> bool:
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
