"""Locations (a folder, `file://` or any URL obstore's `from_url` takes: `s3://`, `gs://`,
`az://`, `https://`) and their stores, configured once from obstore's environment variables
and `storage_options` (which win), with obstore's errors translated once; and `fetch`, the
local paths of a model's files, checked against the manifest (`wmtp.download` fills the cache
for remote ones)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlparse

import obstore
from obstore import exceptions as obx
from obstore.store import LocalStore, ObjectStore, from_url

from wmtp.errors import FetchError, IntegrityError, ModelFileError, StoreAccessError

if TYPE_CHECKING:
    from wmtp.metadata import FileEntry

StorageOptions = Mapping[str, str]
PARALLEL: Final = 8
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


def local_root(location: str) -> Path | None:
    """The folder of a local location (a path or `file://` URL), else None."""
    url = urlparse(location)
    if "://" not in location or url.scheme == "file":
        return Path(unquote(url.path) if "://" in location else location).expanduser().absolute()
    return None


def join(location: str, name: str) -> str:
    """The URL (or path) of file `name` inside `location`."""
    return f"{location.rstrip('/')}/{name}"


def open_store(location: str, storage_options: StorageOptions | None = None) -> ObjectStore:
    """The obstore store rooted at `location`, from obstore's store and client settings
    (`endpoint`, `region`, `allow_http`, `timeout`...) and `max_retries` (default 5) and
    `retry_timeout` (s, default 60); `ModelFileError` for a missing folder, `FetchError` when
    obstore refuses the URL or an option."""
    if (root := local_root(location)) is not None:
        if not root.is_dir():
            raise ModelFileError(f"model folder {str(root)!r} does not exist or is not a folder")
        return LocalStore(root)
    config: dict[str, Any] = dict(storage_options or {})
    # obstore reads client settings from the environment only when given no client options.
    prefix = ENV_PREFIXES.get(urlparse(location).scheme, "")
    client = {k: v for k in CLIENT_KEYS if (v := os.environ.get(f"{prefix}{k.upper()}"))}
    client = CLIENT_DEFAULTS | client | {k: config.pop(k) for k in CLIENT_KEYS & config.keys()}
    retry: Any = {"max_retries": int(config.pop("max_retries", 5))}  # backoff: obstore's
    retry["retry_timeout"] = timedelta(seconds=float(config.pop("retry_timeout", 60)))
    with translate(location):
        store: ObjectStore = from_url(
            location.rstrip("/"), config=config, client_options=client, retry_config=retry
        )  # type: ignore[call-overload]
    return store


def read_file(location: str, name: str, storage_options: StorageOptions | None = None) -> bytes:
    """The bytes of a small file (metadata, config) at `location`, never cached."""
    store = open_store(location, storage_options)
    with translate(join(location, name)):
        return bytes(obstore.get(store, name).bytes())


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where downloads go: `cache_dir`, else `$WMTP_CACHE_DIR`, else `$XDG_CACHE_HOME/wmtp`,
    else `~/.cache/wmtp`. Deleting it is always safe between loads."""
    if cache_dir is not None or (cache_dir := os.environ.get("WMTP_CACHE_DIR")):
        return Path(cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wmtp"


def heads(location: str, names: Sequence[str], options: StorageOptions | None) -> dict[str, Any]:
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
    first; options as for `wmtp.load`, and the `manifest` to check sizes (always) and hashes
    (of downloads; of local or cached copies with `verify`) against. Raises `ModelFileError`
    naming every missing file, `IntegrityError`, `StoreAccessError` or `FetchError`."""
    manifest = manifest or {}
    found = require(location, heads(location, files, storage_options))
    for name, meta in found.items():
        check_size(location, name, manifest, int(meta["size"]))
    if (root := local_root(location)) is None:
        from wmtp.download import cached

        return cached(location, found, manifest, storage_options, cache_dir, progress, verify)
    if verify:
        with ThreadPoolExecutor(PARALLEL) as pool:  # hashing releases the GIL
            list(pool.map(lambda n: check_hash(location, n, manifest, root / n), files))
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


@contextmanager
def translate(url: str) -> Iterator[None]:
    """Turn obstore's exceptions into wmtp's, naming `url` and the cause."""
    try:
        yield
    except FileNotFoundError:
        raise ModelFileError(f"{url} does not exist") from None
    except (obx.BaseError, OSError) as e:
        cause = str(e).strip().partition("\n")[0] or type(e).__name__
        if not isinstance(e, obx.PermissionDeniedError | obx.UnauthenticatedError):
            raise FetchError(f"{url}: {cause}") from e
        raise StoreAccessError(
            f"{url}: access denied ({cause}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage_options) and their rights"
        ) from None
