"""`migrate`: propose v2 metadata for a folder written before `loading_strategy` existed,
or a plain Hugging Face folder, from explicit evidence only.

Evidence: config.json's `architectures`; a class of that name defined (read with
`ast`, not run) in a `.py` file of the folder; the safetensors and tokenizer files
present; and the key mapping under which the checkpoint's keys fit the model exactly,
found by a dry run. Anything the evidence does not settle is an error that
says what to add.
"""

from __future__ import annotations

import ast
import difflib
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import obstore

from wmtp.check import plan_from_headers
from wmtp.errors import MetadataError, ModelFileError, WeightsError
from wmtp.explain import auto_class_for
from wmtp.location import StorageOptions, join, local_root, translate
from wmtp.metadata import (
    INDEX,
    CustomMTP,
    HuggingFace,
    LoadingStrategy,
    Metadata,
    StateDictMapping,
    WmtpType,
)
from wmtp.save import encode_metadata, file_manifest
from wmtp.store import fetch, open_store, read_file
from wmtp.weights import checkpoint_names

if TYPE_CHECKING:
    from obstore import UpdateVersion

# Descriptive fields an old metadata.json may already carry: every schema field but those
# migrate itself decides.
_DECIDED = {"wmtp_type", "storage_version", "loading_strategy", "algorithm_compatibility", "files"}
_CARRIED = tuple(f.name for f in msgspec.structs.fields(Metadata) if f.name not in _DECIDED)
# The files transformers' tokenizers save; those present become `tokenizer_files`.
TOKENIZER_FILES = frozenset(
    "tokenizer.json tokenizer_config.json special_tokens_map.json vocab.json merges.txt "
    "tokenizer.model vocab.txt added_tokens.json".split()
)


class Migration(msgspec.Struct, frozen=True):
    """A proposed metadata.json, next to what was there."""

    location: str
    old: str | None  # the old metadata.json text, None if there was none
    new: str  # the proposed text
    notes: tuple[str, ...]  # what the user should know or still decide


def migration_diff(migration: Migration) -> str:
    """The proposal as a unified diff against the old file."""
    lines = difflib.unified_diff(
        (migration.old or "").splitlines(keepends=True),
        migration.new.splitlines(keepends=True),
        fromfile="metadata.json" if migration.old is not None else "/dev/null",
        tofile="metadata.json (proposed)",
    )
    return "".join(lines)


def migrate(
    location: str | os.PathLike[str],
    *,
    wmtp_type: WmtpType | None = None,
    algorithms: Sequence[str] = (),
    storage_options: StorageOptions | None = None,
    trust_code: bool = False,
    cache_dir: str | None = None,
) -> Migration:
    """Propose v2 metadata (with a manifest) for the folder at `location`.

    Args:
        location: model folder or URL.
        wmtp_type: the model's role, when the old metadata does not say it.
        algorithms: `algorithm_compatibility` to set (added to any already listed).
        storage_options: obstore configuration for a remote folder.
        trust_code: allow a remote folder's module to be imported for the key check.
        cache_dir: where remote files (module, shard index) are cached.

    Raises:
        MetadataError: the evidence does not settle the class, the role or the key mapping.
        ModelFileError: no config.json or no safetensors checkpoint.

    Example:
        >>> print(migration_diff(migrate("old/distilgpt2", algorithms=["rho1-wmtp"])))
    """
    names = _top_level_names(location := os.fspath(location), storage_options)
    old_text = (
        _read_text(location, "metadata.json", storage_options) if "metadata.json" in names else None
    )
    old: dict[str, Any] = msgspec.json.decode(old_text) if old_text else {}
    if "config.json" not in names:
        raise ModelFileError(
            f"{join(location, 'config.json')} does not exist; it says which class to build"
        )
    config = msgspec.json.decode(read_file(location, "config.json", storage_options))
    strategy = _strategy(location, names, config, storage_options)
    tokenizer = tuple(n for n in names if n in TOKENIZER_FILES)
    strategy = msgspec.structs.replace(strategy, tokenizer_files=tokenizer)
    role = old.get("wmtp_type") or wmtp_type
    if role is None:
        raise MetadataError(
            f"{location}: nothing says this model's role; pass wmtp_type "
            "(CLI: --role base_model|reference_model|reward_model)"
        )
    served = tuple(dict.fromkeys([*old.get("algorithm_compatibility", []), *algorithms]))
    notes = (
        []
        if served
        else [
            "algorithm_compatibility is empty: resolve() will never choose this "
            "model; pass the algorithms it serves (CLI: --algorithm NAME)"
        ]
    )
    carried = {k: old[k] for k in _CARRIED if k in old}
    carried.setdefault("base_architecture", config.get("model_type"))
    meta = Metadata(
        wmtp_type=role,
        storage_version="2.0",
        loading_strategy=strategy,
        algorithm_compatibility=served,
        **carried,
    )
    options: dict[str, Any] = {"storage_options": storage_options, "cache_dir": cache_dir}
    fitted = _fitted(location, meta, trust_code, options, notes)
    meta = msgspec.structs.replace(meta, loading_strategy=fitted)
    indexes = [n for n in fitted.required_files if n.endswith(INDEX)]
    shards = checkpoint_names(indexes, fetch(location, indexes, progress=False, **options))
    files = list(dict.fromkeys([*fitted.required_files, *shards, *tokenizer]))
    meta = msgspec.structs.replace(meta, files=file_manifest(location, files, storage_options))
    dropped = sorted(set(old) - set(msgspec.structs.asdict(meta)) - {"loading_strategy"})
    if dropped:
        notes.append(f"fields the v2 schema does not have are left out: {', '.join(dropped)}")
    return Migration(location, old_text, encode_metadata(meta).decode(), tuple(notes))


def write_migration(migration: Migration, *, storage_options: StorageOptions | None = None) -> str:
    """Write the proposed metadata.json, keeping the old one as `metadata.json.<time>.bak`.

    A local file is replaced atomically; a remote one is put only if it is still the
    version read (a conditional put on its ETag, and on its version where the store gives one:
    GCS's generation), so a concurrent change is not lost.

    Returns:
        The backup's location, or "" when there was no old file.
    """
    location, store = migration.location, open_store(migration.location, storage_options)
    backup = f"metadata.json.{time.strftime('%Y%m%dT%H%M%S')}.bak"
    new = migration.new.encode()
    with translate(join(location, "metadata.json")):
        if migration.old is None:
            obstore.put(store, "metadata.json", new, mode="create")
            return ""
        got = obstore.get(store, "metadata.json")  # content and ETag of one and the same version
        current = bytes(got.bytes()).decode()
        if current != migration.old:
            raise MetadataError(
                f"{join(location, 'metadata.json')} changed since it was read; migrate again"
            )
        obstore.put(store, backup, migration.old.encode(), mode="create")
        root = local_root(location)
        if root is not None:  # LocalStore has no conditional put; a rename is atomic
            tmp = root / f".metadata.json.{time.time_ns()}.tmp"
            tmp.write_bytes(new)
            tmp.replace(root / "metadata.json")
        else:  # GCS conditions a put on the version (generation), the others on the ETag
            if not (etag := got.meta["e_tag"]):
                raise MetadataError(
                    f"{join(location, 'metadata.json')}: the store gives no ETag, so it cannot "
                    "be replaced only-if-unchanged; write the proposal by hand"
                )
            mode: UpdateVersion = {"e_tag": etag}
            if version := got.meta["version"]:  # obstore takes no None for it
                mode["version"] = version
            obstore.put(store, "metadata.json", new, mode=mode)
    return join(location, backup)


def _strategy(
    location: str,
    names: Sequence[str],
    config: dict[str, Any],
    storage_options: StorageOptions | None,
) -> LoadingStrategy:
    archs = config.get("architectures") or []
    if not archs:
        raise MetadataError(
            f"{join(location, 'config.json')} has no `architectures`; "
            "add the model's class name there"
        )
    arch = archs[0]
    # An index names its shards; without one, exactly one safetensors file must be there.
    weights = [n for n in names if n.endswith(INDEX)] or [
        n for n in names if n.endswith(".safetensors")
    ]
    if len(weights) != 1:
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
        why = f" ({', '.join(pickles)} must be converted: wmtp loads no pickles)" if pickles else ""
        found = (
            f"{len(weights)} safetensors files and no index"
            if weights
            else "no safetensors checkpoint"
        )
        raise ModelFileError(
            f"{location}: {found}{why}; wmtp needs one checkpoint or a shard index"
        )
    files = ("config.json", weights[0])
    modules = [
        n for n in names if n.endswith(".py") and arch in _classes(location, n, storage_options)
    ]
    if modules:
        return CustomMTP(
            model_class_name=arch,
            custom_module_file=modules[0],
            required_files=(*files, modules[0]),
        )
    auto = auto_class_for(arch, str(config.get("model_type")))
    if auto is None:
        raise MetadataError(
            f"{join(location, 'config.json')} names {arch}, which no .py file of the folder "
            "defines and no transformers Auto class builds; add the module that defines it"
        )
    return HuggingFace(transformers_class=auto, required_files=files)


def _fitted(
    location: str, meta: Metadata, trust_code: bool, options: dict[str, Any], notes: list[str]
) -> LoadingStrategy:
    """The strategy with the key mapping under which the checkpoint fits the model."""
    try:
        plan_from_headers(location, meta, trust_code, options)
        return meta.loading_strategy
    except WeightsError as e:
        if not isinstance(e.fix, StateDictMapping):
            raise MetadataError(f"no key mapping makes the checkpoint fit:\n{e}") from None
        fixed = msgspec.structs.replace(meta.loading_strategy, state_dict_mapping=e.fix)
        plan_from_headers(
            location, msgspec.structs.replace(meta, loading_strategy=fixed), trust_code, options
        )
        mapping = msgspec.json.encode(e.fix).decode()
        notes.append(f"the checkpoint's keys fit with state_dict_mapping {mapping}")
        return fixed


def _top_level_names(location: str, storage_options: StorageOptions | None) -> list[str]:
    store = open_store(location, storage_options)
    with translate(location):
        listing = obstore.list_with_delimiter(store)
    return sorted(str(o["path"]).rsplit("/", 1)[-1] for o in listing["objects"])


def _read_text(location: str, name: str, storage_options: StorageOptions | None) -> str:
    return read_file(location, name, storage_options).decode()


def _classes(location: str, name: str, storage_options: StorageOptions | None) -> set[str]:
    """Names of the classes a Python file defines at top level (parsed, not run)."""
    try:
        tree = ast.parse(read_file(location, name, storage_options))
    except SyntaxError:
        return set()
    return {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
