"""The `metadata.json` schema (v2.0) as frozen msgspec Structs, `loading_strategy` a union tagged
by `loader_type`: the decoder enforces each loader's fields, paths and key mapping."""

import re
from typing import Annotated, ClassVar, Final, Literal

import msgspec

LoaderType = Literal["custom_mtp", "huggingface"]
WmtpType = Literal["base_model", "reference_model", "reward_model"]
SAFETENSORS, INDEX = ".safetensors", ".safetensors.index.json"
# A path inside the model folder: no '.', '..' or empty parts, no leading '/', no '\\' or ':'
# (drive letters, URLs), no control characters. Shard names in an index obey it too.
_PART: Final = r"(?!\.\.?(?:/|\Z))[^/\\:\x00-\x1f]+"
RelPath = Annotated[str, msgspec.Meta(pattern=rf"^{_PART}(?:/{_PART})*\Z")]
PyPath = Annotated[str, msgspec.Meta(pattern=rf"^{_PART}(?:/{_PART})*\.py\Z")]
Name = Annotated[str, msgspec.Meta(min_length=1)]


class Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Frozen, and a misspelt field is an error rather than a silently ignored key."""


class StateDictMapping(Strict, frozen=True, kw_only=True):
    """Checkpoint key -> model key: `remove_prefix`, then `key_transforms`, then `add_prefix`."""

    remove_prefix: str | None = None
    add_prefix: str | None = None
    key_transforms: dict[str, str | None] = {}  # full-key regex -> replacement; None drops

    def __post_init__(self) -> None:  # msgspec reports a ValueError with its JSON path
        for pattern, replacement in self.key_transforms.items():
            try:  # sub() checks the replacement against the pattern's groups before matching
                re.compile(pattern).sub(replacement or "", "")
            except (re.error, IndexError) as e:  # IndexError: an unknown \\g<name>
                raise ValueError(f"key_transforms {pattern!r} -> {replacement!r}: {e}") from None


class Strategy(Strict, frozen=True, kw_only=True, tag_field="loader_type"):
    """What every loader needs: the key mapping and the files to fetch."""

    state_dict_mapping: StateDictMapping = StateDictMapping()
    required_files: tuple[RelPath, ...]
    tokenizer_files: tuple[RelPath, ...] = ()  # beside the model, for `wmtp.load_tokenizer`
    keep_full_precision: tuple[Name, ...] = ()  # modules `load(quantization=)` leaves as they are

    def __post_init__(self) -> None:
        if twice := sorted({f for f in self.required_files if self.required_files.count(f) > 1}):
            raise ValueError(f"`required_files` lists {', '.join(twice)} more than once")
        for need in ("config.json", getattr(self, "custom_module_file", None) or "config.json"):
            if need not in self.required_files:  # custom_module_file: CustomMTP's
                raise ValueError(f"`required_files` must list {need}, to fetch it with the model")
        if not any(f.endswith((SAFETENSORS, INDEX)) for f in self.required_files):
            from wmtp.hints import no_checkpoint

            raise ValueError(no_checkpoint(self.required_files))


class CustomMTP(Strategy, frozen=True, kw_only=True, tag="custom_mtp"):
    """A model whose class is defined in the folder's own module."""

    loader_type: ClassVar[LoaderType] = "custom_mtp"  # the tag, as an attribute
    model_class_name: Name
    custom_module_file: PyPath
    transformers_class: None = None


class HuggingFace(Strategy, frozen=True, kw_only=True, tag="huggingface"):
    """A transformers model built by an Auto class from `config.json`."""

    loader_type: ClassVar[LoaderType] = "huggingface"
    transformers_class: Name
    model_class_name: None = None
    custom_module_file: None = None


LoadingStrategy = CustomMTP | HuggingFace


class FileEntry(Strict, frozen=True, kw_only=True):
    """A file's expected size in bytes and SHA-256 (hex), from the integrity manifest."""

    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class Metadata(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A model folder's `metadata.json`; descriptive fields other tools wrote are kept aside."""

    wmtp_type: WmtpType
    training_algorithm: str | None = None
    base_architecture: str | None = None
    storage_version: Literal["2.0"]
    loading_strategy: LoadingStrategy
    algorithm_compatibility: tuple[str, ...]
    files: dict[RelPath, FileEntry] | None = None  # integrity manifest, checked when present
    horizon: int | None = None
    n_heads: int | None = None
    model_size: str | None = None
    created_by: str | None = None
    standardization_date: str | None = None
    original_format: str | None = None
    source_path: str | None = None


def decode_metadata(data: bytes, *, source: str) -> Metadata:
    """Decode and validate the bytes of a `metadata.json` that came from `source`.

    Raises:
        MetadataError: malformed JSON, or a wrong type, value, path or key mapping; the
            message gives the file, the JSON path and what to write instead.

    Example:
        >>> decode_metadata(Path("m/metadata.json").read_bytes(), source="m/metadata.json")
        Metadata(wmtp_type='base_model', ...)
    """
    try:
        return msgspec.json.decode(data, type=Metadata)
    except msgspec.MsgspecError as e:
        from wmtp.hints import metadata_error

        raise metadata_error(e, source) from None


def serves(meta: Metadata | str, algo: str, role: str | None) -> bool:
    """Whether `meta` (a str: why it is unreadable) lists `algo` and is `role` (any, if None)."""
    if isinstance(meta, str):
        return False
    return algo in meta.algorithm_compatibility and role in (None, meta.wmtp_type)
