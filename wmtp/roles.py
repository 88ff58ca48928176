"""What a training run loads: the models each algorithm needs, by role (`wmtp_type`), chosen
from candidate folders by their metadata, checked together, then loaded together."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, get_args

from wmtp.errors import NoCompatibleModelError, OptionError, WmtpError
from wmtp.load import Read, load, read_all, why_not
from wmtp.metadata import WmtpType
from wmtp.store import StorageOptions

if TYPE_CHECKING:
    import torch

# algorithm -> the wmtp_types it loads, base model first.
ALGORITHM_ROLES: Final[Mapping[str, tuple[WmtpType, ...]]] = MappingProxyType({
    "baseline-mtp": ("base_model",),
    "critic-wmtp": ("base_model", "reward_model"),
    "rho1-wmtp": ("base_model", "reference_model"),
})  # fmt: skip


def roles_of(algo: str, roles: Sequence[str] | None = None) -> tuple[str, ...]:
    """`roles` when given (checked against the wmtp_types), else `ALGORITHM_ROLES[algo]`;
    `OptionError` for an algorithm the table lacks, with the known ones and a close name."""
    if roles is not None:
        if wrong := [r for r in roles if r not in get_args(WmtpType)]:
            raise OptionError(f"roles {wrong} are not wmtp_types; use {get_args(WmtpType)}")
        return tuple(dict.fromkeys(roles))
    if algo in ALGORITHM_ROLES:
        return ALGORITHM_ROLES[algo]
    close = difflib.get_close_matches(algo, list(ALGORITHM_ROLES), n=1)
    raise OptionError(
        f"algorithm {algo!r} is not in wmtp.ALGORITHM_ROLES ({', '.join(ALGORITHM_ROLES)})"
        + (f"; did you mean {close[0]!r}?" if close else "; pass roles=(...) for your own")
    )


def resolve_roles(
    algo: str,
    paths: Sequence[str],
    *,
    roles: Sequence[str] | None = None,
    storage_options: StorageOptions | None = None,
) -> dict[str, str]:
    """For each role `algo` needs, the first of `paths`, in order, whose metadata lists `algo`
    and whose `wmtp_type` is that role. Each `metadata.json` is read once, all at once; the
    answer comes as soon as every role has its candidate.

    Args:
        algo: the training algorithm, a key of `ALGORITHM_ROLES` unless `roles` is given.
        paths: candidate model folders or URLs, in order of preference.
        roles: the wmtp_types to find, for an algorithm of your own.
        storage_options: obstore settings for remote candidates.

    Raises:
        NoCompatibleModelError: a role no candidate serves; names every unserved role and
            every candidate's reason. OptionError: an unknown algorithm or role.

    Example:
        >>> resolve_roles("critic-wmtp", ["models/mtp", "models/rm"])
        {'base_model': 'models/mtp', 'reward_model': 'models/rm'}
    """
    return choose_roles(algo, roles_of(algo, roles), read_all(paths, storage_options))


def choose_roles(
    algo: str, needed: Sequence[str], found: Iterable[tuple[str, Read]]
) -> dict[str, str]:
    """`resolve_roles` over candidates already read (`wmtp.load.read_all`), stopping as soon as
    every role in `needed` has one; `NoCompatibleModelError` naming the unserved roles."""
    chosen, seen = dict[str, str](), dict[str, Read]()
    for path, meta in found:
        seen[path] = meta
        chosen |= {r: path for r in needed if r not in chosen and why_not(meta, algo, r) is None}
        if len(chosen) == len(needed):
            return {role: chosen[role] for role in needed}
    lines = [f"no candidate serves {algo!r} as {', '.join(r for r in needed if r not in chosen)}:"]
    for path, meta in seen.items():
        reasons = {why_not(meta, algo, r) for r in needed if r not in chosen}
        lines.append(f"  {path}: {'; '.join(sorted(r for r in reasons if r))}")
    raise NoCompatibleModelError("\n".join(lines if seen else [*lines, "  (no candidates given)"]))


def load_roles(
    algo: str, paths: Sequence[str], *, roles: Sequence[str] | None = None, **options: Any
) -> dict[str, torch.nn.Module]:
    """The models of `resolve_roles(algo, paths)`, by role, loaded with `options` as
    `wmtp.load` takes them. Every model is checked first (keys, shapes and dtypes from the
    safetensors headers), so a mistake in any model is reported before a weight is read,
    and all problems of all models come in one error; then all load at once (remote
    downloads overlap). `parallelize` may be one function or a dict role -> function (None:
    not sharded); sharded models load one after another, so every rank's collectives run in
    the same order.

    Raises:
        WmtpError: the problems of every model that would not load, each named by role;
            as `resolve_roles` and `wmtp.load` otherwise.

    Example:
        >>> models = load_roles("rho1-wmtp", ["models/mtp", "models/ref"], dtype="bf16")
        >>> sorted(models)
        ['base_model', 'reference_model']
    """
    from wmtp.check import check

    chosen = resolve_roles(algo, paths, roles=roles, storage_options=options.get("storage_options"))
    sharded = options.pop("parallelize", None)  # one function for all, or a dict by role

    def one(role: str) -> torch.nn.Module:
        how = sharded.get(role) if isinstance(sharded, Mapping) else sharded
        return load(chosen[role], parallelize=how, **options)

    wanted = ("storage_options", "trust_code", "cache_dir", "dtype", "config_overrides")
    checked: dict[str, Any] = {k: options[k] for k in wanted if k in options}
    with ThreadPoolExecutor(len(chosen)) as pool:
        reports = pool.map(lambda path: check(path, **checked), chosen.values())
        found = zip(chosen, reports, strict=True)
        problems = [f"{r} ({chosen[r]}): {p}" for r, report in found for p in report.problems]
        if problems:
            error = WmtpError("\n".join(["these models would not load:", *problems]))
            error.problems = tuple(problems)
            raise error
        if sharded is not None:  # each rank's collectives in one order: a model at a time
            return {role: one(role) for role in chosen}
        return dict(zip(chosen, pool.map(one, chosen), strict=True))
