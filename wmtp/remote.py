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
import json
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

import obstore
from filelock import FileLock
from obstore.exceptions import BaseError, UnknownConfigurationKeyError
from obstore.store import ObjectStore, S3Store, from_url
from tqdm import tqdm

from wmtp.errors import FetchError, IntegrityError, ModelFileError, OptionError
from wmtp.location import PARALLEL, StorageOptions, join, translate
from wmtp.metadata import FileEntry

# obstore's HTTP client settings go to `client_options`, not to the store's config, where
# obstore panics on them (under any of their names: `allow_http`, `aws_allow_http`...).
CLIENT_KEYS: Final = frozenset(
    "allow_http allow_invalid_certificates connect_timeout default_content_type "
    "default_headers http1_only http2_keep_alive_interval http2_keep_alive_timeout "
    "http2_keep_alive_while_idle http2_max_frame_size http2_only pool_idle_timeout "
    "pool_max_idle_per_host proxy_ca_certificate proxy_excludes proxy_url randomize_addresses "
    "read_timeout root_certificate timeout user_agent".split()
)
# Model files are large: obstore's 30 s limit on a whole request would cut a slow part. A
# part is at most 16 MiB, so 300 s allows 56 KB/s; a stalled read fails after 60 s.
CLIENT_DEFAULTS: Final = {"connect_timeout": "10s", "timeout": "300s", "read_timeout": "60s"}
# The variables obstore's stores read (by `obstore.parse_scheme`), as `<prefix><KEY>`.
ENV_PREFIXES: Final = dict(s3="AWS_", gcs="GOOGLE_", azure="AZURE_")
# The cache key: what never says which server answers (credentials, timings) is left out.
SECRET: Final = re.compile(r"secret|token|key|password|credential|authorization|cookie", re.I)
TIMING: Final = frozenset(k for k in CLIENT_KEYS if re.search(r"timeout|pool|keep_alive|frame|"
                          r"only|user_agent|content_type|randomize", k))  # fmt: skip
# Variables the HTTP client itself reads (proxies, trusted certificates) and Azurite's URL.
TRANSPORT_ENV: Final = frozenset(
    "HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY SSL_CERT_FILE SSL_CERT_DIR "
    "AZURITE_BLOB_STORAGE_URL".split()
)
NUMBERS: Final = frozenset({"max_retries", "retry_timeout"})  # wmtp's own: numbers welcome
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
    one that `location` lies under (none: the environment alone); `OptionError` for a mix, a
    key that is no string, or a value obstore does not take (say `5` or `None`)."""
    if not isinstance(storage_options, Mapping | None):
        raise OptionError(
            f"storage_options must be a mapping of option names to values, not "
            f"{type(storage_options).__name__} ({storage_options!r:.60}); e.g. "
            '{"region": "us-east-1"} (CLI: -o region=us-east-1)'
        )
    options = _named(dict(storage_options or {}), "storage_options")
    if not (prefixes := [k for k in options if "://" in k]):
        return _valued(options)
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
    return _valued(_named(dict(found), f"storage_options[{prefix!r}]"))


def _named(options: dict[Any, Any], where: str) -> dict[str, Any]:
    """`options`, unless a key is no string (`OptionError` naming it)."""
    if wrong := [k for k in options if not isinstance(k, str)]:
        raise OptionError(f"{where} has a key that is not an option name: {wrong[0]!r}")
    return options


def _valued(options: dict[str, Any]) -> dict[str, Any]:
    """`options`, unless a value is not one obstore takes (a string, a bool, a timedelta; a
    mapping for `default_headers`; a number for `NUMBERS`): `OptionError` naming its key."""
    for key, value in options.items():
        ok = str | bool | timedelta | (int | float if key in NUMBERS else str)
        ok |= Mapping if key == "default_headers" else str
        if not isinstance(value, ok):
            raise OptionError(
                f"storage option {key!r} is {value!r} ({type(value).__name__}); give a string, "
                f'e.g. {{"{key}": "..."}} (CLI: -o {key}=...), or leave the option out'
            )
    return options


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
    with translate(location):
        prefix = ENV_PREFIXES.get(obstore.parse_scheme(location.rstrip("/")), "")
    # obstore reads client settings from the environment only when given no client options.
    client = {k: v for k in CLIENT_KEYS if (v := os.environ.get(f"{prefix}{k.upper()}"))}
    named = {k: k.lower().removeprefix(prefix.lower()) for k in config}  # aws_allow_http...
    client |= {n: config.pop(k) for k, n in named.items() if n in CLIENT_KEYS}
    client = CLIENT_DEFAULTS | client
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
    stamps = _aws_files()
    files = [Path(f) for f, _ in stamps]
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


def _aws_files() -> tuple[tuple[str, int | None], ...]:
    """The AWS credentials and config files (`$AWS_SHARED_CREDENTIALS_FILE`, `$AWS_CONFIG_FILE`,
    default `~/.aws/credentials`, `~/.aws/config`), each with its mtime (None: missing)."""
    files = [
        Path(os.environ.get(var) or default).expanduser()
        for var, default in [
            ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
            ("AWS_CONFIG_FILE", "~/.aws/config"),
        ]
    ]
    return tuple((str(f), f.stat().st_mtime_ns if f.exists() else None) for f in files)


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
    except BotoCoreError as e:  # ConfigParseError: a file that is no INI file
        raise LookupError(f"cannot be read: {e}; fix that file's syntax") from None
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
                with tmp.open("xb+") as f:  # read back to be hashed
                    f.truncate(size)
                    ends = [min(s + PART_SIZE, size) for s in range(0, size, PART_SIZE)]
                    futures = [parts.submit(part, name, pins, f.fileno(), e) for e in ends]
                    # Each part is hashed (from the page cache) once it and those before it
                    # have landed, while the later ones download: the hash adds only its last
                    # part's time, not a second pass over the whole file after it.
                    sha = hashlib.sha256()

                    def hashed(i: int) -> None:  # only a file the manifest lists
                        if name in manifest:
                            sha.update(os.pread(f.fileno(), *_span(ends, i)))

                    _wait(futures, hashed)
                    os.fsync(f.fileno())
                check_digest(location, name, manifest, sha.hexdigest())
                tmp.replace(dest)
                fd = os.open(dest.parent, os.O_RDONLY)  # make the rename itself durable
                os.fsync(fd)
                os.close(fd)
            finally:
                tmp.unlink(missing_ok=True)

    return get


def check_hash(location: str, name: str, manifest: Mapping[str, FileEntry], path: Path) -> None:
    """Raise `IntegrityError` when the manifest lists `name` with another SHA-256 than `path`'s."""
    if name in manifest:
        with path.open("rb") as f:
            check_digest(location, name, manifest, hashlib.file_digest(f, "sha256").hexdigest())


def check_digest(location: str, name: str, manifest: Mapping[str, FileEntry], digest: str) -> None:
    """Raise `IntegrityError` when the manifest lists `name` with another SHA-256 than `digest`."""
    if (entry := manifest.get(name)) is not None and digest != entry.sha256:
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


def _span(ends: list[int], i: int) -> tuple[int, int]:
    """Length and offset of part `i` of a file cut at `ends`, as `os.pread` takes them."""
    start = ends[i - 1] if i else 0
    return ends[i] - start, start


def _wait(futures: list[Future[Any]], then: Callable[[int], object] = lambda i: None) -> None:
    """Each future's result in order, `then(i)` after the i-th; on a failure, cancel the rest."""
    try:
        for i, future in enumerate(futures):
            future.result()
            then(i)
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
    """`<location>-<hash>/<version>`: readable, unique per server and location (the hash of
    `_source`: trust in one server never carries to another), and per version of the object
    (its ETag, version id, or mtime and size)."""
    flat = options_for(location, options)
    state = (location, repr(sorted(flat.items())), sorted(os.environ.items()), _aws_files())
    if (source := _SOURCES.get(key := repr(state))) is None:  # a store takes milliseconds
        if len(_SOURCES) > 64:
            _SOURCES.clear()
        source = _SOURCES[key] = _source(location, flat)
    tag = meta.get("e_tag") or meta.get("version") or f"{meta['last_modified']}-{meta['size']}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", location.rstrip("/"))[:80]
    digest = hashlib.sha256(source.encode()).hexdigest()[:32]
    return f"{slug}-{digest}/{hashlib.sha256(str(tag).encode()).hexdigest()[:20]}"


_SOURCES: dict[str, str] = {}  # `_source` by the state it was made from


def _source(location: str, options: dict[str, Any]) -> str:
    """Which server answers for `location`, as JSON: its store as obstore configures it (the
    URL's parts, the options under any alias, the AWS profile's region, and the variables
    obstore reads that no option overrides, by obstore's own names), its client options and
    the HTTP client's variables; less credentials and timings."""
    store, env = open_remote(location, options), os.environ
    config = dict(getattr(store, "config", None) or {})
    prefix = ENV_PREFIXES.get(obstore.parse_scheme(location.rstrip("/")), "")
    for name, value in list(env.items()) if prefix else []:  # obstore's order: last wins
        # A client setting is read by `open_remote` and in `client_options`.
        client_key = name.removeprefix(prefix).lower() in CLIENT_KEYS
        if name.startswith(prefix) and not SECRET.search(name) and not client_key:
            config |= _environment(store, name, value)
    given = getattr(store, "client_options", None) or {}
    client = {k: v for k, v in given.items() if k not in TIMING}
    if isinstance(headers := client.get("default_headers"), Mapping):
        client["default_headers"] = {h: v for h, v in headers.items() if not SECRET.search(h)}
    found = {
        "store": type(store).__name__,
        "location": location.rstrip("/"),
        "url": getattr(store, "url", None),
        "config": {k: v for k, v in config.items() if not SECRET.search(k)},
        "client": client,
        "transport": {k: v for k, v in env.items() if k.upper() in TRANSPORT_ENV},
    }
    return json.dumps(found, sort_keys=True, default=str)


def _environment(store: Any, name: str, value: str) -> dict[str, str]:
    """What obstore makes of variable `name` for `store`: {} for a name it does not know or
    a setting the store's config overrides, else the setting, by obstore's name (the variable
    itself where obstore cannot say: the key then counts, never less)."""
    config = dict(store.config)
    try:
        probe = type(store)(config=config | {name: value})
    except UnknownConfigurationKeyError:
        return {}  # obstore ignores it too
    except BaseError as e:
        return {} if "Duplicate key" in str(e) else {name: value}  # duplicate: overridden
    except Exception:  # a value it refuses: count it as given
        return {name: value}
    return {k: v for k, v in probe.config.items() if k not in config}
