"""One way to reach a model's files, wherever they are: obstore.

A location is a local folder, a `file://` URL, or any URL obstore's
`from_url` understands (`s3://`, `gs://`, `az://`, `https://`). The loaders
never ask which: they get local paths from `fetch`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import unquote, urlparse

import obstore
from obstore.store import LocalStore, ObjectStore, from_url

from wmtp.errors import ModelFileError

if TYPE_CHECKING:
    from obstore.store import S3Config

StorageOptions = Mapping[str, str]


def local_root(location: str) -> Path | None:
    """The folder of a local location (a path or `file://` URL), else None."""
    if "://" not in location:
        return Path(location).expanduser().absolute()
    url = urlparse(location)
    return Path(unquote(url.path)) if url.scheme == "file" else None


def open_store(location: str, storage_options: StorageOptions | None = None) -> ObjectStore:
    """The obstore store rooted at `location`.

    Raises:
        ModelFileError: a local folder that does not exist.
    """
    root = local_root(location)
    if root is None:
        config = cast("S3Config", dict(storage_options or {}))  # keys are checked by obstore
        return from_url(location.rstrip("/"), config=config)
    if not root.is_dir():
        raise ModelFileError(f"model folder {str(root)!r} does not exist or is not a folder")
    return LocalStore(root)


def read_file(location: str, name: str, storage_options: StorageOptions | None = None) -> bytes:
    """The bytes of file `name` at `location` (small files: metadata, config).

    Raises:
        ModelFileError: no such file there.
    """
    store = open_store(location, storage_options)
    try:
        return bytes(obstore.get(store, name).bytes())
    except FileNotFoundError:
        raise ModelFileError(f"{_join(location, name)} does not exist") from None


def fetch(
    location: str,
    files: Sequence[str],
    *,
    storage_options: StorageOptions | None = None,
) -> dict[str, Path]:
    """Local paths of `files` at `location`, downloading them first if the location is remote.

    Args:
        location: model folder or URL.
        files: names relative to it (the metadata's `required_files`).
        storage_options: obstore configuration for a remote store; wins over
            the environment.

    Raises:
        ModelFileError: a file is missing (named with its location).

    Example:
        >>> fetch("models/tiny-mtp", ["config.json"])
        {'config.json': PosixPath('/…/models/tiny-mtp/config.json')}
    """
    store = open_store(location, storage_options)
    root = local_root(location)
    missing = [name for name in files if not _exists(store, name)]
    if missing:
        raise ModelFileError(
            f"required file(s) {', '.join(map(repr, missing))} not found at {location}; "
            "add them there, or remove them from loading_strategy.required_files"
        )
    if root is None:
        raise ModelFileError(f"{location}: remote locations are not supported yet")
    return {name: root / name for name in files}


def _exists(store: ObjectStore, name: str) -> bool:
    try:
        obstore.head(store, name)
    except FileNotFoundError:
        return False
    return True


def _join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"
