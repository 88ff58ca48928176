"""`resolve(algo, paths)`: pick the model that serves a training algorithm, by metadata alone."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import get_args

from wmtp.errors import MetadataError, NoCompatibleModelError, WmtpError
from wmtp.load import read_metadata
from wmtp.metadata import Metadata, WmtpType
from wmtp.store import StorageOptions


def resolve(
    algo: str,
    paths: Sequence[str],
    *,
    role: WmtpType | None = None,
    storage_options: StorageOptions | None = None,
) -> str:
    """The first of `paths`, in the order given, whose metadata lists `algo`.

    Only each candidate's `metadata.json` is read, all at once.

    Args:
        algo: a training algorithm, e.g. "critic-wmtp".
        paths: candidate model locations.
        role: also require this `wmtp_type` ("base_model", "reference_model", "reward_model").
        storage_options: obstore configuration for remote candidates.

    Raises:
        NoCompatibleModelError: no candidate fits; the message gives each one's reason
            and a close algorithm name when `algo` looks like a typo.
        MetadataError: `role` is not a known wmtp_type.

    Example:
        >>> resolve("critic-wmtp", ["models/mtp", "models/rm"], role="reward_model")
        'models/rm'
    """
    if role is not None and role not in get_args(WmtpType):
        raise MetadataError(f"role {role!r} is not a wmtp_type; use one of {get_args(WmtpType)}")
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(paths)))) as pool:
        found = list(pool.map(lambda p: _read(p, storage_options), paths))
    reasons: list[str] = []
    for path, meta in zip(paths, found, strict=True):
        if isinstance(meta, str):
            reasons.append(f"  {path}: {meta}")
        elif algo not in meta.algorithm_compatibility:
            reasons.append(
                f"  {path}: algorithm_compatibility is {list(meta.algorithm_compatibility)}"
            )
        elif role is not None and meta.wmtp_type != role:
            reasons.append(
                f"  {path}: serves {algo} but wmtp_type is {meta.wmtp_type!r}, not {role!r}"
            )
        else:
            return path
    known = sorted({a for m in found if not isinstance(m, str) for a in m.algorithm_compatibility})
    close = difflib.get_close_matches(algo, known, n=1)
    typo = f"\ndid you mean {close[0]!r}?" if close else ""
    wanted = f"{algo!r}" + (f" as {role}" if role else "")
    raise NoCompatibleModelError(
        f"no candidate serves {wanted}:\n"
        + "\n".join(reasons or ["  (no candidates given)"])
        + typo
    )


def _read(path: str, storage_options: StorageOptions | None) -> Metadata | str:
    """The metadata, or why it could not be read (first line of the error)."""
    try:
        return read_metadata(path, storage_options=storage_options)
    except WmtpError as e:
        kind = "no metadata" if isinstance(e, FileNotFoundError) else "invalid metadata"
        return f"{kind}: {str(e).splitlines()[0]}"
