"""`save(model, dest)`: write a model folder that `load` reads back tensor for tensor."""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import obstore

from wmtp.errors import MetadataError, ModelFileError, OptionError
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
) -> Metadata:
    """Write `config.json`, `model.safetensors` (tied weights once), the model's module
    file for a custom model, and `metadata.json` (last, with the integrity manifest of
    the other files) into `dest`; with `tokenizer`, its files too, listed in
    `loading_strategy.tokenizer_files` for `wmtp.load_tokenizer`.

    A model whose class comes from transformers is saved for the `huggingface`
    loader (with `transformers_class` found from its architecture unless given);
    any other class for `custom_mtp`, with the file that defines it.

    A URL `load` takes (`s3://`, `gs://`, `az://`, `https://`) is written as a folder in a
    temporary directory (under `$TMPDIR`) first, then uploaded file by file: a file over
    `PART_SIZE` as a multipart upload, `PARALLEL` parts at once, aborted if it fails, and
    `metadata.json` last, so a reader never loads a half-uploaded model: an interrupted save
    leaves no `metadata.json`, or the previous one (whose manifest refuses a replaced file).

    Args:
        model: the model; it must carry a transformers config as `model.config`.
        dest: the folder (created if needed) or URL to write.
        wmtp_type, algorithm_compatibility, training_algorithm, base_architecture:
            written into the metadata as given.
        transformers_class: the Auto class for a transformers model.
        tokenizer: a transformers tokenizer (anything with `save_pretrained`), or None.
        keep_overrides: write the settings `wmtp.load(config_overrides=...)` changed into
            config.json as they are now; by default they are saved as config.json had them.
        storage_options: obstore configuration for a URL, as for `wmtp.load`.

    Raises:
        MetadataError: the model has no `config`, or no Auto class builds it.
        OptionError: `tokenizer` has no `save_pretrained`, a storage option is invalid, or
            the model was loaded quantised (bitsandbytes' weights give no exact checkpoint).
        FetchError: an upload failed (after the retries); it names the file's URL and cause.
        StoreAccessError: the store refused the credentials.
        ModelFileError: the store has no such bucket (container).

    Example:
        >>> save(model, "out/mtp", wmtp_type="base_model", algorithm_compatibility=["baseline-mtp"])
        >>> save(model, "s3://bucket/models/mtp-step-1000", wmtp_type="base_model",
        ...      algorithm_compatibility=["baseline-mtp"], storage_options={"region": "us-east-1"})
    """
    from safetensors.torch import save_model

    from wmtp.quant import quantized

    if names := quantized(model):
        from wmtp.hints import quantized_save

        raise quantized_save(type(model).__name__, names)
    location = os.fspath(dest)
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
    cls = type(model)
    config = copy.deepcopy(config)
    if not keep_overrides:  # `load(config_overrides=...)` set them for a run, not for good
        for key, value in getattr(model, "wmtp_replaced_config", {}).items():
            setattr(config, key, value)
    config.architectures = [cls.__name__]
    folder = root if "://" in location else Path(location)  # a path as given, `~` and all
    folder.mkdir(parents=True, exist_ok=True)
    files = ["config.json", "model.safetensors"]
    if cls.__module__.startswith("transformers."):
        from wmtp.explain import auto_class_for

        auto = transformers_class or auto_class_for(cls.__name__, config.model_type)
        if auto is None:
            raise MetadataError(f"no transformers Auto class builds {cls.__name__}; pass one")
        strategy: CustomMTP | HuggingFace = HuggingFace(
            transformers_class=auto, required_files=tuple(files)
        )
    else:
        module_file = Path(inspect.getfile(cls))
        _write(folder / module_file.name, module_file.read_bytes())
        strategy = CustomMTP(
            model_class_name=cls.__name__,
            custom_module_file=module_file.name,
            required_files=(*files, module_file.name),
        )
    tokenizer_files = () if tokenizer is None else _save_tokenizer(tokenizer, folder)
    _write(folder / "config.json", config.to_json_string().encode())
    tmp = folder / f".model.safetensors.{os.getpid()}.tmp"
    save_model(model, str(tmp))
    tmp.chmod(0o644)  # safetensors creates it private; a model folder is meant to be shared
    tmp.replace(folder / "model.safetensors")
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
    return meta


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
    url = join(location, name)
    try:
        with translate(url):
            obstore.put(store, name, folder / name, chunk_size=PART_SIZE, max_concurrency=PARALLEL)
    except ModelFileError:  # the store answered "not found" to a PUT
        raise ModelFileError(f"{url} cannot be written: not found (no such bucket?)") from None


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
