"""`resolve(algo, paths)`: pick the model that serves a training algorithm, by metadata alone."""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import get_args

from wmtp.errors import MetadataError, WmtpError
from wmtp.metadata import WmtpType, read_metadata
from wmtp.store import StorageOptions


def resolve(
    algo: str,
    paths: Sequence[str],
    *,
    role: WmtpType | None = None,
    storage_options: StorageOptions | None = None,
) -> str:
    """The first of `paths`, in order, whose metadata lists `algo` (and whose `wmtp_type`
    is `role`, when given). Only each candidate's `metadata.json` is read, all at once.

    Raises:
        NoCompatibleModelError: no candidate fits; each one's reason is listed, and a close
            algorithm name when `algo` looks like a typo.
        MetadataError: `role` is not a known wmtp_type.

    Example:
        >>> resolve("critic-wmtp", ["models/mtp", "models/rm"], role="reward_model")
        'models/rm'
    """
    return choose(reasons(algo, paths, role=role, storage_options=storage_options), algo, role)


def choose(
    found: dict[str, tuple[str | None, tuple[str, ...]]], algo: str, role: str | None
) -> str:
    """The first path whose reason (from `reasons`) is None, or the error listing them all."""
    if chosen := next((path for path, (reason, _) in found.items() if reason is None), None):
        return chosen
    from wmtp.explain import no_candidate

    raise no_candidate(found, algo, role)


def reasons(
    algo: str, paths: Sequence[str], *, role: str | None, storage_options: StorageOptions | None
) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """Each path: why it does not serve `algo` (None: it does), and the algorithms it serves."""
    if role is not None and role not in get_args(WmtpType):
        raise MetadataError(f"role {role!r} is not a wmtp_type; use one of {get_args(WmtpType)}")

    def judge(path: str) -> tuple[str | None, tuple[str, ...]]:
        try:
            meta = read_metadata(path, storage_options=storage_options)
        except WmtpError as e:
            kind = "no metadata" if isinstance(e, FileNotFoundError) else "invalid metadata"
            return f"{kind}: {str(e).splitlines()[0]}", ()
        served, kind = meta.algorithm_compatibility, meta.wmtp_type
        if algo not in served:
            return f"algorithm_compatibility is {list(served)}", served
        if role is not None and kind != role:
            return f"serves {algo} but wmtp_type is {kind!r}, not {role!r}", served
        return None, served

    with ThreadPoolExecutor(max(1, min(16, len(paths)))) as pool:
        return dict(zip(paths, pool.map(judge, paths), strict=True))
