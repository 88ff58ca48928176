"""Remote locations: their stores, configured once from obstore's environment variables and
`storage_options` (which win; flat, or per URL prefix), AWS profiles (with boto3: `wmtp[aws]`),
and the cache of their files, crash-safe: `<cache>/<location>-<hash>/<version>/<name>`.

A file is downloaded once per version (its ETag): ranged GETs of `PART_SIZE` on plain threads
(obstore's sync calls release the GIL), each pinned to the ETag with If-Match (and to the
version, where the store gives one: GCS's generation), streamed into a temporary file named
after its owner, fsynced, then renamed. A lock per file makes processes download it once;
correctness never depends on it, as a process deletes only its own temporary files or those
of a dead process on the same host.
"""

from __future__ import annotations

import ctypes
import functools
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
from obstore.store import ObjectStore, S3Store, from_url
from tqdm import tqdm

from wmtp.errors import FetchError, IntegrityError, ModelFileError, OptionError
from wmtp.location import PARALLEL, StorageOptions, join, translate
from wmtp.metadata import FileEntry

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


def options_for(location: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The flat options of `location`: `storage_options` itself, or, when its keys are URL
    prefixes (`{"s3://bucket-a/": {...}, "https://host/": {...}}`), the options of the longest
    one that `location` lies under (none: the environment alone); `OptionError` for a mix."""
    options = dict(storage_options or {})
    if not (prefixes := [k for k in options if "://" in k]):
        return options
    if flat := sorted(options.keys() - prefixes):
        raise OptionError(
            f"storage_options mixes URL prefixes ({', '.join(prefixes)}) with flat keys "
            f"({', '.join(flat)}); put every option under a prefix, or use no prefix at all"
        )
    url = location.rstrip("/")
    under = [p for p in prefixes if url == p.rstrip("/") or url.startswith(p.rstrip("/") + "/")]
    if not under:
        return {}
    if not isinstance(found := options[prefix := max(under, key=len)], Mapping):
        raise OptionError(f"storage_options[{prefix!r}] must be a mapping of options")
    return dict(found)


def open_remote(location: str, storage_options: StorageOptions | None = None) -> ObjectStore:
    """The obstore store of URL `location`, from obstore's store and client settings
    (`endpoint`, `region`, `allow_http`, `timeout`...), `max_retries` (default 5),
    `retry_timeout` (s, default 60) and `profile`, flat or per URL prefix (`options_for`);
    `FetchError` when obstore refuses the URL or an option, `OptionError` for a retry option
    that is not a number or an AWS profile that gives no credentials.

    S3 credentials come, first found: keys in the options (`access_key_id`...), the options'
    `profile`, `AWS_ACCESS_KEY_ID` and the rest of obstore's environment, then `$AWS_PROFILE`
    (as the AWS CLI: `--profile` beats the environment's keys, which beat `$AWS_PROFILE`). A
    profile is read by boto3 (`pip install "wmtp[aws]"`) from `$AWS_SHARED_CREDENTIALS_FILE`
    and `$AWS_CONFIG_FILE` (default `~/.aws/credentials`, `~/.aws/config`), with its region
    unless the options or `AWS_REGION` / `AWS_DEFAULT_REGION` give one."""
    config: dict[str, Any] = options_for(location, storage_options)
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
    provider = _profile(location, config, prefix == "AWS_")
    with translate(location):
        store: ObjectStore = from_url(
            location.rstrip("/"),
            config=config,
            client_options=client,
            retry_config=retry,
            **({"credential_provider": provider} if provider else {}),
        )  # type: ignore[call-overload]
    return store


def _profile(location: str, config: dict[str, Any], s3: bool) -> Any:
    """The credential provider of the AWS profile that applies (see `open_remote`), else None;
    pops the `profile` option from `config` and adds the profile's region when it has none."""
    keys = {k.lower().removeprefix("aws_"): k for k in config}
    chosen, env = config.pop(keys["profile"], None) if "profile" in keys else None, os.environ
    if chosen and not s3:
        raise OptionError(f"storage option profile={chosen!r} is for s3:// locations: {location}")
    unsigned = str(config.get(keys.get("skip_signature", ""), "")).lower() == "true"
    if not s3 or unsigned or keys.keys() & {"access_key_id", "secret_access_key"}:
        return None  # the options' own keys win
    env_keys = env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_SKIP_SIGNATURE", "").lower() == "true"
    if not (name := chosen or (None if env_keys else env.get("AWS_PROFILE"))):
        return None
    how = "storage option profile" if chosen else "AWS_PROFILE"
    files = [
        Path(env.get(var) or default).expanduser()
        for var, default in [
            ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
            ("AWS_CONFIG_FILE", "~/.aws/config"),
        ]
    ]
    stamps = tuple((str(f), f.stat().st_mtime_ns if f.exists() else None) for f in files)
    aws_env = tuple(sorted((k, v) for k, v in env.items() if k.startswith("AWS_")))
    try:
        provider, region = _boto3_provider(str(name), stamps, aws_env)
    except ImportError:
        raise OptionError(
            f'AWS profile {name!r} ({how}) is read by boto3: pip install "wmtp[aws]"'
        ) from None
    except LookupError as e:
        raise OptionError(
            f"AWS profile {name!r} ({how}) {e}; searched {files[0]} and {files[1]}"
        ) from None
    if region and not keys.keys() & {"region", "default_region"} and not env.get("AWS_REGION"):
        config["region"] = region
    return provider


@functools.lru_cache(maxsize=16)
def _boto3_provider(name: str, files: Any, env: Any) -> tuple[Any, str | None]:
    """The credential provider and region of AWS profile `name`, by boto3, once per state of
    the files and the AWS_ variables (`files`, `env`: the cache's keys); `LookupError` when
    boto3 finds no such profile or no credentials in it."""
    import boto3  # type: ignore[import-untyped]
    import botocore.session  # type: ignore[import-untyped]
    from botocore.exceptions import BotoCoreError, ProfileNotFound  # type: ignore[import-untyped]
    from obstore.auth.boto3 import Boto3CredentialProvider

    try:
        session = boto3.Session(botocore_session=(core := botocore.session.Session(profile=name)))
    except ProfileNotFound:
        known = ", ".join(core.available_profiles) or "none"
        raise LookupError(f"does not exist (profiles: {known})") from None
    try:
        provider = Boto3CredentialProvider(session)
    except (ValueError, BotoCoreError) as e:
        raise LookupError(f"gives no credentials ({e})") from None
    provider.config = {}  # the region goes to the store's config, below the environment's
    return provider, session.region_name


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
    s3 = isinstance(store, S3Store)

    def part(name: str, pins: dict[str, str], fd: int, end: int) -> None:
        start = offset = (end - 1) // PART_SIZE * PART_SIZE
        url = join(location, name)
        try:
            with translate(url):
                options: Any = {"range": (start, end), **pins}
                stream = obstore.get(store, name, options=options)
                for chunk in stream.stream(2**20):
                    os.pwrite(fd, chunk, offset)  # streamed: no part is held whole in memory
                    offset += len(chunk)
                    advance(len(chunk))
        except ModelFileError as e:  # HEAD found it: the version the part is pinned to is gone
            from wmtp.hints import changed

            raise changed(url, e.__cause__ or e) from e
        if offset != end:
            raise FetchError(f"{url}: the part at byte {start} ended at {offset}, not {end}")
        if _SYNC_FILE_RANGE is not None:  # SYNC_FILE_RANGE_WRITE: start writeback, no wait
            _SYNC_FILE_RANGE(fd, ctypes.c_int64(start), ctypes.c_int64(end - start), 2)

    def get(name: str, meta: Any, dest: Path) -> None:
        size = int(meta["size"])
        # Every part is pinned to the version HEAD saw, by its ETag (If-Match) and, where the
        # store gives one, its version (GCS's generation; not S3's, as If-Match pins it there
        # and a versionId would need s3:GetObjectVersion rights): a replaced object fails.
        pins = {"if_match": meta.get("e_tag"), "version": None if s3 else meta.get("version")}
        pins = {k: v for k, v in pins.items() if v}
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _locked(dest):
            if _complete(dest, size):  # another process finished it while we waited
                return
            tmp = dest.with_name(f".{dest.name}.{HOST}~{os.getpid()}~{uuid.uuid4().hex}.part")
            try:
                with tmp.open("xb") as f:
                    f.truncate(size)
                    ends = [min(s + PART_SIZE, size) for s in range(0, size, PART_SIZE)]
                    _wait([parts.submit(part, name, pins, f.fileno(), e) for e in ends])
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
    options, env = options_for(location, options), os.environ
    endpoint = options.get("endpoint") or options.get("aws_endpoint") or env.get("AWS_ENDPOINT_URL")
    where = f"{endpoint or env.get('AWS_ENDPOINT') or ''}|{location.rstrip('/')}"
    tag = meta.get("e_tag") or meta.get("version") or f"{meta['last_modified']}-{meta['size']}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", location.rstrip("/"))[:80]
    digest = hashlib.sha256(where.encode()).hexdigest()[:10]
    return f"{slug}-{digest}/{hashlib.sha256(str(tag).encode()).hexdigest()[:20]}"
