"""`resolve(algo, paths)`: pick the model that serves a training algorithm, by metadata alone."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import get_args

import msgspec

from wmtp.errors import MetadataError, NoCompatibleModelError, WmtpError
from wmtp.load import read_metadata
from wmtp.metadata import WmtpType
from wmtp.store import StorageOptions


class Candidate(msgspec.Struct, frozen=True):
    """A location, why it does not serve the algorithm (None: it does), and what it serves."""

    location: str
    reason: str | None
    algorithms: tuple[str, ...] = ()


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
    return choose(candidates(algo, paths, role=role, storage_options=storage_options), algo, role)


def choose(found: Sequence[Candidate], algo: str, role: str | None = None) -> str:
    """The first candidate that serves `algo`, as judged by `candidates`.

    Raises:
        NoCompatibleModelError: none does; every candidate's reason is listed, and a
            close algorithm name when `algo` looks like a typo.
    """
    chosen = next((c.location for c in found if c.reason is None), None)
    if chosen is not None:
        return chosen
    known = sorted({a for c in found for a in c.algorithms})
    close = difflib.get_close_matches(algo, known, n=1)
    typo = f"\ndid you mean {close[0]!r}?" if close else ""
    wanted = f"{algo!r}" + (f" as {role}" if role else "")
    lines = [f"  {c.location}: {c.reason}" for c in found] or ["  (no candidates given)"]
    raise NoCompatibleModelError(f"no candidate serves {wanted}:\n" + "\n".join(lines) + typo)


def candidates(
    algo: str,
    paths: Sequence[str],
    *,
    role: WmtpType | None = None,
    storage_options: StorageOptions | None = None,
) -> list[Candidate]:
    """Every path, in order, with why it does or does not serve `algo` (reads all at once).

    Raises:
        MetadataError: `role` is not a known wmtp_type.
    """
    if role is not None and role not in get_args(WmtpType):
        raise MetadataError(f"role {role!r} is not a wmtp_type; use one of {get_args(WmtpType)}")
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(paths)))) as pool:
        return list(pool.map(lambda p: _judge(p, algo, role, storage_options), paths))


def _judge(
    path: str, algo: str, role: str | None, storage_options: StorageOptions | None
) -> Candidate:
    try:
        meta = read_metadata(path, storage_options=storage_options)
    except WmtpError as e:
        kind = "no metadata" if isinstance(e, FileNotFoundError) else "invalid metadata"
        return Candidate(path, f"{kind}: {str(e).splitlines()[0]}")
    served = meta.algorithm_compatibility
    if algo not in served:
        return Candidate(path, f"algorithm_compatibility is {list(served)}", served)
    if role is not None and meta.wmtp_type != role:
        reason = f"serves {algo} but wmtp_type is {meta.wmtp_type!r}, not {role!r}"
        return Candidate(path, reason, served)
    return Candidate(path, None, served)
