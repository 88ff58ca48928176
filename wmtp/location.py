"""Locations: a folder, a `file://` URL or a URL obstore's `from_url` takes (`s3://`, `gs://`,
`az://`, `https://`); the names of files in them; store errors turned into wmtp's."""

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urlparse

from obstore import exceptions as obx

StorageOptions = Mapping[str, str] | Mapping[str, Mapping[str, str]]  # flat, or by URL prefix
PARALLEL: Final = 8


def local_root(location: str | os.PathLike[str]) -> Path | None:
    """The folder of a local location (a path or `file://` URL), else None."""
    url = urlparse(location := os.fspath(location))
    if "://" not in location or url.scheme == "file":  # file://rel, file://./rel: relative
        host = "" if url.netloc == "localhost" else url.netloc  # file:///abs, file://localhost/abs
        path = unquote(host + url.path) if "://" in location else location
        return Path(os.path.expanduser(path)).absolute()  # noqa: PTH111 (an unknown ~user stays)
    return None


def join(location: str, name: str) -> str:
    """The URL (or path) of file `name` inside `location`."""
    return f"{location.rstrip('/')}/{name}"


@contextmanager
def translate(url: str) -> Iterator[None]:
    """Turn obstore's and the system's exceptions into wmtp's, naming `url` and the cause."""
    try:
        yield
    except (obx.BaseError, OSError) as e:  # FileNotFoundError too
        from wmtp.hints import store_error

        raise store_error(url, e) from e
