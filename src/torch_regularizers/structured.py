"""Structured penalties: group lasso, sparse group lasso, L2-SP, orthogonality, custom ``fn``.

Each class implements the single-tensor reference math of
:class:`~torch_regularizers.Penalty` (``_value``, ``_grad``, ``_prox``); the group
penalties also have multi-tensor versions for the hot path in which tensors of equal
(small) shape share one stacked norm kernel, and whole-tensor groups use
``torch._foreach_norm``.

Groups (``GroupLasso``, ``SparseGroupLasso``, and the constraints ``MaxNorm``/``UnitNorm``)
are given by ``dim``: the dimensions reduced for each group norm, exactly as in
``torch.linalg.vector_norm(p, dim=dim)``. The default ``dim=None`` is one group per output
unit / channel, following the layer type of the parameter's owning module (recorded when
the :class:`~torch_regularizers.Regularizer` binds the rule):

* ``Linear``, ``Conv1d/2d/3d`` and any other module: dim 0 is the output, so every dim but
  0 is reduced (rows of a ``Linear`` weight);
* Hugging Face ``Conv1D`` (GPT-2, weight ``(in, out)``): dim 1 is the output, dim 0 is
  reduced (columns of the weight);
* ``ConvTranspose1d/2d/3d`` (weight ``(in, out/groups, *kernel)``): dim 1 is the output,
  every other dim is reduced. With ``groups > 1`` a group then holds output channel ``j`` of
  every conv group; pass ``dim=`` to choose otherwise.

A 1-D tensor (a bias) is one group. The single-tensor API on a tensor the rule was never
bound to (``rule.value(w)`` before any Regularizer) uses the generic rule (all but dim 0).
An explicit ``dim=`` is used as given on every layer. ``dim=0`` on a ``Linear(p, T).weight``
makes each *input feature* a group (a column: the weights of one feature across all T
outputs), which is scikit-learn's ``MultiTaskLasso`` grouping.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Callable, Union

import torch
from torch import Tensor, nn

from . import distributed as _dist
from . import kernels as _kernels
from . import select as _select
from ._precision import LOW_PRECISION as _LOW
from ._precision import acc as _acc
from ._rule import Strength, check_ratio
from .penalties import IMPLS, L1, Penalty, _soft_threshold_

__all__ = ["L2SP", "FnPenalty", "GroupLasso", "Orthogonal", "SparseGroupLasso"]

Scalar = Union[float, Tensor]
Dim = Union[int, Sequence[int], None]
#: tensors up to this many elements are stacked with their equal-shaped siblings so that
#: a group norm over many tiny tensors is one kernel instead of one per tensor.
_STACK_NUMEL = 1 << 16


# --------------------------------------------------------------------------- group helpers
def check_dim_arg(dim: object, owner: str) -> Dim:
    """Validate a ``dim=`` argument at construction: None, an int or a non-empty tuple of ints."""
    if dim is None:
        return None
    if isinstance(dim, bool):
        raise TypeError(f"{owner}: dim must be an int, a tuple of ints or None, got {dim!r}")
    if isinstance(dim, int):
        return dim
    if isinstance(dim, (tuple, list)):
        if not dim:
            raise ValueError(f"{owner}: dim must not be empty (use dim=None for the default)")
        if any(isinstance(d, bool) or not isinstance(d, int) for d in dim):
            raise TypeError(f"{owner}: dim must be an int, a tuple of ints or None, got {dim!r}")
        if len(set(dim)) != len(dim):
            raise ValueError(f"{owner}: dim={dim!r} repeats a dimension")
        return tuple(dim)
    raise TypeError(f"{owner}: dim must be an int, a tuple of ints or None, got {dim!r}")


def group_dims(dim: Dim, ndim: int, owner: str = "group rule") -> tuple[int, ...]:
    """The reduced dims for a tensor of ``ndim`` dims, normalized (non-negative, sorted).

    ``dim=None``: all but dim 0 (``ndim >= 2``), every dim otherwise (one group).
    Raises ``ValueError`` naming ``dim`` if the tensor lacks one of them.
    """
    if dim is None:
        return tuple(range(1, ndim)) if ndim >= 2 else tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(f"{owner}: dim={dim!r} is out of range for a {ndim}-D tensor")
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{owner}: dim={dim!r} names a dimension twice for a {ndim}-D tensor")
    return tuple(sorted(out))


def group_size(p: Tensor, dims: tuple[int, ...]) -> int:
    """Number of elements in each group (the product of the reduced dims' sizes)."""
    return math.prod(p.shape[d] for d in dims)


def group_norm(p: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Group norms with ``keepdim=True`` (fp32 for fp16/bf16); differentiable, and its
    autograd gradient at an all-zero group is 0 (torch's norm backward masks it), not NaN."""
    if _dist.is_dtensor(p):  # sharded groups: reduced across ranks, never Partial
        return _dist.group_norm(p, dims)
    a = _acc(p)
    if p.dim() == 0:
        return a.abs()
    return torch.linalg.vector_norm(a, dim=dims, keepdim=True)


def foreach_group_map(
    params: Sequence[Tensor],
    dims_of: Callable[[Tensor], tuple[int, ...]],
    fn: Callable[[Tensor, int], Tensor],
) -> list[Tensor]:
    """``fn(group_norms, group_size)`` for every tensor: keepdim-shaped per-group factors
    (fp32 norms for fp16/bf16), batched where it pays.

    Tensors of one shape (and dims) form a bucket, and ``fn`` runs once per bucket: whole-
    tensor groups take ``torch._foreach_norm``; small tensors are stacked and reduced by
    one kernel; large ones are reduced one by one (a stack would copy them).
    """
    if params and (_dist.is_dtensor(params[0]) or _dist.is_fragment(params[0])):
        return _dist.foreach_group_map(params, dims_of, fn)  # FSDP2 shards / ZeRO fragments
    out: list[Tensor | None] = [None] * len(params)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(tuple(p.shape), dims_of(p))].append(i)
    for (shape, dims), idx in buckets.items():
        ps = [params[i] for i in idx]
        size = math.prod(shape[d] for d in dims)
        acc = torch.float32 if ps[0].dtype in _LOW else ps[0].dtype
        if len(ps) > 1 and len(dims) == len(shape) and len(shape) > 0:
            n = torch.stack(torch._foreach_norm(ps, 2, dtype=acc))
            factors = list(fn(n, size).reshape((len(ps),) + (1,) * len(shape)).unbind(0))
        elif len(ps) > 1 and len(shape) > 0 and ps[0].numel() <= _STACK_NUMEL:
            dd = [d + 1 for d in dims]
            n = torch.linalg.vector_norm(torch.stack(ps), dim=dd, keepdim=True, dtype=acc)
            factors = list(fn(n, size).unbind(0))
        else:
            factors = [fn(group_norm(p, dims), size) for p in ps]
        for i, f in zip(idx, factors):
            out[i] = f
    return out  # type: ignore[return-value]


def _inv_or_zero(w: float, n: Tensor) -> Tensor:
    """w / n, or 0 for a zero group: the gradient coefficient of w·‖θ_g‖.

    Groups whose norm is below ``tiny·max(1, |w|)`` (zero, or subnormal) count as zero
    groups, so the coefficient never overflows and θ_g·coef is never inf or NaN.
    """
    floor = torch.finfo(n.dtype).tiny * max(1.0, abs(w))
    return torch.where(
        n > floor, w / n.clamp_min(floor), torch.zeros((), dtype=n.dtype, device=n.device)
    )


def _shrink_factor(thr: Scalar, n: Tensor) -> Tensor:
    """max(0, 1 − thr/n): the block soft-threshold factor. Exactly 1 when thr = 0 (so a
    masked step changes no bit), exactly 0 for n ≤ thr, never NaN at n = 0."""
    tiny = torch.finfo(n.dtype).tiny
    return (1 - thr / n.clamp_min(tiny)).clamp_min_(0)


def _is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (or a subclass), by class, so
    the core library never imports transformers."""
    return any(
        c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
        for c in type(m).__mro__
    )


def layout_dims(module: nn.Module | None, p: Tensor) -> tuple[int, ...] | None:
    """Default reduced dims of parameter ``p`` owned by ``module`` when its layer type puts
    the output units on a dim other than 0, else None (the generic default, all but dim 0).

    HF ``Conv1D`` weight ``(nx, nf)``: dim 1 is the output, reduce ``(0,)``.
    ``ConvTranspose*d`` weight ``(in, out/groups, *k)``: dim 1 is the output, reduce the rest.
    Only the weight-shaped parameter (also a parametrization's ``original``) is affected;
    biases and other shapes keep the generic default.
    """
    if module is None or isinstance(p, nn.parameter.UninitializedParameter):
        return None
    shape = tuple(p.shape)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        want = (module.in_channels, module.out_channels // module.groups, *module.kernel_size)
        if shape == want:
            return (0, *range(2, len(shape)))
        return None
    if _is_hf_conv1d(module):
        nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
        if len(shape) == 2 and (nf is None or nx is None or shape == (nx, nf)):
            return (0,)
    return None


class _DefaultDims:
    """Per-parameter default reduced dims recorded by ``_bind`` (from the owning module).

    Looked up by parameter identity; a tensor that is not a bound parameter (a clone, a
    detached view, an fp32 working copy) gets the dims of the bound parameters of its shape
    when they agree, else of the one sharing its storage, else the generic default.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[weakref.ref, tuple[int, ...]]] = {}
        self._by_shape: dict[tuple, list[tuple[weakref.ref, tuple[int, ...]]]] = defaultdict(list)

    def add(self, p: Tensor, dims: tuple[int, ...]) -> None:
        old = self._by_id.get(id(p))
        if old is not None and old[0]() is p:
            if old[1] == dims:
                return
            shp = self._by_shape[tuple(p.shape)]
            shp[:] = [e for e in shp if e[0]() is not p]
        entry = (weakref.ref(p), dims)
        self._by_id[id(p)] = entry
        self._by_shape[tuple(p.shape)].append(entry)

    def __reduce__(self):  # weak references do not pickle: a copy starts unbound
        return (_DefaultDims, ())

    def get(self, p: Tensor) -> tuple[int, ...] | None:
        e = self._by_id.get(id(p))
        if e is not None and e[0]() is p:
            return e[1]
        cands = [(r(), d) for r, d in self._by_shape.get(tuple(p.shape), ()) if r() is not None]
        if not cands:
            return None
        if len({d for _, d in cands}) == 1:
            return cands[0][1]
        try:  # same shape, different layouts: the bound parameter sharing p's storage
            ptr = p.data_ptr()
            for q, d in cands:
                if ptr and q.data_ptr() == ptr:
                    return d
        except (RuntimeError, TypeError, AttributeError):
            pass
        return None


def _record_layouts(rule: object, dim: Dim, params: list, modules: list | None) -> None:
    """``_bind`` helper of the group rules: remember each parameter's default dims."""
    if dim is not None:
        return
    table = rule.__dict__.get("_default_dims")
    if table is None:
        table = rule._default_dims = _DefaultDims()  # type: ignore[attr-defined]
    mods = list(modules) if modules is not None else [None] * len(params)
    for p, m in zip(params, mods):
        if isinstance(p, nn.parameter.UninitializedParameter):
            continue
        d = layout_dims(m, p)
        table.add(p, d if d is not None else group_dims(None, p.dim()))


def rule_dims(rule: object, dim: Dim, p: Tensor, owner: str) -> tuple[int, ...]:
    """The reduced dims a group rule uses for ``p``: ``dim`` if given, else the default
    recorded at bind time for ``p``'s layer type, else all but dim 0."""
    if dim is None:
        table = rule.__dict__.get("_default_dims")
        if table is not None:
            d = table.get(p)
            if d is not None and len(d) <= p.dim() and all(x < p.dim() for x in d):
                return d
    return group_dims(dim, p.dim(), owner)


def _bind_dims(owner: str, dim: Dim, names: list[str], params: list) -> None:
    bad = []
    for n, p in zip(names, params):
        try:
            group_dims(dim, p.dim(), owner)
        except ValueError:
            bad.append(f"{n} (shape {tuple(p.shape)})")
    if bad:
        raise ValueError(
            f"{owner}: dim={dim!r} is not a valid dim of the selected parameter(s) "
            + ", ".join(bad)
            + "; narrow the rule with on= or change dim"
        )


class _GroupMixin:
    """Group bookkeeping shared by the group penalties."""

    dim: Dim

    def _dims(self, p: Tensor) -> tuple[int, ...]:
        return rule_dims(self, self.dim, p, type(self).__name__)

    def _bind(self, names: list[str], params: list, modules: list | None = None) -> None:
        _bind_dims(type(self).__name__, self.dim, names, params)
        _record_layouts(self, self.dim, params, modules)

    def _group_stats(self, params: list, strength: float) -> dict:
        vals, zero_groups, zero_elems = [], [], []
        n_groups = 0
        dev = params[0].device
        for p in params:
            n = group_norm(p.detach(), self._dims(p))
            # DTensors: one batched reduction across shards (plain tensors pass through)
            v, zg, ze = _dist.full_values(
                [self._value(p.detach(), strength), (n == 0).sum(), (p.detach() == 0).sum()]
            )
            vals.append(v.to(dev, torch.float64))
            zero_groups.append(zg.to(dev))
            zero_elems.append(ze.to(dev))
            n_groups += n.numel()
        zg = torch.stack(zero_groups).sum().to(torch.float64)
        return {
            "value": torch.stack(vals).sum(),
            "sparsity": torch.stack(zero_elems).sum().to(torch.float64)
            / max(1, sum(p.numel() for p in params)),
            "zero_groups": zg,
            "zero_group_fraction": zg / max(1, n_groups),
        }


def _check_groups_arg(groups: object, dim: Dim, kwargs: dict, owner: str) -> object:
    """Validate ``groups=`` (a grouping spanning tensors, e.g. ``tr.prune.CoupledGroups``)."""
    if groups is None:
        return None
    if not (callable(getattr(groups, "_bind_rule", None)) and callable(getattr(groups, "selector", None))):
        raise TypeError(
            f"{owner}: groups= must be a tr.prune.CoupledGroups (e.g. tr.prune.channel_groups("
            f"model, example_inputs)), got {type(groups).__name__}"
        )
    if dim is not None:
        raise ValueError(f"{owner}: dim= and groups= are exclusive (groups= defines the groups)")
    if kwargs.get("stochastic_rounding"):
        raise ValueError(f"{owner}(groups=...): stochastic_rounding=True is not supported")
    return groups


# --------------------------------------------------------------------------- group lasso
class GroupLasso(_GroupMixin, Penalty):
    r"""Group lasso R(θ) = λ·Σ_g √(size_g)·‖θ_g‖₂.

    Args:
        strength: λ (float or schedule ``f(step)``).
        dim: the dims reduced for each group norm, as in ``torch.linalg.vector_norm``.
            Default: one group per output unit/channel, by the owning layer's type: all
            but dim 0 for ``Linear``/``Conv`` (and any other module), all but dim 1 for HF
            ``Conv1D`` (weight ``(in, out)``: whole columns) and ``ConvTranspose1d/2d/3d``
            (weight ``(in, out/groups, *k)``); a 1-D tensor is one group. Outside a
            Regularizer (``rule.value(w)`` on an unbound tensor) the default is all but
            dim 0. An explicit ``dim`` applies as given to every selected tensor: ``dim=0``
            on a ``Linear`` weight is one group per input feature.
        groups: instead of ``dim``, a grouping whose groups span several tensors
            (:class:`tr.prune.CoupledGroups <torch_regularizers.prune.CoupledGroups>`, e.g.
            ``tr.prune.channel_groups(model, x)``: one group per channel with its conv rows,
            BatchNorm entries and consumer columns). θ_g is the whole slice set and size_g
            its element count; the prox is the block soft-threshold of the whole set (of
            overlapping groups: the product of their factors, see ``tr.prune``). ``on=``
            defaults to exactly the covered parameters (and must select exactly them).
            ``value(p)`` of the grouping's first tensor is the whole R, 0 for the others
            (``reg.value()`` sums them); ``grad(p)`` is ∂R/∂p; the single-tensor ``prox(p)``
            is not defined (use a Regularizer or ``prox_`` on the grouping's tensors).

    ∇R = λ√size_g·θ_g/‖θ_g‖, and 0 for an all-zero group (never NaN, also through
    autograd in ``mode="loss"``). prox_{tR}(θ)_g = θ_g·max(0, 1 − tλ√size_g/‖θ_g‖) (block
    soft-threshold): whole groups become exactly 0, so use ``mode="prox"`` for structured
    sparsity. ``stats()`` reports ``value``, ``sparsity`` (fraction of exact zeros),
    ``zero_groups`` (count) and ``zero_group_fraction``.

    scikit-learn's ``MultiTaskLasso(alpha)`` has no √size factor: with T outputs it is
    ``GroupLasso(alpha / sqrt(T), dim=0)`` on ``Linear(p, T, bias=False).weight`` with the
    data term ``‖Y − XWᵀ‖²/(2n)``.
    """

    reports_sparsity = True

    def __init__(
        self,
        strength: Strength,
        dim: Dim = None,
        *,
        groups: object | None = None,
        on: _select.Selector | None = None,
        mode: str = "grad",
        name: str | None = None,
        lr_coupling: str = "lr",
        **kwargs,
    ) -> None:
        self.dim = check_dim_arg(dim, type(self).__name__)
        self.groups = _check_groups_arg(groups, dim, kwargs, type(self).__name__)
        if groups is not None and on is None:
            on = groups.selector()
        super().__init__(strength, on=on, mode=mode, name=name, lr_coupling=lr_coupling, **kwargs)

    def _extra_repr(self) -> str:
        return f"groups={self.groups!r}" if self.groups is not None else f"dim={self.dim!r}"

    # --- coupled groups (groups=): the math lives in the bound grouping (tr.prune)
    def _coupled_plan(self):
        plan = self.__dict__.get("_coupled")
        if plan is None:
            raise ValueError(
                f"{type(self).__name__}(groups=...) is not bound: build a tr.Regularizer with it "
                "first (the grouping names the model's parameters)"
            )
        return plan

    def _bind(self, names: list[str], params: list, modules: list | None = None) -> None:
        if self.groups is None:
            return super()._bind(names, params, modules)
        self._coupled = self.groups._bind_rule(type(self).__name__, names, params)

    def _unbind(self) -> None:
        super()._unbind()
        self.__dict__.pop("_coupled", None)

    def _coupled_run(self, op: str, tensors: tuple, strength, coef, impl: str) -> None:
        if impl not in IMPLS:
            raise ValueError(f"{type(self).__name__}: impl={impl!r} is not one of {IMPLS}")
        lam = self._resolve_strength(strength)
        if lam == 0 or not tensors[0]:
            return
        plan = self._coupled_plan()
        with torch.no_grad():
            getattr(plan, op)(
                *(list(t) for t in tensors), lam, coef, getattr(self, "l1_ratio", 0.0),
                reference=impl == "reference",
            )

    def grad_(self, params, grads, strength=None, scale=1.0, *, impl="foreach"):
        if self.groups is None:
            return super().grad_(params, grads, strength, scale, impl=impl)
        self._coupled_run("grad_", (params, grads), strength, scale, impl)

    def decay_(self, params, strength=None, eta=1.0, *, impl="foreach"):
        if self.groups is None:
            return super().decay_(params, strength, eta, impl=impl)
        self._coupled_run("decay_", (params,), strength, eta, impl)

    def prox_(self, params, strength=None, eta=1.0, *, impl="foreach"):
        if self.groups is None:
            return super().prox_(params, strength, eta, impl=impl)
        self._coupled_run("prox_", (params,), strength, eta, impl)

    # --- group part, reused by SparseGroupLasso with λ·(1 − ρ)
    def _gl_value(self, p: Tensor, lam: float) -> Tensor:
        if self.groups is not None:
            return self._coupled_plan().value_share(p, lam)
        dims = self._dims(p)
        return (lam * math.sqrt(group_size(p, dims))) * group_norm(p, dims).sum()

    def _gl_coef(self, p: Tensor, lam: float, n: Tensor | None = None) -> Tensor:
        if self.groups is not None:
            return self._coupled_plan().coef_of(p, lam)
        dims = self._dims(p)
        if n is None:
            n = group_norm(p, dims)
        return _inv_or_zero(lam * math.sqrt(group_size(p, dims)), n)

    def _gl_prox(self, p: Tensor, lam: float, t: Scalar) -> Tensor:
        if self.groups is not None:
            raise ValueError(
                f"{type(self).__name__}(groups=...): the prox couples several tensors, so the "
                "single-tensor prox(p) is not defined; use a Regularizer (reg.apply_prox, or "
                "mode='prox' with an optimizer) or rule.prox_(tensors) on the grouping's tensors"
            )
        dims = self._dims(p)
        thr = t * (lam * math.sqrt(group_size(p, dims)))
        return p.mul_(_shrink_factor(thr, group_norm(p, dims)))

    def _gl_factors(self, params: list[Tensor], fn: Callable[[Tensor, float], Tensor]) -> list[Tensor]:
        """``fn(norms, sqrt(size))`` for every tensor, once per bucket of equal shapes."""
        return foreach_group_map(params, self._dims, lambda n, size: fn(n, math.sqrt(size)))

    def _gl_foreach_grad_(self, params, grads, lam, scale):
        coefs = self._gl_factors(params, lambda n, rs: _inv_or_zero(lam * rs * scale, n))
        torch._foreach_addcmul_(_dist.locals_(grads), _dist.locals_(params), coefs)

    def _gl_foreach_decay_(self, params, lam, eta):
        factors = self._gl_factors(params, lambda n, rs: 1 - eta * _inv_or_zero(lam * rs, n))
        torch._foreach_mul_(_dist.locals_(params), factors)

    def _gl_foreach_prox_(self, params, lam, eta):
        if _kernels.group_shrink_(params, self._dims, lam, eta):  # one launch (Triton backend)
            return
        factors = self._gl_factors(params, lambda n, rs: _shrink_factor(eta * lam * rs, n))
        torch._foreach_mul_(_dist.locals_(params), factors)

    # --- Penalty interface
    def _value(self, p, lam):
        return self._gl_value(p, lam)

    def _grad(self, p, lam):
        return (p * self._gl_coef(p, lam)).to(p.dtype)

    def _prox(self, p, lam, t):
        return self._gl_prox(p, lam, t)

    def _foreach_grad_(self, params, grads, lam, scale):
        if params[0].dtype in _LOW:  # fp32 math, then the parameter's dtype
            return super()._foreach_grad_(params, grads, lam, scale)
        self._gl_foreach_grad_(params, grads, lam, scale)

    def _foreach_decay_(self, params, lam, eta):
        if params[0].dtype in _LOW:
            return super()._foreach_decay_(params, lam, eta)
        self._gl_foreach_decay_(params, lam, eta)

    def _foreach_prox_(self, params, lam, eta):
        self._gl_foreach_prox_(params, lam, eta)

    def stats_tensors(self, params, strength):
        if self.groups is not None and params:
            with torch.no_grad():
                plan = self._coupled_plan()
                dev = plan.device
                value = torch.stack([self._value(p, strength).to(dev, torch.float64) for p in params])
                zeros = torch.stack([(p == 0).sum().to(dev) for p in params]).sum()
                zg, n_groups = plan.zero_group_count()
                zg = zg.to(torch.float64)
                return {
                    "value": value.sum(),
                    "sparsity": zeros.to(torch.float64) / max(1, sum(p.numel() for p in params)),
                    "zero_groups": zg,
                    "zero_group_fraction": zg / max(1, n_groups),
                }
        return self._group_stats(params, strength) if params else {}


class SparseGroupLasso(GroupLasso):
    r"""Sparse group lasso R(θ) = λ·ρ·‖θ‖₁ + λ·(1 − ρ)·Σ_g √(size_g)·‖θ_g‖₂ (ρ = ``l1_ratio``).

    Same λ for both parts: ``l1_ratio=1`` is :class:`~torch_regularizers.L1` (lasso),
    ``l1_ratio=0`` is :class:`GroupLasso`. ``dim`` as for :class:`GroupLasso` (default: one
    group per output unit, by layer type: HF ``Conv1D`` and ``ConvTranspose`` weights group
    along dim 1), or ``groups=`` (coupled groups spanning several tensors, as for
    :class:`GroupLasso`).
    prox_{tR} = group prox with tλ(1 − ρ) after the L1 prox (soft-threshold by tλρ); this
    composition is the exact prox of the sum. Exact zeros both inside groups and of
    whole groups with ``mode="prox"``.
    """

    def __init__(
        self,
        strength: Strength,
        l1_ratio: float = 0.5,
        dim: Dim = None,
        *,
        groups: object | None = None,
        on: _select.Selector | None = None,
        mode: str = "grad",
        name: str | None = None,
        lr_coupling: str = "lr",
        **kwargs,
    ) -> None:
        self.l1_ratio = check_ratio(l1_ratio, "l1_ratio", type(self).__name__)
        super().__init__(
            strength, dim, groups=groups, on=on, mode=mode, name=name, lr_coupling=lr_coupling,
            **kwargs,
        )

    def _extra_repr(self) -> str:
        g = f"groups={self.groups!r}" if self.groups is not None else f"dim={self.dim!r}"
        return f"l1_ratio={self.l1_ratio}, {g}"

    def _value(self, p, lam):
        rho = self.l1_ratio
        return (lam * rho) * _acc(p).abs().sum() + self._gl_value(p, lam * (1 - rho))

    def _grad(self, p, lam):
        rho = self.l1_ratio
        d = p * self._gl_coef(p, lam * (1 - rho))
        return d.add_(torch.sign(p), alpha=lam * rho).to(p.dtype)

    def _prox(self, p, lam, t):
        rho = self.l1_ratio
        _soft_threshold_(p, t * (lam * rho))
        return self._gl_prox(p, lam * (1 - rho), t)

    def _foreach_grad_(self, params, grads, lam, scale):
        if params[0].dtype in _LOW:
            return Penalty._foreach_grad_(self, params, grads, lam, scale)
        rho = self.l1_ratio
        self._gl_foreach_grad_(params, grads, lam * (1 - rho), scale)
        _L1_MATH._foreach_grad_(_dist.locals_(params), _dist.locals_(grads), lam * rho, scale)

    def _foreach_decay_(self, params, lam, eta):
        if params[0].dtype in _LOW:
            return Penalty._foreach_decay_(self, params, lam, eta)
        rho = self.l1_ratio
        signs = torch._foreach_sign(_dist.locals_(params))  # both parts use θ before the step
        self._gl_foreach_decay_(params, lam * (1 - rho), eta)
        torch._foreach_add_(_dist.locals_(params), signs, alpha=-eta * lam * rho)

    def _foreach_prox_(self, params, lam, eta):
        rho = self.l1_ratio
        _L1_MATH._foreach_prox_(_dist.locals_(params), lam * rho, eta)  # soft-threshold by η·λ·ρ
        self._gl_foreach_prox_(params, lam * (1 - rho), eta)


#: L1 math (its multi-tensor kernels take λ explicitly), for SparseGroupLasso's L1 part
_L1_MATH = L1(1.0)


# --------------------------------------------------------------------------- L2-SP
class L2SP(Penalty):
    r"""L2-SP (Li et al. 2018): R(θ) = ½·λ·‖θ − θ₀‖², decay toward reference weights θ₀.

    Args:
        strength: λ.
        reference: ``None`` or ``"init"`` (default): a copy of each selected parameter taken
            when the :class:`~torch_regularizers.Regularizer` is constructed (typically the
            pre-trained weights). ``"ema"`` with ``ema_decay=β``: the reference starts there
            and follows θ, θ₀ ← β·θ₀ + (1 − β)·θ after every applied optimizer step (skipped
            steps excluded; HeavyBall's "decay to EMA"). A number c: decay toward the
            constant c (``tr.L2SP(1e-2, reference=1.0, on=tr.select.norms)`` pulls norm gains
            toward 1; stored as a full tensor per parameter). Or a mapping name → tensor (e.g. a
            pre-trained model's ``state_dict()``; an ``nn.Module`` is read through its
            ``state_dict()``), keyed by the parameter names that ``tr.select`` uses; entries
            for unselected names are ignored. Missing names and shape mismatches raise
            ``ValueError`` naming them.
        ema_decay: β for ``reference="ema"``.

    References live with the rule on the parameter's device and dtype, and are saved and
    restored exactly by ``reg.state_dict()``/``reg.load_state_dict()``. A rule instance
    belongs to one Regularizer (another Regularizer given it binds a copy, with its own
    references). When the model's parameters are replaced after construction
    (``load_state_dict(assign=True)``, …) the references taken at construction are kept
    where they still fit (same name, shape and device). The default reference of
    parameters on the meta device does not exist: build the Regularizer after the weights
    are materialized and loaded (``ValueError`` otherwise), or pass ``reference=``.
    ∇R = λ(θ − θ₀); prox_{tR}(θ) = θ₀ + (θ − θ₀)/(1 + tλ). All modes.
    ``stochastic_rounding=True`` is not supported (its fp32 working copy has no reference).
    """

    elementwise_prox = True
    #: the Regularizer passes DTensor parameters as they are (not their local shards)
    takes_dtensors = True

    supports_cautious = True
    supports_timescale = True

    def __init__(
        self,
        strength: Strength | None = None,
        reference: Mapping[str, Tensor] | nn.Module | str | float | None = None,
        *,
        ema_decay: float | None = None,
        on: _select.Selector | None = None,
        mode: str = "grad",
        name: str | None = None,
        lr_coupling: str = "lr",
        **kwargs,
    ) -> None:
        if kwargs.get("stochastic_rounding"):
            raise ValueError("L2SP: stochastic_rounding=True is not supported")
        if isinstance(reference, nn.Module):
            reference = reference.state_dict()
        if reference == "init":
            reference = None
        if isinstance(reference, str) and reference != "ema":
            raise ValueError(f"L2SP: reference={reference!r} is not 'init', 'ema', a number or a mapping")
        if isinstance(reference, bool) or not (
            reference is None or isinstance(reference, (str, Mapping)) or isinstance(reference, (int, float))
        ):
            raise TypeError(
                "L2SP: reference must be None/'init', 'ema', a number, a mapping name -> tensor "
                f"or a module, got {type(reference).__name__}"
            )
        if isinstance(reference, (int, float)) and not isinstance(reference, bool):
            if not math.isfinite(reference):
                raise ValueError(f"L2SP: a constant reference must be finite, got {reference!r}")
            reference = float(reference)
        if reference == "ema":
            if ema_decay is None:
                raise ValueError("L2SP: reference='ema' needs ema_decay=β (e.g. 0.999)")
            ema_decay = check_ratio(ema_decay, "ema_decay", "L2SP")
        elif ema_decay is not None:
            raise ValueError("L2SP: ema_decay= is only for reference='ema'")
        self.ema_decay = ema_decay
        self.reference = reference
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._refs: list[Tensor] = []
        self._by_id: dict[int, Tensor] = {}
        super().__init__(strength, on=on, mode=mode, name=name, lr_coupling=lr_coupling, **kwargs)

    def _bind(self, names: list[str], params: list, modules: list | None = None) -> None:
        refs = []
        if isinstance(self.reference, float):  # decay toward a constant (e.g. norm gains to 1)
            with torch.no_grad():
                refs = [torch.full_like(p, self.reference) for p in params]
        elif self.reference is None or self.reference == "ema":
            meta = [n for n, p in zip(names, params) if p.is_meta]
            if meta:
                raise ValueError(
                    "L2SP: the default reference is a copy of the weights when the Regularizer "
                    f"is built, but these are on the meta device (not materialized): "
                    f"{', '.join(meta)}. Build the Regularizer after to_empty() and loading the "
                    "weights, or pass reference="
                )
            with torch.no_grad():
                refs = [p.detach().clone() for p in params]
        else:
            missing = [n for n in names if n not in self.reference]
            if missing:
                raise ValueError(
                    "L2SP: reference has no entry for the selected parameter(s) "
                    + ", ".join(missing)
                )
            bad = [
                f"{n} (reference {tuple(self.reference[n].shape)}, parameter {tuple(p.shape)})"
                for n, p in zip(names, params)
                if tuple(torch.as_tensor(self.reference[n]).shape) != tuple(p.shape)
            ]
            if bad:
                raise ValueError(
                    "L2SP: reference shape differs from the parameter: " + ", ".join(bad)
                )
            with torch.no_grad():
                for n, p in zip(names, params):
                    r = torch.as_tensor(self.reference[n]).detach()
                    r = r.to(device=p.device, dtype=p.dtype, copy=True)
                    if _dist.is_dtensor(p) or _dist.is_dtensor(r):  # sharded like p
                        r = _dist.like(r, p)
                    refs.append(r)
        self._names = list(names)
        self._params = list(params)
        self._refs = refs
        self._by_id = {id(p): r for p, r in zip(params, refs)}

    def _ref(self, p: Tensor) -> Tensor:
        r = self._by_id.get(id(p))
        if r is not None:
            return r
        for q, r in zip(self._params, self._refs):  # a detached alias of a bound parameter
            if p.data_ptr() == q.data_ptr() and p.shape == q.shape and p.stride() == q.stride():
                return r
        raise ValueError(
            "L2SP: this tensor is not one of the parameters bound at Regularizer construction; "
            "build a tr.Regularizer with this rule first"
        )

    # references of the public single-tensor API are resolved before detach()/clone()
    def grad(self, p, strength=None):
        ref = self._ref(p)
        with torch.no_grad():
            return self._grad_ref(p.detach(), ref, self._resolve_strength(strength))

    def prox(self, p, step, strength=None):
        ref = self._ref(p)
        with torch.no_grad():
            return self._prox_ref(p.detach().clone(), ref, self._resolve_strength(strength), step)

    @staticmethod
    def _grad_ref(p: Tensor, ref: Tensor, lam: float) -> Tensor:
        return (p - ref).mul_(lam)

    @staticmethod
    def _prox_ref(p: Tensor, ref: Tensor, lam: float, t: Scalar) -> Tensor:
        return p.sub_(ref).div_(1 + t * lam).add_(ref)

    def _value(self, p, lam):
        d = _acc(p) - _acc(self._ref(p))
        return 0.5 * lam * (d * d).sum()

    def _grad(self, p, lam):
        return self._grad_ref(p, self._ref(p), lam)

    def _prox(self, p, lam, t):
        return self._prox_ref(p, self._ref(p), lam, t)

    # DTensor (FSDP2) parameters arrive whole (``takes_dtensors``), so that their references
    # are found; the math runs on the local shards
    def _foreach_grad_(self, params, grads, lam, scale):
        refs = _dist.locals_([self._ref(p) for p in params])
        params, grads = _dist.locals_(params), _dist.locals_(grads)
        torch._foreach_add_(grads, params, alpha=lam * scale)
        torch._foreach_add_(grads, refs, alpha=-lam * scale)

    def _foreach_decay_(self, params, lam, eta):
        refs = _dist.locals_([self._ref(p) for p in params])
        params = _dist.locals_(params)
        torch._foreach_mul_(params, 1 - eta * lam)  # θ(1 − ηλ) + ηλθ₀ = θ − ηλ(θ − θ₀)
        torch._foreach_add_(params, refs, alpha=eta * lam)

    def _foreach_prox_(self, params, lam, eta):
        refs = _dist.locals_([self._ref(p) for p in params])
        params = _dist.locals_(params)
        torch._foreach_sub_(params, refs)
        torch._foreach_div_(params, 1 + eta * lam)
        torch._foreach_add_(params, refs)

    @property
    def references(self) -> dict[str, Tensor]:
        """Parameter name → reference tensor (after binding)."""
        return dict(zip(self._names, self._refs))

    def _rebind(self, names: list[str], params: list, modules: list | None = None) -> None:
        """Replaced parameters (``load_state_dict(assign=True)``, …): a default reference
        taken at construction is kept for every name whose reference still fits (same shape
        and device); the others are taken from the new weights now."""
        old = dict(zip(self._names, self._refs))
        self._bind(names, params, modules)
        if self.reference not in (None, "ema"):
            return
        for i, (n, p) in enumerate(zip(names, params)):
            r = old.get(n)
            if r is not None and r.shape == p.shape and r.device == p.device:
                self._refs[i] = r.to(p.dtype)
        self._by_id = {id(p): r for p, r in zip(params, self._refs)}

    def _unbind(self) -> None:
        super()._unbind()
        self._names, self._params, self._refs, self._by_id = [], [], [], {}

    def _decay_dir(self, p: Tensor, before: Tensor) -> Tensor:
        return before - _dist.local(self._ref(p)) if _dist.is_dtensor(self._ref(p)) else before - self._ref(p)

    def ema_update_(self, params: Sequence[Tensor], weight: Scalar) -> None:
        """``reference="ema"``: θ₀ ← β·θ₀ + (1 − β)·θ after an applied step, as
        ``θ₀.lerp_(θ, weight)`` with ``weight`` = 1 − β (0 where the step was skipped)."""
        with torch.no_grad():
            for p in params:
                r = self._ref(p)
                _dist.local(r).lerp_(_dist.local(p).to(r.dtype), weight)

    def rule_state_dict(self) -> dict:
        return {"reference": {n: r.detach().clone() for n, r in zip(self._names, self._refs)}}

    def load_rule_state_dict(self, state: dict) -> None:
        saved = state.get("reference", {})
        missing = [n for n in self._names if n not in saved]
        extra = [n for n in saved if n not in self._names]
        if missing or extra:
            raise ValueError(
                f"L2SP: saved references do not match the bound parameters "
                f"(missing: {missing or 'none'}, unexpected: {extra or 'none'})"
            )
        bad = [
            f"{n} (saved {tuple(saved[n].shape)}, parameter {tuple(r.shape)})"
            for n, r in zip(self._names, self._refs)
            if tuple(saved[n].shape) != tuple(r.shape)
        ]
        if bad:
            raise ValueError("L2SP: saved reference shape differs: " + ", ".join(bad))
        with torch.no_grad():
            for n, r in zip(self._names, self._refs):
                s = saved[n]
                r.copy_(_dist.like(s, r) if _dist.is_dtensor(r) or _dist.is_dtensor(s) else s)


# --------------------------------------------------------------------------- orthogonality
class Orthogonal(Penalty):
    r"""Soft orthogonality: R(W) = λ·‖WWᵀ − I‖²_F on the matrix view W = θ.reshape(out, −1)
    (conv weights flattened to (out, in·kh·kw)).

    Computed with the *smaller* Gram matrix, so wide or tall layers stay cheap: for every W,
    ‖WWᵀ − I_out‖²_F = ‖WᵀW − I_in‖²_F + max(0, out − in) when out > in (WWᵀ has rank ≤ in),
    so the value is λ·(‖G − I‖²_F + max(0, out − in)) with G = WWᵀ if out ≤ in else WᵀW, and
    ∇R = 4λ·(WWᵀ − I)W = 4λ·W(WᵀW − I). Its minimum is 0 for orthonormal rows (out ≤ in) and
    λ·(out − in) for orthonormal columns (out > in). Modes grad, decoupled, loss (no prox).
    Needs tensors with at least 2 dims.
    """

    has_prox = False
    _modes = ("grad", "decoupled", "loss")

    def _bind(self, names, params, modules=None):
        bad = [f"{n} (shape {tuple(p.shape)})" for n, p in zip(names, params) if p.dim() < 2]
        if bad:
            raise ValueError(
                "Orthogonal: needs parameters with at least 2 dims; selected " + ", ".join(bad)
            )

    @staticmethod
    def _gram_minus_eye(w: Tensor) -> tuple[Tensor, bool]:
        rows = w.shape[0] <= w.shape[1]
        g = w @ w.T if rows else w.T @ w
        return g - torch.eye(g.shape[0], dtype=g.dtype, device=g.device), rows

    def _matrix(self, p: Tensor) -> Tensor:
        if p.dim() < 2:
            raise ValueError(
                f"Orthogonal: needs a tensor with at least 2 dims, got shape {tuple(p.shape)}"
            )
        return _acc(p).reshape(p.shape[0], -1)

    def _value(self, p, lam):
        if _dist.is_dtensor(p):  # FSDP2: on the full matrix (all-gather, differentiable)
            return self._value(_dist.full(p), lam)
        w = self._matrix(p)
        d, _ = self._gram_minus_eye(w)
        return lam * ((d * d).sum() + max(0, w.shape[0] - w.shape[1]))

    def _grad(self, p, lam):
        if _dist.is_dtensor(p):  # FSDP2: gradient of the full matrix, sharded like p
            return _dist.like(self._grad(_dist.full(p), lam), p)
        w = self._matrix(p)
        d, rows = self._gram_minus_eye(w)
        g = d @ w if rows else w @ d
        return g.mul_(4 * lam).reshape(p.shape).to(p.dtype)


# --------------------------------------------------------------------------- custom penalties
class FnPenalty(Penalty):
    r"""R(θ) = λ·fn(θ) for any differentiable ``fn(tensor) -> scalar tensor``.

    Made by :meth:`Penalty.from_fn`. In ``"loss"`` mode ``fn`` is applied to the parameter
    itself (joins the model's graph through ``reg.penalty()``). In ``"grad"``/``"decoupled"``
    mode the gradient is autograd of ``fn`` on a detached alias of the parameter, so the
    model's graph is never touched. fp16/bf16 parameters are passed to ``fn`` in fp32.
    ``fn`` is called once on every selected parameter at ``Regularizer`` construction: a
    non-tensor result raises ``TypeError``, a non-scalar or non-differentiable one (e.g. it
    calls ``.item()`` or ``.detach()``) raises ``ValueError`` naming the rule and parameter.
    """

    @property
    def default_name(self) -> str:
        """``fn``'s own name (``"custom"`` for a lambda)."""
        n = getattr(self.fn, "__name__", "")
        return n.lower() if n.isidentifier() else "custom"

    has_prox = False
    _modes = ("grad", "decoupled", "loss")

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        strength: Strength = 1.0,
        *,
        name: str | None = None,
        on: _select.Selector | None = None,
        mode: str = "grad",
        lr_coupling: str = "lr",
        **kwargs,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"Penalty.from_fn: fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        super().__init__(strength, on=on, mode=mode, name=name, lr_coupling=lr_coupling, **kwargs)

    def _extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', type(self.fn).__name__)}"

    def _label(self) -> str:
        return f"rule {self.name or self.default_name!r} (Penalty.from_fn({getattr(self.fn, '__name__', 'fn')}))"

    def _call(self, x: Tensor, where: str = "") -> Tensor:
        """fn(x), checked: a scalar tensor, differentiable whenever x is tracked."""
        v = self.fn(x)
        if not isinstance(v, Tensor):
            raise TypeError(
                f"{self._label()}: fn must return a tensor{where}, got {type(v).__name__}"
            )
        if v.numel() != 1:
            raise ValueError(
                f"{self._label()}: fn must return a scalar{where}, got shape {tuple(v.shape)}"
            )
        if torch.is_grad_enabled() and x.requires_grad and not v.requires_grad:
            raise ValueError(
                f"{self._label()}: fn's result{where} does not depend differentiably on its input "
                "(no autograd graph: .item(), .detach(), integer ops?)"
            )
        return v.reshape(())

    def _bind(self, names, params, modules=None):
        for n, p in zip(names, params):
            with torch.enable_grad():
                x = _acc(_dist.full(p.detach()))
                self._call(x.requires_grad_(True), f" for parameter {n}")

    def _value(self, p, lam):
        return lam * self._call(_acc(_dist.full(p)))  # fn sees the whole tensor under FSDP2

    def _grad(self, p, lam):
        if _dist.is_dtensor(p):  # FSDP2: gradient of fn at the full tensor, sharded like p
            return _dist.like(self._grad(_dist.full(p.detach()), lam), p)
        with torch.enable_grad():
            x = _acc(p.detach()).requires_grad_(True)
            (g,) = torch.autograd.grad(self._call(x), x, allow_unused=True)
        if g is None:
            return torch.zeros_like(p)
        return (g * lam).to(p.dtype)  # not in place: autograd may return an expanded tensor
