"""`save(model, dest)`: write a model folder that `load` reads back tensor for tensor."""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import obstore

from wmtp.errors import MetadataError, OptionError
from wmtp.metadata import CustomMTP, FileEntry, HuggingFace, Metadata, WmtpType
from wmtp.store import StorageOptions, join, open_store, translate

if TYPE_CHECKING:
    import torch


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
) -> Metadata:
    """Write `config.json`, `model.safetensors` (tied weights once), the model's module
    file for a custom model, and `metadata.json` (last, with the integrity manifest of
    the other files) into `dest`; with `tokenizer`, its files too, listed in
    `loading_strategy.tokenizer_files` for `wmtp.load_tokenizer`.

    A model whose class comes from transformers is saved for the `huggingface`
    loader (with `transformers_class` found from its architecture unless given);
    any other class for `custom_mtp`, with the file that defines it.

    Args:
        model: the model; it must carry a transformers config as `model.config`.
        dest: the folder to write (created if needed).
        wmtp_type, algorithm_compatibility, training_algorithm, base_architecture:
            written into the metadata as given.
        transformers_class: the Auto class for a transformers model.
        tokenizer: a transformers tokenizer (anything with `save_pretrained`), or None.

    Raises:
        MetadataError: the model has no `config`, or no Auto class builds it.
        OptionError: `tokenizer` has no `save_pretrained`.

    Example:
        >>> save(model, "out/mtp", wmtp_type="base_model", algorithm_compatibility=["baseline-mtp"])
    """
    from safetensors.torch import save_model

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise MetadataError(
            f"{type(model).__name__} has no transformers `config` attribute to save"
        )
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise OptionError(f"tokenizer= takes a transformers tokenizer, not {type(tokenizer)}")
    cls = type(model)
    config = copy.deepcopy(config)
    config.architectures = [cls.__name__]
    folder = Path(dest)
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
