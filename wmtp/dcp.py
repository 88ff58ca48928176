"""A checkpoint folder's files: `checkpoint.json` (written last: a folder without it is no
checkpoint), DCP's own files fetched to one local folder, and DCP's reader and planner set so
that nothing in a checkpoint runs as code (its `.metadata` pickle builds only DCP's records;
values that are not tensors go through `torch.load(weights_only=True)`). Shared by
`wmtp.checkpoint` (save, resume) and `wmtp.export` (a checkpoint's weights as a model folder)."""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec

from wmtp.errors import IntegrityError, MetadataError, ModelFileError, WmtpError
from wmtp.location import StorageOptions, join, local_root, translate
from wmtp.metadata import RelPath
from wmtp.store import read_file

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata as DcpMetadata

MARKER: Final = "checkpoint.json"
DCP_METADATA: Final = ".metadata"
VERSION: Final = 1
NO_GROUP: Final = "torch.distributed is disabled"  # DCP's warning: one process is a use here


class CheckpointInfo(msgspec.Struct, frozen=True, kw_only=True):
    """`checkpoint.json`: written last, so a folder that has it holds a complete checkpoint."""

    format: Literal["wmtp-checkpoint"] = "wmtp-checkpoint"
    version: int = VERSION
    step: int
    epoch: int
    extra: dict[str, Any]
    world_size: int  # the ranks that saved it (any world size loads it)
    model: str  # the class of the model saved
    optimizer: str | None  # the class of the optimizer saved; None: the model alone
    files: dict[RelPath, int]  # every other file of the checkpoint -> its size in bytes


_decode_info: Final = msgspec.json.Decoder(CheckpointInfo).decode


@contextmanager
def dcp_errors(what: str) -> Iterator[None]:
    """DCP's failures (its `CheckpointException` gathers every rank's) as a `WmtpError`; its
    warning that there is no process group (one process is a case wmtp serves) silenced."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", NO_GROUP, UserWarning)
            yield
    except WmtpError:
        raise
    except Exception as e:
        cause = str(e).strip().splitlines()
        raise WmtpError(f"{what} failed: {type(e).__name__}: {' '.join(cause)[:2000]}") from e


def read_info(location: str, options: StorageOptions | None) -> CheckpointInfo | None:
    """The `checkpoint.json` of `location`, or None when there is none."""
    source = join(location, MARKER)
    try:
        if (root := local_root(location)) is not None:
            with translate(source):
                data = (root / MARKER).read_bytes() if (root / MARKER).is_file() else None
        else:
            data = read_file(location, MARKER, options)
    except ModelFileError:
        return None
    if data is None:
        return None
    try:
        return _decode_info(data)
    except msgspec.MsgspecError as e:
        raise MetadataError(f"{source}: not a wmtp checkpoint.json: {e}") from None


def fetch_files(
    location: str, options: StorageOptions | None
) -> tuple[CheckpointInfo, Path, Path | None]:
    """The checkpoint's `checkpoint.json`, a local folder of its files (for a bucket: links to
    the cached downloads, in a temporary folder returned third for removal), every file there
    at its size."""
    from wmtp.store import fetch

    info = read_info(location, options)
    if info is None:
        raise ModelFileError(
            f"{location} holds no complete checkpoint: {MARKER} is missing (a save that did not "
            "finish, or not a checkpoint folder); use wmtp.latest_checkpoint(root) to find one"
        )
    names = sorted(info.files)
    if DCP_METADATA not in info.files:
        raise MetadataError(f"{join(location, MARKER)}: `files` does not list {DCP_METADATA}")
    if (root := local_root(location)) is not None:
        missing = {n: None for n in names if not (root / n).is_file()}
        if missing:
            from wmtp.hints import missing_files

            raise missing_files(location, dict.fromkeys(names, True) | missing)
        paths, links = {n: root / n for n in names}, None
    else:
        paths = fetch(location, names, storage_options=options)
        links = Path(tempfile.mkdtemp(prefix="wmtp-ckpt-"))
        for name, path in paths.items():
            (links / name).symlink_to(path.resolve())
    for name, size in info.files.items():
        if (have := paths[name].stat().st_size) != size:
            if links is not None:
                shutil.rmtree(links, ignore_errors=True)
            raise IntegrityError(
                f"{join(location, name)} has {have} bytes, but {MARKER} says {size}: the file "
                "is truncated or was replaced; resume from another checkpoint"
            )
    return info, (root if links is None else links), links  # type: ignore[return-value]


# DCP's `.metadata` is a pickle: read with only these callables, which build records, not code.
_SAFE_MODULES: Final = tuple(
    f"torch.distributed.checkpoint.{m}" for m in ("metadata", "filesystem", "planner")
)
_SAFE_NAMES: Final = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                      ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                      ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                      ("pathlib", "PureWindowsPath")}  # fmt: skip


class _Unpickler(pickle.Unpickler):
    """Builds DCP's metadata records (dataclasses, enums), torch dtypes, layouts, memory
    formats and sizes, and nothing else: a pickle naming any other callable is refused."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        found = getattr(import_module(module), name, None) if module in _MODULES_OK else None
        if (module, name) in _SAFE_NAMES:
            return getattr(import_module(module), name)
        record = isinstance(found, type) and (
            dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)
        )
        if module in _SAFE_MODULES and record:
            return found
        if module == "torch" and isinstance(
            found, torch.dtype | torch.layout | torch.memory_format
        ):
            return found
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint record")


_MODULES_OK: Final = {*_SAFE_MODULES, "torch"}


def read_dcp_metadata(path: Path, source: str) -> DcpMetadata:
    """DCP's `.metadata` at `path` (named `source` in errors), read without running code.

    Args:
        path: the local file; source: its name (path or URL) for messages.

    Raises:
        MetadataError: not DCP metadata, or a pickle that names anything but DCP's records.

    Example:
        >>> read_dcp_metadata(Path("ckpt/step-1/.metadata"), "ckpt/step-1/.metadata")
        Metadata(state_dict_metadata={...}, ...)
    """
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with translate(source), path.open("rb") as f:
            found = _Unpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise MetadataError(f"{source}: not DCP checkpoint metadata, refused: {e}") from None
    if not isinstance(found, Metadata):
        raise MetadataError(f"{source}: not DCP checkpoint metadata ({type(found).__name__})")
    return found


def dcp_reader(folder: Path, source: str) -> Any:
    """DCP's `FileSystemReader` on `folder`, its `.metadata` read by `read_dcp_metadata` once."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        cached: Any = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> DcpMetadata:
            if self.cached is None:
                self.cached = read_dcp_metadata(folder / DCP_METADATA, join(source, DCP_METADATA))
            if getattr(self.cached, "storage_meta", None) is None:
                self.cached.storage_meta = StorageMeta()
            self.cached.storage_meta.load_id = self.load_id
            return self.cached  # type: ignore[no-any-return]

    return Reader(str(folder))


def safe_planner() -> Any:
    """DCP's default load planner, its non-tensor values read by `torch.load(weights_only=True)`
    (DCP's own reads them with `weights_only=False`, which runs any pickle)."""
    import torch
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                found = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                fqn = read_item.dest_index.fqn
                raise MetadataError(f"{fqn}: a value that would run code, refused: {e}") from None
            if self.flatten_state_dict:
                set_element(
                    self.original_state_dict, self.mappings[read_item.dest_index.fqn], found
                )
            else:
                self.state_dict[read_item.dest_index.fqn] = found

    return Planner()


def signature(value: Any) -> tuple[Any, ...] | None:
    """(shape, dtype) of a tensor, None for other values."""
    import torch

    if isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype).removeprefix("torch.")
    return None


def stored_keys(saved: DcpMetadata, prefix: str) -> dict[str, tuple[Any, ...] | None]:
    """The keys under `prefix` in DCP's metadata: (shape, dtype) of tensors, None of others."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out: dict[str, tuple[Any, ...] | None] = {}
    for key, item in saved.state_dict_metadata.items():
        if key.startswith(prefix):
            sig = None
            if isinstance(item, TensorStorageMetadata):
                sig = tuple(item.size), str(item.properties.dtype).removeprefix("torch.")
            out[key.removeprefix(prefix)] = sig
    return out
