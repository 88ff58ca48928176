"""`resolve(algo, paths)`: pick the model that serves a training algorithm, by metadata alone."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import get_args

import msgspec

from wmtp.errors import MetadataError, NoCompatibleModelError, WmtpError
from wmtp.metadata import WmtpType, read_metadata
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
        NoCompatibleModelError: no candidate fits; the message gives each one's reason and
            a close algorithm name when `algo` looks like a typo.
        MetadataError: `role` is not a known wmtp_type.

    Example:
        >>> resolve("critic-wmtp", ["models/mtp", "models/rm"], role="reward_model")
        'models/rm'
    """
    return choose(candidates(algo, paths, role=role, storage_options=storage_options), algo, role)


def choose(found: Sequence[Candidate], algo: str, role: str | None = None) -> str:
    """The first candidate that serves `algo`, as judged by `candidates`.

    Raises:
        NoCompatibleModelError: none does; every reason listed, and a close name for a typo.
    """
    if chosen := next((c.location for c in found if c.reason is None), None):
        return chosen
    close = difflib.get_close_matches(algo, sorted({a for c in found for a in c.algorithms}), n=1)
    lines = [f"  {c.location}: {c.reason}" for c in found] or ["  (no candidates given)"]
    raise NoCompatibleModelError(
        f"no candidate serves {algo!r}{f' as {role}' if role else ''}:\n"
        + "\n".join(lines)
        + (f"\ndid you mean {close[0]!r}?" if close else "")
    )


def candidates(
    algo: str,
    paths: Sequence[str],
    *,
    role: WmtpType | None = None,
    storage_options: StorageOptions | None = None,
) -> list[Candidate]:
    """Every path, in order, with why it does or does not serve `algo` (read all at once).

    Raises:
        MetadataError: `role` is not a known wmtp_type.
    """
    if role is not None and role not in get_args(WmtpType):
        raise MetadataError(f"role {role!r} is not a wmtp_type; use one of {get_args(WmtpType)}")

    def judge(path: str) -> Candidate:
        try:
            meta = read_metadata(path, storage_options=storage_options)
        except WmtpError as e:
            kind = "no metadata" if isinstance(e, FileNotFoundError) else "invalid metadata"
            return Candidate(path, f"{kind}: {str(e).splitlines()[0]}")
        served = meta.algorithm_compatibility
        if algo not in served:
            return Candidate(path, f"algorithm_compatibility is {list(served)}", served)
        if role is not None and meta.wmtp_type != role:
            return Candidate(
                path, f"serves {algo} but wmtp_type is {meta.wmtp_type!r}, not {role!r}", served
            )
        return Candidate(path, None, served)

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(paths)))) as pool:
        return list(pool.map(judge, paths))
