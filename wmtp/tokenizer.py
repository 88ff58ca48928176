"""`load_tokenizer`: the tokenizer stored beside a model, from the files its metadata lists."""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any

from wmtp.errors import MetadataError, ModelFileError
from wmtp.location import StorageOptions, join
from wmtp.store import fetch, heads, read_metadata

SAVED = '["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]'


def load_tokenizer(
    location: str | os.PathLike[str],
    *,
    storage_options: StorageOptions | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """`transformers.AutoTokenizer` of the files `loading_strategy.tokenizer_files` lists,
    fetched and cached like the weights and hashed against the manifest; never from a hub,
    and no code is run (`trust_remote_code=False`).

    Args:
        location: model folder or URL.
        storage_options, cache_dir: as for `wmtp.load`.

    Raises:
        MetadataError: no tokenizer files are listed, or transformers refuses them.
        ModelFileError: listed files are missing (`problems`: one per file).
        IntegrityError: a file's size or SHA-256 differs from the manifest.

    Example:
        >>> load_tokenizer("models/mtp")("some text").input_ids
        [1, 40, 12, 2]
    """
    from transformers.models.auto.tokenization_auto import AutoTokenizer  # no lazy import race

    meta = read_metadata(location := os.fspath(location), storage_options=storage_options)
    if not (names := meta.loading_strategy.tokenizer_files):
        raise MetadataError(
            f"{join(location, 'metadata.json')}: `$.loading_strategy.tokenizer_files` is empty; "
            f"list the tokenizer's files there (e.g. {SAVED}), or save the model with "
            "wmtp.save(..., tokenizer=tok), which writes and lists them"
        )
    if missing := [n for n, found in heads(location, names, storage_options).items() if not found]:
        error = ModelFileError(f"tokenizer file(s) {', '.join(missing)} not found at {location}")
        error.problems = tuple(
            f"tokenizer file {join(location, n)} does not exist; add it, or remove it from "
            "loading_strategy.tokenizer_files"
            for n in missing
        )
        raise error
    options: dict[str, Any] = {"storage_options": storage_options, "cache_dir": cache_dir}
    paths = fetch(location, names, manifest=meta.files, verify=True, progress=False, **options)
    # Remote files lie in per-version cache folders: show transformers the listed files alone.
    with tempfile.TemporaryDirectory(prefix="wmtp-tokenizer-") as tmp:
        for name, path in paths.items():
            (link := Path(tmp, name)).parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.absolute())
        folder = Path(tmp, posixpath.commonpath([posixpath.dirname(n) for n in names]))
        try:
            tok = AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False
            )
        except Exception as e:  # transformers raises many kinds
            raise MetadataError(
                f"transformers' AutoTokenizer refuses the tokenizer at {location} "
                f"({', '.join(names)}): {type(e).__name__}: {e}"
            ) from e
    tok.name_or_path = location  # not the temporary folder, gone now
    return tok
