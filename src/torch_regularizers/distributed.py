"""Distributed training: DTensor parameters (FSDP2, tensor parallelism, 2-D meshes), FSDP1
flat parameters, DeepSpeed ZeRO (docs/design.md §7).

* **DDP** needs nothing: gradients are already reduced and parameters identical on every
  rank, so every rule acts the same on every rank.
* **DTensor parameters** — ``fully_shard`` (FSDP2), ``parallelize_module`` (tensor
  parallel), both on a ``(dp, tp)`` mesh — with any placements: ``Shard(d)``,
  ``Replicate()``, ``_StridedShard`` (FSDP2 over a ``Shard(0)`` tensor-parallel weight),
  mixed. All math runs on the local shards with explicit collectives over exactly the mesh
  dims that need them (never DTensor's sharding propagation, which refuses a shard of a dim
  smaller than its number of shards and then all-gathers or raises):

  - elementwise rules (``L1``, ``L2``, ``ElasticNet``, ``L2SP``, ``NonNeg``) run their usual
    kernels on ``p.to_local()`` / ``p.grad.to_local()``: no communication. L2-SP references
    of a DTensor parameter are DTensors with the same placements;
  - group rules (``GroupLasso``, ``SparseGroupLasso``, ``MaxNorm``, ``UnitNorm``) compute the
    squared norm of every group from the local shard, all-reduce (sum) them over the mesh
    dims that shard a reduced dim (one collective per bucket), and apply the per-group
    factors to the local shard: the result equals the unsharded one;
  - ``Orthogonal`` and ``Penalty.from_fn`` work on the full tensor (``full_tensor()``, an
    all-gather) and keep the local part of the gradient;
  - ``reg.value()``, ``reg.penalty()`` (differentiable; the gradient reaches ``p`` with its
    own placements) and ``reg.stats()`` equal the unsharded result, every element counted
    once. They are collectives: call them on every rank. Empty local shards (a dim that
    does not divide) join every collective.

  ``_StridedShard`` is not a ``Shard`` on torch 2.13 (its ``is_shard()`` is False): ask
  :func:`sharded_dim`. Two more DTensor traps are avoided on purpose: ``vector_norm`` over a
  sharded dim returns a ``_NormPartial`` placement whose ``.sum()`` gives √(Σ_ranks s²), and
  a Python scalar added to a ``Partial`` DTensor is added once per rank. FSDP2 registers
  unsharded parameters from a module's forward to its backward: :func:`fsdp2_unsharded`
  keeps the Regularizer bound to the sharded ones meanwhile.
* **FSDP1** (``FullyShardedDataParallel``) flattens parameters into 1-D shards of a
  ``FlatParameter``: elementwise rules work with ``use_orig_params=True`` (each original
  parameter is a 1-D slice of its flat shard, possibly empty); rules that need a
  parameter's shape (group norms, ``Orthogonal``, ``Penalty.from_fn``) raise ``ValueError``
  at ``Regularizer`` construction. Shape-based selectors (``tr.select.weights``: ndim ≥ 2)
  see the flattened 1-D shards there: select FSDP1 parameters by name.
* **DeepSpeed ZeRO 1/2/3**: detected here by class module name (:func:`note_wrapper`,
  :func:`stepped_params`); the rules act on the fp32 partition fragments (``_zero.py``), with
  group norms computed per fragment (:func:`foreach_group_map` on fragment views).

Nothing here imports ``torch.distributed.tensor`` (0.4 s) or deepspeed: a tensor can only be
a DTensor once that module is loaded.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._precision import LOW_PRECISION as _LOW
from ._precision import acc as _acc

__all__ = [
    "DEEPSPEED_SUPPORTED",
    "Fragment",
    "check_deepspeed",
    "check_flat_params",
    "deepspeed_of",
    "extremes",
    "fragment_views",
    "fsdp1_managed",
    "fsdp2_unsharded",
    "full",
    "full_value",
    "full_values",
    "group_norm",
    "group_sq_norms",
    "is_dtensor",
    "is_elementwise",
    "is_fragment",
    "like",
    "local",
    "local_group_norm",
    "locals_",
    "note_wrapper",
    "runs_on_local_shards",
    "sharded_dim",
    "stepped_params",
    "value",
    "zero3_gathered",
    "zero3_partitioned",
    "zero_flats",
    "zero_groups",
    "zero_process_group",
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



def sharded_dim(pl: Any) -> int | None:
    """The tensor dim a placement shards (``Shard(d)`` or ``_StridedShard(d, sf)``), else None.

    On torch 2.13 ``_StridedShard`` — what ``fully_shard`` makes of a tensor-parallel
    ``Shard(0)`` weight — is not a ``Shard`` and its ``is_shard()`` is False: code that asks
    ``is_shard()`` takes such a mesh dim for a replicated one (group norms not reduced,
    values summed once per rank). Ask this instead."""
    if pl.is_shard() or hasattr(pl, "split_factor"):
        return pl.dim
    return None


def _reduced_mesh_dims(p: Any, dims: Sequence[int]) -> tuple[int, ...]:
    """Mesh dims along which a reduction over tensor dims ``dims`` of DTensor ``p`` must be
    all-reduced: those that shard one of ``dims``."""
    return tuple(
        i
        for i, pl in enumerate(p.placements)
        if sharded_dim(pl) is not None and sharded_dim(pl) % p.dim() in dims
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

    if params and is_fragment(params[0]):  # DeepSpeed ZeRO: flat fragments of parameters
        return _fragment_group_map(params, dims_of, fn)
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


# --------------------------------------------------------------------------- local math + collectives
class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) over process groups; backward: identity.

    Every rank goes on with the same (replicated) result and the loss is counted once, so
    the gradient of a local input is the gradient of the result — DTensor's convention
    for ``Replicate`` (a sum all-reduce in backward would count it once per rank)."""

    @staticmethod
    def forward(ctx, t, groups):  # type: ignore[override]
        import torch.distributed as dist

        out = t.clone()
        for g in groups:
            dist.all_reduce(out, group=g)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def _sum_over(t: Tensor, p: Any, mdims: Sequence[int]) -> Tensor:
    """``t`` summed over the ranks of mesh dims ``mdims`` of DTensor ``p`` (differentiable)."""
    if not mdims:
        return t
    return _SumOverRanks.apply(t, [p.device_mesh.get_group(i) for i in mdims])


def _shard_mesh_dims(p: Any) -> tuple[int, ...]:
    """Mesh dims that shard DTensor ``p`` (``Shard`` or ``_StridedShard``); the others replicate."""
    return tuple(i for i, pl in enumerate(p.placements) if sharded_dim(pl) is not None)


def local_group_norm(p: Any, dims: Sequence[int], loc: Tensor | None = None) -> Tensor:
    """The global norms of the groups in DTensor ``p``'s local shard, as a plain tensor
    (``keepdim=True``) that broadcasts against ``p.to_local()``: squared norms of the local
    shard, summed over the mesh dims that shard a reduced dim (an empty shard adds 0 and
    still joins). Differentiable (through ``p.to_local()``), gradient 0 at a zero group."""
    dims = tuple(dims)
    loc = p.to_local() if loc is None else loc
    a = _acc(loc)
    if p.dim() == 0:
        return a.abs()
    mdims = _reduced_mesh_dims(p, dims)
    if not mdims:
        return torch.linalg.vector_norm(a, dim=dims, keepdim=True)
    sq = _sum_over((a * a).sum(dim=dims, keepdim=True), p, mdims)
    tiny = torch.finfo(sq.dtype).tiny
    return torch.where(sq > 0, sq.clamp_min(tiny).sqrt(), torch.zeros((), dtype=sq.dtype, device=sq.device))


def _partial_scalar(v: Tensor, p: Any, mdims: Sequence[int]) -> Tensor:
    """The 0-d local value ``v`` as a DTensor that is ``Partial(sum)`` over mesh dims
    ``mdims`` of ``p``'s mesh and ``Replicate`` over the others (no communication): the
    callers reduce many of them in one collective (:func:`full_values`). Its gradient comes
    back ``Replicate``: the local value's gradient is the total's."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = p.device_mesh
    pls = [Partial() if i in mdims else Replicate() for i in range(mesh.ndim)]
    return DTensor.from_local(v, mesh, pls, run_check=False)


def value(rule: Any, p: Tensor, lam: float) -> Tensor:
    """R(θ) of one parameter, computed for a DTensor from its local shard: no all-gather, no
    DTensor sharding propagation (which refuses shards of a dim smaller than its number of
    shards), and differentiable — the gradient reaches ``p`` through ``p.to_local()``, with
    ``p``'s own placements. A DTensor gives a 0-d DTensor, ``Partial(sum)`` over the mesh
    dims whose local values add up (reduce it with :func:`full_values`):

    * elementwise rules: the local value, partial over the mesh dims that shard ``p``
      (replicated mesh dims hold the same value: counted once);
    * group lasso (and its sparse variant): Σ_g √size_g·‖θ_g‖ over the local groups with
      their global norms (:func:`local_group_norm`), partial over the mesh dims that shard a
      *kept* dim — the ranks along a mesh dim that shards a reduced dim hold the same groups
      (the L1 part of the sparse variant is summed over those first);
    * a rule may define ``value_on_shards(p, lam)`` itself; any other rule (Orthogonal,
      ``Penalty.from_fn``) is evaluated on the DTensor (they gather the full tensor).
    """
    if not is_dtensor(p):
        return rule.value(p, lam)
    own = getattr(rule, "value_on_shards", None)
    if own is not None:
        return own(p, lam)
    from .structured import L2SP, GroupLasso, SparseGroupLasso, group_size

    loc = p.to_local()
    shard = _shard_mesh_dims(p)
    if isinstance(rule, GroupLasso):
        dims = rule._dims(p)
        rho = rule.l1_ratio if isinstance(rule, SparseGroupLasso) else 0.0
        reduced = _reduced_mesh_dims(p, dims)
        kept = tuple(i for i in shard if i not in reduced)
        n = local_group_norm(p, dims, loc)
        v = (lam * (1 - rho) * math.sqrt(group_size(p, dims))) * n.sum()
        if rho:
            v = v + _sum_over((lam * rho) * _acc(loc).abs().sum(), p, reduced)
        return _partial_scalar(v, p, kept)
    if isinstance(rule, L2SP):
        d = _acc(loc) - _acc(local(rule._ref(p)))
        return _partial_scalar(0.5 * lam * (d * d).sum(), p, shard)
    if runs_on_local_shards(rule):
        return _partial_scalar(rule.value(loc, lam), p, shard)
    return rule.value(p, lam)


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


def extremes(ts: Sequence[Tensor], op: str = "max") -> list[Tensor]:
    """``t.amax()`` (``op="max"``) or ``t.amin()`` of every tensor, as plain 0-d tensors the
    ranks agree on (detached).

    A DTensor is reduced on its local shard (an empty shard — a dim that does not divide by
    the mesh size — gives −inf / +inf, where ``t.max()`` would raise) and all-reduced over
    the mesh dims that shard it, one collective per (mesh, mesh dims, dtype) for the list:
    every rank joins, whatever its shard holds. Replicated mesh dims need no collective.
    """
    import torch.distributed as dist

    if op not in ("max", "min"):
        raise ValueError(f"extremes: op must be 'max' or 'min', got {op!r}")
    out: list[Any] = [None] * len(ts)
    pending: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(ts):
        t = t.detach()
        if not is_dtensor(t):
            out[i] = t.amax() if op == "max" else t.amin()
            continue
        if any(pl.is_partial() for pl in t.placements):  # not met here; exact anyway
            t = t.redistribute(t.device_mesh, [_replicate() if pl.is_partial() else pl for pl in t.placements])
        loc = t.to_local()
        if loc.numel():
            out[i] = loc.amax() if op == "max" else loc.amin()
        else:  # the identity of the reduction
            if loc.dtype.is_floating_point:
                fill: Any = -math.inf if op == "max" else math.inf
            else:
                ii = torch.iinfo(loc.dtype)
                fill = ii.min if op == "max" else ii.max
            out[i] = torch.full((), fill, dtype=loc.dtype, device=loc.device)
        mdims = tuple(j for j, pl in enumerate(t.placements) if sharded_dim(pl) is not None)
        if mdims:
            pending[(id(t.device_mesh), mdims, loc.dtype)].append(i)
    for (_, mdims, _), idx in pending.items():
        mesh = ts[idx[0]].device_mesh
        flat = torch.stack([out[i] for i in idx])
        rop = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN
        for md in mdims:
            dist.all_reduce(flat, op=rop, group=mesh.get_group(md))
        for k, i in enumerate(idx):
            out[i] = flat[k]
    return out


def _replicate() -> Any:
    from torch.distributed.tensor import Replicate

    return Replicate()


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


# --------------------------------------------------------------------------- FSDP2 state
def fsdp2_unsharded(model: nn.Module) -> bool:
    """Whether some ``fully_shard`` module of ``model`` has its parameters unsharded now.

    FSDP2 swaps each module's registered parameters for unsharded ones from its forward
    until its backward resharded them — for the root (``reshard_after_forward=False`` by
    default) that is from ``model(x)`` to ``loss.backward()``, exactly where
    ``reg.penalty()`` is called. Those are transient: the optimizer steps the sharded
    ``DTensor`` parameters, so the Regularizer must not rebind to the unsharded ones
    (it would then regularize nothing in ``optimizer.step()``).
    """
    for m in model.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            groups = get_state()._fsdp_param_groups
        except Exception:  # another torch version's internals: assume sharded
            continue
        if any(not getattr(g, "is_sharded", True) for g in groups):
            return True
    return False


# --------------------------------------------------------------------------- DeepSpeed ZeRO
#: ZeRO optimizers whose fp32 master partitions this library regularizes (class names in
#: ``deepspeed.runtime``): stage 1/2, stage 1 with bf16 weights, stage 3
DEEPSPEED_SUPPORTED = ("DeepSpeedZeroOptimizer", "BF16_Optimizer", "DeepSpeedZeroOptimizer_Stage3")
"""Class names of the DeepSpeed optimizers whose ZeRO fp32 partitions the rules act on."""
ZERO3 = "DeepSpeedZeroOptimizer_Stage3"
#: inner torch optimizer -> the DeepSpeed optimizer that steps it (weakly)
_ZERO: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _deepspeed_class(obj: Any) -> str | None:
    """The class name of a DeepSpeed object (an engine or optimizer wrapper), by module name:
    deepspeed is never imported here."""
    for c in type(obj).__mro__:
        if c.__module__.split(".")[0] == "deepspeed":
            return type(obj).__name__
    return None


def note_wrapper(outer: Any, inner: Any) -> None:
    """Called while looking through optimizer wrappers (``outer.optimizer is inner``):
    remember a DeepSpeed optimizer that steps the torch optimizer ``inner`` on its own flat
    partitions (ZeRO), so that attach() can map the model's parameters to them."""
    name = _deepspeed_class(outer)
    if name is None or name == "DeepSpeedEngine" or not isinstance(inner, torch.optim.Optimizer):
        return
    _ZERO[inner] = outer


def deepspeed_of(opt: Any) -> Any:
    """The DeepSpeed optimizer wrapping torch optimizer ``opt`` (seen by :func:`note_wrapper`), or None."""
    try:
        return _ZERO.get(opt)
    except TypeError:
        return None


def check_deepspeed(wrapper: Any) -> None:
    """``ValueError`` for a DeepSpeed optimizer whose partitions are not supported."""
    name = type(wrapper).__name__
    if name in DEEPSPEED_SUPPORTED:
        if name == ZERO3 and (getattr(wrapper, "offload_optimizer", False) or getattr(wrapper, "offload_param", False)):
            raise ValueError(
                "attach(): DeepSpeed ZeRO-3 with CPU/NVMe offload is not supported (its fp32 "
                "partitions are swapped out between steps)"
            )
        return
    raise ValueError(
        f"attach(): DeepSpeed's {name} steps its own flat fp32 copies of the parameters, and "
        "they are not mapped to the model's parameters here. Supported: ZeRO stage 1, 2 "
        "and 3 (DeepSpeedZeroOptimizer, BF16_Optimizer, DeepSpeedZeroOptimizer_Stage3), or "
        "plain DeepSpeed data parallelism without ZeRO and without fp16/bf16 master weights"
    )


def zero_groups(wrapper: Any) -> list[list[Tensor]]:
    """The model parameters of each of the ZeRO optimizer's groups (``bit16_groups``; ZeRO-3:
    its sub-groups, ``fp16_groups``)."""
    if type(wrapper).__name__ == ZERO3:
        return [list(g) for g in wrapper.fp16_groups]
    groups = getattr(wrapper, "bit16_groups", None)
    if groups is None:
        groups = getattr(wrapper, "bf16_groups", None)
    if groups is None:
        raise ValueError(f"DeepSpeed {type(wrapper).__name__}: no bit16_groups / bf16_groups found")
    return [list(g) for g in groups]


def zero_flats(wrapper: Any) -> list[Tensor]:
    """The rank's flat fp32 master partition of each group (what the inner optimizer steps)."""
    if type(wrapper).__name__ == ZERO3:
        return list(wrapper.fp32_partitioned_groups_flat)
    flats = getattr(wrapper, "single_partition_of_fp32_groups", None)
    if flats is None:
        flats = getattr(wrapper, "fp32_groups_flat_partition", None)
    if flats is None:
        raise ValueError(f"DeepSpeed {type(wrapper).__name__}: no fp32 partitions found")
    return list(flats)


def zero_process_group(wrapper: Any, gi: int) -> Any:
    """The data-parallel process group the partitions of group ``gi`` are cut over."""
    if type(wrapper).__name__ == ZERO3:
        return wrapper.dp_process_group
    groups = getattr(wrapper, "real_dp_process_group", None)
    if groups is not None:
        return groups[gi]
    return getattr(wrapper, "dp_process_group", None)


def stepped_params(opt: Any) -> list[Tensor]:
    """The model parameters ``opt.step()`` updates: its param groups' tensors, or for a torch
    optimizer stepped by a DeepSpeed ZeRO optimizer, the model parameters of its partitions
    (``ValueError`` for DeepSpeed setups not supported)."""
    zero = deepspeed_of(opt)
    if zero is None:
        return [p for g in opt.param_groups for p in g["params"]]
    check_deepspeed(zero)
    return [p for g in zero_groups(zero) for p in g]


def zero3_partitioned(p: Any) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter whose data is partitioned away right now."""
    return hasattr(p, "ds_tensor") and getattr(p, "ds_numel", 0) > 0 and p.numel() != p.ds_numel


class zero3_gathered:
    """``with zero3_gathered(params):`` the ZeRO-3 parameters among ``params`` hold their full
    (bit16) data for the block (``deepspeed.zero.GatheredParameters``, read-only: an
    all-gather on entry, freed on exit); a no-op for anything else. ``value()`` and
    ``stats()`` read the weights so; their memory is that of the gathered parameters."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = [p for p in params if zero3_partitioned(p)]
        self.ctx: Any = None

    def __enter__(self) -> zero3_gathered:
        if self.params:
            import deepspeed  # loaded: these are its parameters

            self.ctx = deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


class Fragment:
    """The part of one model parameter in this rank's flat ZeRO partition: the parameter's
    flat elements ``[start, start + numel)`` are ``flat[offset : offset + numel]`` (``numel``
    may be 0: the rank holds none of it, and still joins every collective)."""

    __slots__ = ("group", "numel", "offset", "param", "shape", "start")

    def __init__(self, param: Tensor, shape: tuple, start: int, offset: int, numel: int, group: Any) -> None:
        self.param, self.shape, self.start, self.offset, self.numel, self.group = (
            param, shape, start, offset, numel, group,
        )


#: id(fragment view) -> Fragment, while a ZeRO phase runs (see :func:`fragment_views`)
_FRAGMENTS: dict[int, Fragment] = {}


def is_fragment(t: object) -> bool:
    """Whether ``t`` is a flat view of a ZeRO partition standing for a parameter fragment."""
    return bool(_FRAGMENTS) and id(t) in _FRAGMENTS


class fragment_views:
    """``with fragment_views(views, frags):`` group rules called on ``views`` (1-D pieces of
    flat partitions) compute their group norms per fragment (:func:`foreach_group_map`)."""

    def __init__(self, views: Sequence[Tensor], frags: Sequence[Fragment]) -> None:
        self.items = {id(v): f for v, f in zip(views, frags)}
        self.views = list(views)  # keep them alive: ids must not be reused meanwhile

    def __enter__(self) -> fragment_views:
        _FRAGMENTS.update(self.items)
        return self

    def __exit__(self, *exc: Any) -> None:
        for k in self.items:
            _FRAGMENTS.pop(k, None)


def _group_ids(shape: tuple, dims: tuple[int, ...], start: int, numel: int, device: Any) -> tuple[Tensor, int]:
    """For flat elements ``[start, start + numel)`` of a tensor of ``shape``: the index of the
    group (over reduced ``dims``) of each, and the number of groups."""
    kept = [d for d in range(len(shape)) if d not in dims]
    j = torch.arange(start, start + numel, device=device)
    gid = torch.zeros_like(j)
    mult = 1
    for d in reversed(range(len(shape))):
        coord = j % shape[d]
        j = j // shape[d]
        if d in kept:
            gid += coord * mult
            mult *= shape[d]
    return gid, mult


def _fragment_group_map(params, dims_of, fn) -> list[Tensor]:
    """:func:`foreach_group_map` for ZeRO fragments: squared norms per group from each
    fragment (``index_add_``), all-reduced (one collective per process group for the list),
    then ``fn`` per parameter, and the factors gathered back per element."""
    import torch.distributed as dist

    frags = [_FRAGMENTS[id(v)] for v in params]
    plan = []
    pending: dict[int, list[int]] = defaultdict(list)
    sq = []
    for i, (v, f) in enumerate(zip(params, frags)):
        stand_in = f.param if tuple(f.param.shape) == tuple(f.shape) else torch.empty(f.shape, device="meta")
        dims = tuple(dims_of(stand_in))
        if not f.shape:
            dims = ()
        gid, n_groups = _group_ids(tuple(f.shape), dims, f.start, f.numel, v.device)
        acc = torch.float32 if v.dtype in _LOW else v.dtype
        s = torch.zeros(n_groups, dtype=acc, device=v.device)
        a = v.to(acc)
        s.index_add_(0, gid, a * a)
        plan.append((gid, math.prod(f.shape[d] for d in dims)))
        sq.append(s)
        pending[id(f.group)].append(i)
    for idx in pending.values():
        flat = torch.cat([sq[i] for i in idx])
        group = frags[idx[0]].group
        if group is not None or dist.is_initialized():
            dist.all_reduce(flat, group=group)
        off = 0
        for i in idx:
            n = sq[i].numel()
            sq[i] = flat[off : off + n]
            off += n
    out = []
    for s, (gid, size) in zip(sq, plan):
        factors = fn(s.sqrt(), size)
        factors = torch.as_tensor(factors, device=s.device)
        out.append(factors[gid] if factors.dim() else factors)
    return out


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
