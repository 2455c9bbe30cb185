"""Distributed training: DTensor (FSDP2) parameters and FSDP1 flat parameters (docs/design.md §7).

* **DDP** needs nothing: gradients are already reduced and parameters identical on every
  rank, so every rule acts the same on every rank.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``) makes every parameter a ``DTensor``,
  usually ``Shard(0)`` over the data-parallel mesh:

  - elementwise rules (``L1``, ``L2``, ``ElasticNet``, ``L2SP``, ``NonNeg``) run their usual
    kernels on the local shards (``p.to_local()``, ``p.grad.to_local()``): elementwise math
    needs no communication. L2-SP references taken from a DTensor parameter are DTensors
    with the same placements (a full reference tensor given by the user is sliced, without
    communication, to the parameter's placements);
  - group rules (``GroupLasso``, ``SparseGroupLasso``, ``MaxNorm``, ``UnitNorm``) compute the
    squared norm of every group from the local shard, all-reduce (sum) them only when a
    reduced dim is sharded (one collective per bucket of tensors), and apply the per-group
    factors to the local shard: the result equals the unsharded one;
  - ``Orthogonal`` and ``Penalty.from_fn`` work on the full tensor (``full_tensor()``, an
    all-gather) and keep the local part of the gradient;
  - ``reg.value()``, ``reg.penalty()`` (differentiable) and ``reg.stats()`` reduce across
    shards and equal the unsharded result. They are collectives: call them on every rank.

  Two DTensor traps are avoided on purpose (seen on torch 2.13): ``torch.linalg.vector_norm``
  over a sharded dim returns a ``_NormPartial`` placement whose ``.sum()`` gives
  √(Σ_ranks s²) instead of the sum of group norms, and a Python scalar added to a
  ``Partial`` DTensor is added once per rank. Group norms here are never ``Partial``.
* **FSDP1** (``FullyShardedDataParallel``) flattens parameters into 1-D shards of a
  ``FlatParameter``: elementwise rules work with ``use_orig_params=True`` (each original
  parameter is a 1-D slice of its flat shard, possibly empty); rules that need a
  parameter's shape (group norms, ``Orthogonal``, ``Penalty.from_fn``) raise ``ValueError``
  at ``Regularizer`` construction. Shape-based selectors (``tr.select.weights``: ndim ≥ 2)
  see the flattened 1-D shards there: select FSDP1 parameters by name.

Nothing here imports ``torch.distributed.tensor`` (0.4 s): a tensor can only be a DTensor
once that module is loaded.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._precision import LOW_PRECISION as _LOW
from ._precision import acc as _acc

__all__ = [
    "check_flat_params",
    "fsdp1_managed",
    "full",
    "full_value",
    "full_values",
    "group_norm",
    "group_sq_norms",
    "is_dtensor",
    "is_elementwise",
    "like",
    "local",
    "locals_",
    "runs_on_local_shards",
]

_DTENSOR: Any = None  # the DTensor class, once torch.distributed.tensor is imported
_FSDP1 = ("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")


def _dtensor_cls() -> Any:
    global _DTENSOR
    if _DTENSOR is None:
        mod = sys.modules.get("torch.distributed.tensor")
        _DTENSOR = getattr(mod, "DTensor", None) if mod is not None else None
    return _DTENSOR


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 / tensor-parallel parameter or gradient)."""
    cls = _DTENSOR or _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t: Any) -> Any:
    """The local shard of a DTensor (``t.to_local()``); anything else unchanged."""
    return t.to_local() if is_dtensor(t) else t


def locals_(ts: Sequence[Tensor]) -> Sequence[Tensor]:
    """:func:`local` of every tensor of a list, or the list itself when its first element is
    not a DTensor (the lists passed here are buckets: all DTensors or none)."""
    if ts and is_dtensor(ts[0]):
        return [local(t) for t in ts]
    return ts



def _reduced_mesh_dims(p: Any, dims: Sequence[int]) -> tuple[int, ...]:
    """Mesh dims along which a reduction over tensor dims ``dims`` of DTensor ``p`` must be
    all-reduced: those that shard one of ``dims``."""
    return tuple(
        i for i, pl in enumerate(p.placements) if pl.is_shard() and pl.dim % p.dim() in dims
    )


# --------------------------------------------------------------------------- group norms
def group_sq_norms(p: Tensor, dims: Sequence[int]) -> Tensor:
    """Per-group squared L2 norms over ``dims`` (``keepdim=True``; fp32 for fp16/bf16).

    A plain tensor gives a plain tensor. A DTensor gives a DTensor whose placements are
    never ``Partial``: ``Shard(d)`` where ``d`` is a kept dim (each rank holds its groups'
    norms, laid out like its shard) and ``Replicate`` where a reduced dim was sharded (the
    local sums are all-reduced). Differentiable.
    """
    a = _acc(p)
    if p.dim() == 0:
        return a * a
    sq = (a * a).sum(dim=tuple(dims), keepdim=True)
    if is_dtensor(sq) and any(pl.is_partial() for pl in sq.placements):
        from torch.distributed.tensor import Replicate

        sq = sq.redistribute(
            sq.device_mesh, [Replicate() if pl.is_partial() else pl for pl in sq.placements]
        )
    return sq


def group_norm(p: Tensor, dims: Sequence[int]) -> Tensor:
    """Group norms of a DTensor with ``keepdim=True`` (see :func:`group_sq_norms` for the
    placements), differentiable with gradient 0 (not NaN) at an all-zero group."""
    dims = tuple(dims)
    if p.dim() == 0:
        return _acc(p).abs()
    if not _reduced_mesh_dims(p, dims):  # every group is whole on its rank: no communication
        return torch.linalg.vector_norm(_acc(p), dim=dims, keepdim=True)
    sq = group_sq_norms(p, dims)
    tiny = torch.finfo(sq.dtype).tiny
    # sqrt'(0) = inf would make the gradient at an all-zero group 0·inf = NaN
    return torch.where(sq > 0, sq.clamp_min(tiny).sqrt(), 0.0)


def foreach_group_map(
    params: Sequence[Tensor],
    dims_of: Callable[[Tensor], tuple[int, ...]],
    fn: Callable[[Tensor, int], Tensor],
) -> list[Tensor]:
    """``fn(global group norms, group size)`` for every DTensor of ``params``, as *local*
    tensors that broadcast against ``p.to_local()``.

    Norms are computed from the local shards; the squared norms of tensors whose groups
    span ranks are all-reduced, one collective per (mesh, mesh dims, dtype) for the whole
    list. Group sizes come from the global shape.
    """
    import torch.distributed as dist

    norms: list[Tensor | None] = [None] * len(params)
    pending: dict[tuple, list[int]] = defaultdict(list)
    sizes = []
    for i, p in enumerate(params):
        dims = dims_of(p)
        sizes.append(math.prod(p.shape[d] for d in dims))
        loc = p.to_local()
        acc = torch.float32 if loc.dtype in _LOW else loc.dtype
        if p.dim() == 0:
            norms[i] = loc.to(acc).abs()
            continue
        mdims = _reduced_mesh_dims(p, dims)
        if not mdims:
            norms[i] = torch.linalg.vector_norm(loc, dim=dims, keepdim=True, dtype=acc)
        else:
            a = loc.to(acc)
            norms[i] = (a * a).sum(dim=dims, keepdim=True)  # squared, until reduced
            pending[(id(p.device_mesh), mdims, acc)].append(i)
    for (_, mdims, _), idx in pending.items():
        mesh = params[idx[0]].device_mesh
        flat = torch.cat([norms[i].reshape(-1) for i in idx])  # type: ignore[union-attr]
        for md in mdims:
            dist.all_reduce(flat, group=mesh.get_group(md))
        flat.sqrt_()
        off = 0
        for i in idx:
            n = norms[i]
            norms[i] = flat[off : off + n.numel()].view(n.shape)  # type: ignore[union-attr]
            off += n.numel()  # type: ignore[union-attr]
    return [fn(n, s) for n, s in zip(norms, sizes)]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- values
def full_value(v: Tensor) -> Tensor:
    """A DTensor value as the plain tensor every rank agrees on (``full_tensor()``:
    reduces ``Partial``, gathers ``Shard``); differentiable. Plain tensors unchanged."""
    return v.full_tensor() if is_dtensor(v) else v


def full_values(vs: Sequence[Tensor]) -> list[Tensor]:
    """:func:`full_value` of every 0-d tensor of ``vs``, batched: the ``Partial(sum)``
    DTensors that need no gradient are stacked and all-reduced together (one collective
    per mesh and dtype)."""
    import torch.distributed as dist

    out = list(vs)
    batch: dict[tuple, list[int]] = defaultdict(list)
    for i, v in enumerate(vs):
        if not is_dtensor(v):
            continue
        pls = v.placements
        if (
            v.requires_grad
            or v.dim() != 0
            or any(
                pl.is_partial() and (type(pl).__name__ != "Partial" or pl.reduce_op != "sum")
                for pl in pls
            )
        ):
            out[i] = v.full_tensor()
            continue
        mdims = tuple(j for j, pl in enumerate(pls) if pl.is_partial())
        if not mdims:
            out[i] = v.to_local()
        else:
            batch[(id(v.device_mesh), mdims, v.dtype)].append(i)
    for (_, mdims, _), idx in batch.items():
        mesh = vs[idx[0]].device_mesh
        flat = torch.stack([vs[i].to_local() for i in idx])
        for md in mdims:
            dist.all_reduce(flat, group=mesh.get_group(md))
        for k, i in enumerate(idx):
            out[i] = flat[k]
    return out


def full(p: Tensor) -> Tensor:
    """The whole tensor of a DTensor (an all-gather, differentiable); plain tensors unchanged."""
    return p.full_tensor() if is_dtensor(p) else p


def like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` laid out like ``ref``: a DTensor with ``ref``'s mesh and placements when ``ref``
    is a DTensor, a plain full tensor otherwise.

    A plain ``t`` is taken as the full (replicated) value and sliced to ``ref``'s shards
    locally, without communication (all ranks hold the same ``t``, e.g. a pre-trained
    ``state_dict``). A DTensor ``t`` is redistributed.
    """
    if not is_dtensor(ref):
        return full(t)
    from torch.distributed.tensor import DTensor, Replicate

    mesh = ref.device_mesh
    if is_dtensor(t):
        if t.device_mesh == mesh:
            return (
                t
                if tuple(t.placements) == tuple(ref.placements)
                else t.redistribute(mesh, ref.placements)
            )
        t = t.full_tensor()
    rep = DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return rep.redistribute(mesh, ref.placements)


# --------------------------------------------------------------------------- rules
def is_elementwise(rule: Any) -> bool:
    """Whether ``rule`` acts on each coordinate alone (so it can run on any shard or flat
    slice of a parameter): L1, L2, ElasticNet, L2SP, NonNeg, and any rule that declares
    ``elementwise = True``. Group norms, Orthogonal and ``Penalty.from_fn`` are not."""
    flag = getattr(rule, "elementwise", None)
    if flag is not None:
        return bool(flag)
    from .constraints import NonNeg
    from .penalties import Penalty

    if isinstance(rule, Penalty):
        return bool(getattr(rule, "elementwise_prox", False))
    return isinstance(rule, NonNeg)


def runs_on_local_shards(rule: Any) -> bool:
    """Whether the Regularizer hands ``rule`` the local shards of DTensor parameters (and
    grads) instead of the DTensors: elementwise rules, unless they declare
    ``takes_dtensors = True`` (L2SP, which finds its references by parameter and uses the
    local shards itself)."""
    return is_elementwise(rule) and not getattr(rule, "takes_dtensors", False)


# --------------------------------------------------------------------------- FSDP1
def _is_fsdp1(module: nn.Module) -> bool:
    return any((c.__module__, c.__name__) == _FSDP1 for c in type(module).__mro__)


def fsdp1_managed(model: nn.Module) -> set[int]:
    """``id`` of every parameter FSDP1 (``FullyShardedDataParallel``) flattens in ``model``:
    its ``FlatParameter`` (``use_orig_params=False``) or the 1-D views of it that replace
    the original parameters (``use_orig_params=True``); ignored modules' parameters excluded."""
    ids: set[int] = set()
    for m in model.modules():
        if _is_fsdp1(m):
            ignored = {id(p) for p in getattr(m, "_ignored_params", ())}
            ids.update(id(p) for p in m.parameters() if id(p) not in ignored)
    for p in model.parameters():
        if getattr(p, "_is_flat_param", False):
            ids.add(id(p))
    return ids


def check_flat_params(managed: set[int], bindings: Sequence[Any]) -> None:
    """Raise ``ValueError`` if a rule that needs parameter shapes selects an FSDP1-flattened
    parameter (``managed``: :func:`fsdp1_managed` of the model). ``bindings``: objects with
    ``.rule``, ``.name`` and ``.infos`` (``.name``, ``.param``), as the Regularizer keeps them."""
    if not managed:
        return
    for b in bindings:
        if not b.infos or is_elementwise(b.rule):
            continue
        bad = [i.name for i in b.infos if id(i.param) in managed]
        if bad:
            raise ValueError(
                f"rule {b.name!r} ({type(b.rule).__name__}) needs each parameter's shape, but "
                f"FSDP1 (FullyShardedDataParallel) flattens and shards these into 1-D pieces of "
                f"a FlatParameter: {', '.join(bad)}. Use FSDP2 "
                "(torch.distributed.fsdp.fully_shard), whose DTensor parameters keep their "
                "shapes, or only elementwise rules (L1, L2, ElasticNet, L2SP, NonNeg) with "
                "FSDP1(use_orig_params=True)"
            )


def empty_selection_hint(managed: set[int]) -> str:
    """Extra text for the "selects no parameter" error when FSDP1 hides shapes."""
    if managed:
        return (
            "; note: FSDP1 flattens parameters into 1-D shards, so shape-based selectors "
            "(tr.select.weights: ndim >= 2) match none of them: select by name "
            "(tr.select.name(...)) or use FSDP2 (fully_shard)"
        )
    return ""
