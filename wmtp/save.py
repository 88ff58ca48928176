"""`save(model, dest)`: write a model folder that `load` reads back tensor for tensor."""

from __future__ import annotations

import copy
import errno
import hashlib
import inspect
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import obstore

from wmtp.errors import MetadataError, OptionError
from wmtp.location import PARALLEL, StorageOptions, join, local_root, translate
from wmtp.metadata import CustomMTP, FileEntry, HuggingFace, Metadata, WmtpType
from wmtp.store import open_store

if TYPE_CHECKING:
    import torch
    from obstore.store import ObjectStore

# An uploaded file larger than this goes up as a multipart upload of parts this size.
PART_SIZE: Final = 16 * 2**20


def save(
    model: torch.nn.Module,
    dest: str | os.PathLike[str],
    *,
    wmtp_type: WmtpType,
    algorithm_compatibility: Sequence[str],
    training_algorithm: str | None = None,
    base_architecture: str | None = None,
    transformers_class: str | None = None,
    tokenizer: Any = None,
    keep_overrides: bool = False,
    storage_options: StorageOptions | None = None,
    max_shard_size: int | str | None = None,
) -> Metadata:
    """Write `config.json`, `model.safetensors` (tied weights once), the model's module
    file for a custom model, and `metadata.json` (last, with the integrity manifest of
    the other files) into `dest`; with `tokenizer`, its files too, listed in
    `loading_strategy.tokenizer_files` for `wmtp.load_tokenizer`.

    A model whose class comes from transformers is saved for the `huggingface`
    loader (with `transformers_class` found from its architecture unless given);
    any other class for `custom_mtp`, with the file that defines it.

    The arguments, the destination and the model are checked before anything is written. In
    a folder, an existing model's metadata.json is removed first (durably), so a save cut
    short leaves no metadata over new files: `load` says it is missing, never loads a mix.
    A URL `load` takes (`s3://`, `gs://`, `az://`, `https://`) is written as a folder in a
    temporary directory (under `$TMPDIR`) first, then uploaded file by file: a file over
    `PART_SIZE` as a multipart upload, `PARALLEL` parts at once, aborted if it fails, and
    `metadata.json` last, so a reader never loads a half-uploaded model: an interrupted save
    leaves no `metadata.json`, or the previous one (whose manifest refuses a replaced file).

    A model from `load(..., parallelize=...)` (FSDP2 / DTensor parameters) is saved by every
    rank at once (a collective): each full tensor is gathered in turn and written by rank 0,
    so memory holds the largest tensor, not the model; the model's own class, config and module
    file are saved (not FSDP's wrapper class), and every rank returns rank 0's metadata.

    Args:
        model: the model; it must carry a transformers config as `model.config`.
        dest: the folder (created if needed; `~` is expanded) or URL to write.
        wmtp_type, algorithm_compatibility, training_algorithm, base_architecture:
            written into the metadata as given, once they decode as its fields do.
        transformers_class: the Auto class for a transformers model.
        tokenizer: a transformers tokenizer (anything with `save_pretrained`), or None.
        keep_overrides: write the settings `wmtp.load(config_overrides=...)` changed into
            config.json as they are now; by default they are saved as config.json had them.
        storage_options: obstore configuration for a URL, as for `wmtp.load`.
        max_shard_size: bytes, or "5GB", "200MB": cut the weights into shards of at most this
            size with a `model.safetensors.index.json` (as transformers does), all of them
            listed in `required_files`; None writes one `model.safetensors`.

    Raises:
        MetadataError: the model has no `config`, or no Auto class builds it.
        OptionError: an argument the metadata cannot hold (`wmtp_type="bogus"`, a string for
            `algorithm_compatibility`); an empty destination, or one that is a file or cannot
            be written; tensors on the meta device; a custom class defined in no .py file;
            `tokenizer` without `save_pretrained`; an invalid storage option or
            `max_shard_size`; a model loaded quantised (no exact checkpoint to write).
        FetchError: an upload failed (after the retries); it names the file's URL and cause.
        StoreAccessError: the store refused the credentials.
        ModelFileError: the store has no such bucket (container).

    Example:
        >>> save(model, "out/mtp", wmtp_type="base_model", algorithm_compatibility=["baseline-mtp"])
        >>> save(model, "s3://bucket/models/mtp-step-1000", wmtp_type="base_model",
        ...      algorithm_compatibility=["baseline-mtp"], storage_options={"region": "us-east-1"})
        >>> save(fsdp_model, "out/mtp", wmtp_type="base_model",  # on every rank (torchrun)
        ...      algorithm_compatibility=["baseline-mtp"], max_shard_size="200MB")
    """
    args = dict(locals())  # the arguments, for every rank's part of a collective save
    from wmtp.gather import original_class, save_collective, weight_names, write_weights
    from wmtp.quant import quantized

    if names := quantized(model):
        from wmtp.hints import quantized_save

        raise quantized_save(type(model).__name__, names)
    location = _destination(dest)
    _check_fields(
        wmtp_type=wmtp_type,
        algorithm_compatibility=algorithm_compatibility,
        training_algorithm=training_algorithm,
        base_architecture=base_architecture,
        **({} if transformers_class is None else {"transformers_class": transformers_class}),
    )
    if (answer := save_collective(model, lambda: save(**args))) is not None:
        return answer
    if (root := local_root(location)) is None:
        store = open_store(location, storage_options)  # a bad URL or option fails before work
        with tempfile.TemporaryDirectory(prefix="wmtp-save-") as staging:
            meta = save(
                model,
                staging,
                wmtp_type=wmtp_type,
                algorithm_compatibility=algorithm_compatibility,
                training_algorithm=training_algorithm,
                base_architecture=base_architecture,
                transformers_class=transformers_class,
                tokenizer=tokenizer,
                keep_overrides=keep_overrides,
                max_shard_size=max_shard_size,
            )
            for name in [*(meta.files or {}), "metadata.json"]:
                _upload(store, location, Path(staging), name)
        return meta
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise MetadataError(
            f"{type(model).__name__} has no transformers `config` attribute to save"
        )
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise OptionError(f"tokenizer= takes a transformers tokenizer, not {type(tokenizer)}")
    if meta_names := [k for k, t in model.state_dict().items() if t.is_meta]:
        raise OptionError(
            f"{type(model).__name__} has {len(meta_names)} tensor(s) on the meta device (first: "
            f"{meta_names[0]!r}), which hold no data to save; give them values first (e.g. "
            "wmtp.load(..., device='cpu'), or to_empty(device='cpu') and load a state dict)"
        )
    cls = original_class(model)  # FSDP2's `FSDP<name>` class is made on the fly by torch
    config = copy.deepcopy(config)
    if not keep_overrides:  # `load(config_overrides=...)` set them for a run, not for good
        for key, value in getattr(model, "wmtp_replaced_config", {}).items():
            setattr(config, key, value)
    config.architectures = [cls.__name__]
    folder, module_file = root, None  # `~` expanded, as `load` reads it
    files = ["config.json", *weight_names(model, max_shard_size)]
    if cls.__module__.startswith("transformers."):
        from wmtp.explain import auto_class_for

        auto = transformers_class or auto_class_for(cls.__name__, config.model_type)
        if auto is None:
            raise MetadataError(f"no transformers Auto class builds {cls.__name__}; pass one")
        strategy: CustomMTP | HuggingFace = HuggingFace(
            transformers_class=auto, required_files=tuple(files)
        )
    else:
        module_file = _module_file(cls)
        strategy = CustomMTP(
            model_class_name=cls.__name__,
            custom_module_file=module_file.name,
            required_files=(*files, module_file.name),
        )
    from safetensors import SafetensorError

    try:
        _invalidate(folder)  # from here on, no metadata.json describes the folder
        if module_file is not None:
            _write(folder / module_file.name, module_file.read_bytes())
        tokenizer_files = () if tokenizer is None else _save_tokenizer(tokenizer, folder)
        _write(folder / "config.json", config.to_json_string().encode())
        write_weights(model, folder, max_shard_size)
        strategy = msgspec.structs.replace(strategy, tokenizer_files=tokenizer_files)
        meta = Metadata(
            wmtp_type=wmtp_type,
            storage_version="2.0",
            loading_strategy=strategy,
            algorithm_compatibility=tuple(algorithm_compatibility),
            training_algorithm=training_algorithm,
            base_architecture=base_architecture or config.model_type,
            files=file_manifest(str(folder), (*strategy.required_files, *tokenizer_files)),
        )
        _write(folder / "metadata.json", encode_metadata(meta))
    except (OSError, SafetensorError) as e:
        raise _unwritable(folder, e) from None
    return meta


def _destination(dest: object) -> str:
    """`dest` as a string, unless it is empty or no path (`OptionError`)."""
    try:
        location = os.fsdecode(dest)  # type: ignore[arg-type]
    except TypeError:
        raise OptionError(
            f"save destination must be a folder or URL, not {type(dest).__name__} ({dest!r:.60})"
        ) from None
    if not location:
        raise OptionError("the save destination is empty; give a folder or URL ('.': here)")
    return location


def _check_fields(**given: Any) -> None:
    """`OptionError` unless each argument decodes as the metadata's field of its name (in
    `Metadata`, or `HuggingFace` for `transformers_class`), as `load` will decode it."""
    from wmtp.hints import readable

    fields = {f.name: f.type for s in (HuggingFace, Metadata) for f in msgspec.structs.fields(s)}
    for name, value in given.items():
        try:
            msgspec.convert(value, fields[name])
        except msgspec.ValidationError as e:
            where = str(e).replace(" - at `$", f" - at `$.{name}", 1)
            where += "" if " - at `$" in where else f" - at `$.{name}`"
            hint = isinstance(value, str) and name == "algorithm_compatibility"
            hint_text = f"; give a list of algorithm names, e.g. [{value!r}]" * hint
            raise OptionError(f"save({name}={value!r:.80}): {readable(where)}{hint_text}") from None


def _module_file(cls: type) -> Path:
    """The .py file that defines `cls`, which `load` will run to build it; `OptionError`
    for a class defined in no file (`python -c`, a notebook, the interpreter)."""
    try:
        path = Path(inspect.getfile(cls))
    except (TypeError, OSError):
        path = Path()
    if path.suffix != ".py" or not path.is_file():
        raise OptionError(
            f"{cls.__name__} (module {cls.__module__!r}) is defined in no .py file (`python -c`, "
            "a notebook or the interpreter), and load builds a custom model by running the "
            "module file saved with it: move the class into a .py file, import it from there"
        )
    return path


def _invalidate(folder: Path) -> None:
    """Create `folder`, and remove the metadata.json of a model there, durably, before any
    new file is written: a save cut short leaves no metadata over a mix of old and new."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(errno.EEXIST, "a file, not a folder", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.json").unlink(missing_ok=True)
    from wmtp.gather import sync_folder

    sync_folder(folder)  # the removal itself is durable before a new byte is written


def _unwritable(folder: Path, error: Exception) -> OptionError:
    """The error for a save destination that cannot be written, naming it and why."""
    if isinstance(error, NotADirectoryError | FileExistsError):
        above = next((p for p in [folder, *folder.parents] if p.exists()), folder)
        where = "is a file" if above == folder else f"lies under a file ({above})"
        return OptionError(f"save destination {folder} {where}, not a folder; give a folder")
    cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return OptionError(
        f"save destination {folder} cannot be written ({cause}); give a folder you can write to"
    )


def _save_tokenizer(tokenizer: Any, folder: Path) -> tuple[str, ...]:
    """Write the tokenizer's files into `folder` (each moved in whole); their names."""
    with tempfile.TemporaryDirectory(prefix=".tokenizer.", dir=folder) as tmp:
        tokenizer.save_pretrained(tmp)
        names = sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file())
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp, name).replace(folder / name)
    return tuple(names)


def _upload(store: ObjectStore, location: str, folder: Path, name: str) -> None:
    """Put `folder/name` at `location`; obstore sends a file over `PART_SIZE` in parts, `PARALLEL`
    at once, and aborts the multipart upload when a part or its completion fails."""
    with translate(join(location, name)):  # a missing bucket is named (`hints.store_error`)
        obstore.put(store, name, folder / name, chunk_size=PART_SIZE, max_concurrency=PARALLEL)


def _write(path: Path, data: bytes) -> None:
    """Write through a temporary name, so `path` is never seen half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def file_manifest(
    location: str, names: Sequence[str], storage_options: StorageOptions | None = None
) -> dict[str, FileEntry]:
    """Size and SHA-256 of each file, streamed through the store (local or remote).

    Example:
        >>> file_manifest("examples/tiny-mtp", ["config.json"])
        {'config.json': FileEntry(size=929, sha256='…')}
    """
    store, out = open_store(location, storage_options), {}
    for name in names:
        sha, size = hashlib.sha256(), 0
        with translate(join(location, name)):
            for chunk in obstore.get(store, name).stream(min_chunk_size=8 * 2**20):
                sha.update(chunk)
                size += len(chunk)
        out[name] = FileEntry(size=size, sha256=sha.hexdigest())
    return out


def encode_metadata(meta: Metadata) -> bytes:
    """The JSON bytes of `meta`, indented, fields in schema order."""
    return msgspec.json.format(msgspec.json.encode(meta), indent=2) + b"\n"
