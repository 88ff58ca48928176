"""The `metadata.json` schema (storage version 2.0) and its decoder.

The metadata is the only thing that decides how a model loads: which loader,
which class, which key mapping and which files. Nothing is guessed from the
files a folder happens to contain.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from typing import Final, Literal, get_args

import msgspec

from wmtp.errors import MetadataError

LoaderType = Literal["custom_mtp", "huggingface"]
WmtpType = Literal["base_model", "reference_model", "reward_model"]
StorageVersion = Literal["2.0"]


class Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Frozen, and a misspelt field is an error rather than a silently ignored key."""


class StateDictMapping(Strict, frozen=True, kw_only=True):
    """Checkpoint key -> model key: `remove_prefix`, then `key_transforms`, then `add_prefix`."""

    remove_prefix: str | None = None
    add_prefix: str | None = None
    # Full-key regular expression -> replacement (groups allowed); None drops the key.
    key_transforms: dict[str, str | None] = {}


class LoadingStrategy(Strict, frozen=True, kw_only=True):
    """How to build the model and which files it needs."""

    loader_type: LoaderType
    model_class_name: str | None = None
    custom_module_file: str | None = None
    transformers_class: str | None = None
    state_dict_mapping: StateDictMapping = StateDictMapping()
    required_files: tuple[str, ...]


class FileEntry(Strict, frozen=True, kw_only=True):
    """A file's expected size in bytes and SHA-256 (hex), from the integrity manifest."""

    size: int
    sha256: str


class Metadata(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A model folder's `metadata.json`.

    Descriptive fields other tools wrote are accepted and kept out of the way;
    everything under `loading_strategy` is checked strictly.
    """

    wmtp_type: WmtpType
    training_algorithm: str | None = None
    base_architecture: str | None = None
    storage_version: StorageVersion
    loading_strategy: LoadingStrategy
    algorithm_compatibility: tuple[str, ...]
    # Integrity manifest: file name -> size and sha256; checked when present.
    files: dict[str, FileEntry] | None = None
    horizon: int | None = None
    n_heads: int | None = None
    model_size: str | None = None
    created_by: str | None = None
    standardization_date: str | None = None
    original_format: str | None = None
    source_path: str | None = None


# Fields each loader needs beyond the common ones, checked after decoding.
REQUIRED_FIELDS: Final[dict[LoaderType, tuple[str, ...]]] = {
    "custom_mtp": ("model_class_name", "custom_module_file"),
    "huggingface": ("transformers_class",),
}

# Allowed values of each enumerated field, for error messages that list them.
_CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "$.wmtp_type": get_args(WmtpType),
    "$.storage_version": get_args(StorageVersion),
    "$.loading_strategy.loader_type": get_args(LoaderType),
}

EXAMPLE_STRATEGY: Final = """\
  "loading_strategy": {
    "loader_type": "huggingface",
    "transformers_class": "AutoModelForCausalLM",
    "state_dict_mapping": {"remove_prefix": null, "add_prefix": null, "key_transforms": {}},
    "required_files": ["config.json", "model.safetensors"]
  },
  "algorithm_compatibility": ["rho1-wmtp"]"""

_decode: Final = msgspec.json.Decoder(Metadata).decode


def decode_metadata(data: bytes, *, source: str) -> Metadata:
    """Decode and validate the bytes of a `metadata.json`.

    Args:
        data: the file's content.
        source: where it came from (a path or URL), named in every error.

    Raises:
        MetadataError: malformed JSON, a wrong type or value (with its JSON path),
            a missing `loading_strategy`, a field the loader needs left empty, or a
            file path that escapes the model folder.

    Example:
        >>> meta = decode_metadata(Path("m/metadata.json").read_bytes(), source="m/metadata.json")
        >>> meta.loading_strategy.loader_type
        'custom_mtp'
    """
    try:
        meta = _decode(data)
    except msgspec.ValidationError as e:
        raise MetadataError(_explain(str(e), source)) from None
    except msgspec.DecodeError as e:
        raise MetadataError(f"{source}: not valid JSON: {e}") from None
    _check_strategy(meta.loading_strategy, meta.files or {}, source)
    return meta


def _explain(message: str, source: str) -> str:
    if "missing required field `loading_strategy`" in message:
        return (
            f"{source} has no `loading_strategy`, so there is no way to know how to load "
            "this model (wmtp never guesses from the files present). Add one, for example:\n"
            f"{EXAMPLE_STRATEGY}\n"
            "with loader_type `custom_mtp` (plus model_class_name and custom_module_file) "
            "for a model defined in the folder's own module."
        )
    if " - at `" not in message:
        message += " - at `$`"  # msgspec leaves out the path when it is the root object
    hint = ""
    if message.startswith("Invalid enum value") and (m := re.search(r"at `(\$[^`]*)`", message)):
        hint = f"; expected one of {', '.join(map(repr, _CHOICES.get(m.group(1), ())))}"
    return f"{source}: {message}{hint}"


def _check_strategy(
    strategy: LoadingStrategy, manifest: Mapping[str, FileEntry], source: str
) -> None:
    at = "$.loading_strategy"
    for field in REQUIRED_FIELDS[strategy.loader_type]:
        if not getattr(strategy, field):
            raise MetadataError(
                f"{source}: `{at}.{field}` is required when loader_type is "
                f"{strategy.loader_type!r}; set it (e.g. {_FIELD_EXAMPLES[field]})"
            )
    files = [(f"{at}.required_files[{i}]", name) for i, name in enumerate(strategy.required_files)]
    if strategy.custom_module_file is not None:
        files.append((f"{at}.custom_module_file", strategy.custom_module_file))
    for path, name in files:
        _check_relative(name, path, source)
    for name in manifest:
        _check_relative(name, f"$.files[{name!r}]", source)
    if strategy.custom_module_file not in (None, *strategy.required_files):
        raise MetadataError(
            f"{source}: custom_module_file {strategy.custom_module_file!r} is not listed in "
            f"`{at}.required_files`; add it there so it is fetched with the model"
        )
    for pattern in strategy.state_dict_mapping.key_transforms:
        try:
            re.compile(pattern)
        except re.error as e:
            raise MetadataError(
                f"{source}: `{at}.state_dict_mapping.key_transforms` pattern {pattern!r} "
                f"is not a valid regular expression: {e}"
            ) from None


_FIELD_EXAMPLES: Final = {
    "model_class_name": '"model_class_name": "DistilGPT2MTP"',
    "custom_module_file": '"custom_module_file": "modeling.py"',
    "transformers_class": '"transformers_class": "AutoModelForCausalLM"',
}


def _check_relative(name: str, json_path: str, source: str) -> None:
    normal = posixpath.normpath(name)
    if (
        not name
        or name.startswith(("/", "\\"))
        or re.match(r"^[A-Za-z]:", name)
        or "\\" in name
        or normal == ".."
        or normal.startswith("../")
    ):
        raise MetadataError(
            f"{source}: `{json_path}` is {name!r}, which is not a path inside the model "
            "folder; name files relative to the folder, without '..' or a leading '/'"
        )


def encode_metadata(meta: Metadata) -> bytes:
    """The JSON bytes of `meta`, indented, fields in schema order."""
    return msgspec.json.format(msgspec.json.encode(meta), indent=2) + b"\n"
