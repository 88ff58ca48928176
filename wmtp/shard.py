"""Multi-rank loading (imported when `load` gets `parallelize=`): the user's function shards the
model built empty (FSDP2 `fully_shard`, a tensor-parallel plan: DTensors on the meta device),
then every rank fills only its own local shards from the mapped checkpoint. The checkpoint is
a memory map that the ranks of a node share through the page cache: a rank touches the bytes
of its shards (and of replicated tensors) only, and no collective moves a weight."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from wmtp.build import Groups
from wmtp.errors import MetadataError, OptionError, WmtpError

if TYPE_CHECKING:
    import torch


def fill_shards(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    groups: Groups,
    parallelize: Callable[[torch.nn.Module], Any],
    device: torch.device | None,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """`model` (parameters on meta, buffers real) after `parallelize(model)`, every parameter
    its local shard of `tensors` (full tensors by model key, mapped) on the mesh's device, its
    floating ones cast to `dtype` if given: a rank casts (and reads) only its own slices.
    Every rank of the default process group then agrees: when one failed, all raise (after the
    process group's timeout at most, if a rank never arrives), naming that rank and its error.

    Args:
        model: built by `wmtp.load.plan`; tensors: its full tensors by model key (mapped);
        groups: its tied names; parallelize: the user's function; device: None, the mesh's;
        dtype: the cast of `load(dtype=...)`, or None.

    Raises:
        OptionError: a mesh on another device than `device`. MetadataError: `parallelize`
            failed, or left a parameter without a tensor of the checkpoint. WmtpError: another
            rank failed.

    Example (what `wmtp.load(location, parallelize=fn)` does after its checks):
        >>> model = fill_shards(model, tensors, groups, fn, torch.device("cuda", local_rank))
    """
    import torch.distributed as dist

    failure = None
    try:
        model = _fill(model, tensors, groups, parallelize, device, dtype)
    except Exception as e:  # told to every rank below, then raised here
        failure = e
    if dist.is_available() and dist.is_initialized():
        said: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(
            said, None if failure is None else f"{type(failure).__name__}: {failure}"
        )
        if failure is None and (other := next(((r, m) for r, m in enumerate(said) if m), None)):
            raise WmtpError(f"rank {other[0]} failed to load its shards: {other[1]}")
    if failure is not None:
        raise failure
    return model


def _fill(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    groups: Groups,
    parallelize: Callable[[torch.nn.Module], Any],
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> torch.nn.Module:
    import torch
    from torch.distributed.tensor import DTensor

    def kind(tensor: torch.Tensor) -> torch.dtype:  # a floating tensor takes the cast
        return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype

    for group in groups:  # parameters take the checkpoint's dtype (or the cast) first, on meta
        have = next((tensors[n] for n in group if n in tensors), None)
        old = _parameter(model, group[0])
        if old is not None and have is not None and old.dtype != kind(have):
            _tie(model, group, torch.nn.Parameter(old.to(kind(have)), old.requires_grad))
    real = {name: b.clone() for name, b in model.named_buffers() if not b.is_meta}
    before, what = _names(model), f"parallelize({type(model).__name__})"
    try:
        parallelize(model)
    except Exception as e:
        raise MetadataError(f"{what} failed: {e!r}") from e
    if changed := sorted(before ^ _names(model)):  # the checkpoint fills exactly what it had
        raise MetadataError(
            f"{what} added or removed {', '.join(changed)}; it may shard the model's parameters "
            "and buffers (fully_shard, parallelize_module), not add, remove or rename them"
        )
    meshes = {p.device_mesh.device_type for p in model.parameters() if isinstance(p, DTensor)}
    where = torch.device(device or next(iter(meshes), "cpu"))
    if meshes - {where.type}:
        raise OptionError(f"device {str(where)!r}, but the mesh of parallelize is on {meshes}")
    if where.type == "cuda" and where.index is None:
        where = torch.device("cuda", torch.cuda.current_device())  # the rank's own GPU
    model.to_empty(device=where)  # FSDP2 and DTensor keep their structure; storage is local
    for group in groups:  # a module FSDP does not manage comes out with tied names apart
        if (first := _parameter(model, group[0])) is not None:
            _tie(model, [n for n in group if _parameter(model, n) is not first], first)
    with torch.no_grad():
        for name, param in model.named_parameters():  # one name per tied group
            full = tensors.get(name, _first(tensors, groups, name))
            local = param.to_local() if isinstance(param, DTensor) else param
            local.copy_(_local_slice(full, param) if isinstance(param, DTensor) else full)  # cast
        for name, buffer in model.named_buffers():
            value = tensors.get(name)
            buffer.copy_(real[name] if value is None else value.to(kind(value)))
    return model


def _names(model: torch.nn.Module) -> set[str]:
    """Every parameter and buffer name of `model`, each name of a tied one."""
    named = model.named_parameters(remove_duplicate=False)
    return {n for n, _ in named} | {n for n, _ in model.named_buffers(remove_duplicate=False)}


def _parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter | None:
    """The parameter `name` of `model` (None for a buffer)."""
    owner, _, attr = name.rpartition(".")
    return model.get_submodule(owner)._parameters.get(attr)


def _tie(model: torch.nn.Module, names: Sequence[str], param: torch.nn.Parameter) -> None:
    """Every one of `names` holds `param`."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, param)


def _first(tensors: Mapping[str, torch.Tensor], groups: Groups, name: str) -> torch.Tensor:
    """The checkpoint's tensor for parameter `name`, under any name of its tied group."""
    group = next((g for g in groups if name in g), (name,))
    return tensors[next(n for n in group if n in tensors)]  # `plan` saw every group filled


def _local_slice(full: torch.Tensor, param: Any) -> torch.Tensor:
    """This rank's part of `full` under the DTensor placements of `param` (`torch.chunk` per
    sharded mesh dimension, as DTensor's `Shard` splits): a view, so only its bytes are read."""
    coordinate = param.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            chunks = full.chunk(param.device_mesh.size(mesh_dim), dim=placement.dim)
            index = coordinate[mesh_dim]
            full = chunks[index] if index < len(chunks) else full.narrow(placement.dim, 0, 0)
    return full
