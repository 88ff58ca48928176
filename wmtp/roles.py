"""What a training run loads: the models each algorithm needs, by role (`wmtp_type`), chosen
from candidate folders by their metadata, checked together, then loaded together."""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, get_args

from wmtp.errors import NoCompatibleModelError, OptionError, WmtpError
from wmtp.explain import why_not
from wmtp.load import load, read_all
from wmtp.location import StorageOptions
from wmtp.metadata import Metadata, WmtpType, serves

if TYPE_CHECKING:
    import torch

Read = Metadata | str  # a candidate's metadata, or why it could not be read
Location = str | os.PathLike[str]  # a folder or URL
# algorithm -> the wmtp_types it loads, base model first.
ALGORITHM_ROLES: Final[Mapping[str, tuple[WmtpType, ...]]] = MappingProxyType({
    "baseline-mtp": ("base_model",),
    "critic-wmtp": ("base_model", "reward_model"),
    "rho1-wmtp": ("base_model", "reference_model"),
})  # fmt: skip


def roles_of(algo: str, roles: Sequence[str] | None = None) -> tuple[str, ...]:
    """`roles` when given (checked against the wmtp_types), else `ALGORITHM_ROLES[algo]`;
    `OptionError` for an algorithm the table lacks, with the known ones and a close name."""
    if not isinstance(algo, str):
        raise OptionError(f"algo takes the name of a training algorithm, not {algo!r}")
    if roles is not None:
        if not roles or isinstance(roles, str):
            raise OptionError(f"roles takes a non-empty list of wmtp_types, not {roles!r}")
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
    paths: Sequence[Location],
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
        chosen |= {r: path for r in needed if r not in chosen and serves(meta, algo, r)}
        if len(chosen) == len(needed):
            return {role: chosen[role] for role in needed}
    lines = [f"no candidate serves {algo!r} as {', '.join(r for r in needed if r not in chosen)}:"]
    for path, meta in seen.items():
        reasons = {why_not(meta, algo, r) for r in needed if r not in chosen}
        lines.append(f"  {path}: {'; '.join(sorted(r for r in reasons if r))}")
    raise NoCompatibleModelError("\n".join(lines if seen else [*lines, "  (no candidates given)"]))


def load_roles(
    algo: str, paths: Sequence[Location], *, roles: Sequence[str] | None = None, **options: Any
) -> dict[str, torch.nn.Module]:
    """The models of `resolve_roles(algo, paths)`, by role, loaded with `options` as
    `wmtp.load` takes them. Every option but `storage_options` takes one value for every
    model or a dict role -> value (a role left out gets `load`'s default), e.g.
    `dtype={"reference_model": "bf16"}` puts a bf16 reference model beside an fp32 base.

    Every model is checked first (keys, shapes and dtypes from the safetensors headers), so a
    mistake in any model is reported before a weight is read, and all problems of all models
    come in one error; then all load at once (remote downloads overlap). Sharded models
    (`parallelize`) load one after another, so every rank's collectives run in one order.

    What a trainer expects: the base model comes back trainable (`requires_grad` as its class
    built it), the reference and reward models frozen (`requires_grad=False`); all in eval
    mode, as `wmtp.load` returns them (call `.train()` on the one you train).

    Raises:
        OptionError: an option `wmtp.load` does not take, or a dict naming a role the
            algorithm does not load. WmtpError: the problems of every model that would not
            load, each named by role; as `resolve_roles` and `wmtp.load` otherwise.

    Example:
        >>> models = load_roles("rho1-wmtp", ["models/mtp", "models/ref"],
        ...                     dtype={"base_model": "fp32", "reference_model": "bf16"})
        >>> models["reference_model"].lm_head.weight.requires_grad
        False
    """
    from wmtp.check import check

    if unknown := sorted(options.keys() - inspect.signature(load).parameters.keys() - {"location"}):
        raise OptionError(f"load_roles got {unknown}, which wmtp.load does not take")
    chosen = resolve_roles(algo, paths, roles=roles, storage_options=options.get("storage_options"))
    by_role = {role: dict[str, Any]() for role in chosen}
    for name, value in options.items():
        for role, given in per_role(algo, name, value, list(chosen)).items():
            by_role[role][name] = given

    def one(role: str) -> torch.nn.Module:
        model = load(chosen[role], **by_role[role])
        return model if role == "base_model" else model.requires_grad_(False)

    def checked(role: str) -> Any:
        wanted = inspect.signature(check).parameters  # the options a dry run takes too
        return check(chosen[role], **{k: v for k, v in by_role[role].items() if k in wanted})

    with ThreadPoolExecutor(len(chosen)) as pool:
        found = zip(chosen, pool.map(checked, chosen), strict=True)
        problems = [f"{r} ({chosen[r]}): {p}" for r, report in found for p in report.problems]
        if problems:
            error = WmtpError("\n".join(["these models would not load:", *problems]))
            error.problems = tuple(problems)
            raise error
        if any(options.get("parallelize") for options in by_role.values()):
            return {role: one(role) for role in chosen}  # every rank's collectives in one order
        return dict(zip(chosen, pool.map(one, chosen), strict=True))


def per_role(algo: str, name: str, value: Any, loaded: Sequence[str]) -> dict[str, Any]:
    """Option `name`'s value for each role in `loaded`: `value` itself, or, when it is a dict
    keyed by roles, its entries (roles it lacks are left out); `OptionError` when it names a
    role `algo` does not load."""
    if name == "storage_options" or not isinstance(value, Mapping):
        return dict.fromkeys(loaded, value)
    if not value.keys() & set(get_args(WmtpType)):  # a dict option such as config_overrides
        return dict.fromkeys(loaded, value)
    if wrong := sorted(value.keys() - set(loaded)):
        raise OptionError(
            f"{name}= names {', '.join(map(str, wrong))}, but {algo} loads {', '.join(loaded)}"
        )
    return {role: value[role] for role in loaded if role in value}
