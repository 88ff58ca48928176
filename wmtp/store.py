"""A location's store, its small files (`read_metadata`) and `fetch`: the local paths of a
model's files, checked against the manifest (`wmtp.remote` does URLs and the cache)."""

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import obstore
from obstore.store import LocalStore, ObjectStore

from wmtp.errors import ModelFileError
from wmtp.location import PARALLEL, StorageOptions, join, local_root, translate
from wmtp.metadata import FileEntry, Metadata, decode_metadata


def open_store(location: str, storage_options: StorageOptions | None = None) -> ObjectStore:
    """The obstore store rooted at `location` (see `wmtp.remote.open_remote` for a URL's
    options); `ModelFileError` for a missing folder."""
    if not location:
        raise ModelFileError("the model location is empty; give a folder or URL ('.': here)")
    if (root := local_root(location)) is not None:
        if not root.is_dir():
            raise ModelFileError(f"model folder {str(root)!r} does not exist or is not a folder")
        return LocalStore(root)
    from wmtp.remote import open_remote

    return open_remote(location, storage_options)


def read_file(location: str, name: str, storage_options: StorageOptions | None = None) -> bytes:
    """The bytes of a small file (metadata, config) at `location`, never cached."""
    store = open_store(location, storage_options)
    if root := local_root(location):
        regular(root / name)
    with translate(join(location, name)):
        return bytes(obstore.get(store, name).bytes())


def read_local(path: Path) -> bytes:
    """The bytes of a local file; an I/O error is a `FetchError` naming it."""
    with translate(str(regular(path))):
        return path.read_bytes()


def regular(path: Path) -> Path:
    """`path`, unless it is there as something else than a file (a FIFO would block reads)."""
    with translate(str(path)):  # a name too long, a folder it may not enter: errors naming it
        if not path.exists() or path.is_file():
            return path
    raise ModelFileError(f"{path} is not a regular file (a folder, FIFO or device)")


def heads(location: str, names: Sequence[str], options: StorageOptions | None) -> dict[str, Any]:
    """Each file's object metadata (`size`, `e_tag`, ...), by HEADs at once; None if missing."""
    store, root = open_store(location, options), local_root(location)

    def head(name: str) -> Any:
        if root is not None:
            regular(root / name)  # a FIFO would block the HEAD
        with suppress(ModelFileError), translate(join(location, name)):
            return obstore.head(store, name)
        return None

    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(zip(names, pool.map(head, names), strict=True))


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
    """Local paths of `files` in `location`, downloaded when remote (options: `wmtp.load`'s),
    checked against the `manifest`: sizes, and hashes of downloads (all with `verify`)."""
    manifest = manifest or {}
    if None in (found := heads(location, files, storage_options)).values():
        from wmtp.hints import missing_files

        raise missing_files(location, found)
    for name, meta in found.items():
        check_size(location, name, manifest, int(meta["size"]))
    if (root := local_root(location)) is None:
        from wmtp.remote import cached

        return cached(location, found, manifest, storage_options, cache_dir, progress, verify)
    if verify:
        from wmtp.remote import check_hashes

        check_hashes(location, {name: root / name for name in files}, manifest)
    return {name: root / name for name in files}  # `heads` refused what is not a regular file


def check_size(location: str, name: str, manifest: Mapping[str, FileEntry], size: int) -> None:
    """Raise `IntegrityError` when the manifest lists `name` with another size."""
    if (entry := manifest.get(name)) is not None and size != entry.size:
        from wmtp.hints import stale_size

        raise stale_size(join(location, name), name, size, entry.size)


def read_metadata(
    location: str | os.PathLike[str], *, storage_options: StorageOptions | None = None
) -> Metadata:
    """The decoded `metadata.json` of the model at `location` (a folder or URL).

    Raises:
        ModelFileError: the location or its metadata.json does not exist.
        MetadataError: the file does not decode or validate (see `decode_metadata`).

    Example:
        >>> read_metadata("examples/tiny-mtp").algorithm_compatibility
        ('baseline-mtp', 'critic-wmtp', 'rho1-wmtp')
    """
    try:
        data = read_file(location := os.fspath(location), "metadata.json", storage_options)
    except ModelFileError as e:
        from wmtp.hints import no_metadata

        raise no_metadata(e) from None
    return decode_metadata(data, source=join(location, "metadata.json"))
