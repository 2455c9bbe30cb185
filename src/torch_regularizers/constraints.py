"""Constraints: projections applied after each optimizer step (after any prox rule).

Keras 3 formulas, ``ε = 1e-7`` (Keras' ``backend.epsilon()``):

* ``MaxNorm(m, dim)``: groups whose norm n exceeds m are scaled to w·m/(ε + n); groups
  with n ≤ m are left untouched (Keras computes w·clip(n, 0, m)/(ε + n) for every group,
  which also shrinks groups under the cap by a factor n/(ε + n); we do not).
* ``UnitNorm(dim)``: w/(ε + ‖w‖) per group.
* ``NonNeg()``: w·(w ≥ 0), computed as ``clamp_min(w, 0)`` (negative entries become +0.0).

Norm control (not in Keras): ``FixedNorm(radius, dim)`` rescales every group to norm
``radius`` (or its norm at construction); ``SpectralNorm(c)`` caps the largest singular value
of the matrix view, W ← W·min(1, c/σ̂).

``dim`` is as for :class:`~torch_regularizers.GroupLasso`: the dims reduced for each
group norm (default all but dim 0: each output unit's incoming weights of a ``Linear``;
Keras' ``axis=0`` on a Dense kernel of shape (in, out) is the same grouping).

A step skipped by ``GradScaler`` (``found_inf`` non-zero) changes no bit, without a host
sync: the per-group factors are blended with the mask on device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import distributed as _dist
from . import kernels as _kernels
from . import select as _select
from ._precision import LOW_PRECISION as _LOW
from ._rule import Rule, check_nonneg, kept_state, same_layout
from .structured import (
    Dim,
    _bind_dims,
    _record_layouts,
    check_dim_arg,
    foreach_group_map,
    group_norm,
    rule_dims,
)

__all__ = ["ALL", "Constraint", "FixedNorm", "MaxNorm", "NonNeg", "SpectralNorm", "UnitNorm"]

_EPS = 1e-7


def _skip_mask(found_inf: Tensor | None, device: torch.device) -> Tensor | None:
    return None if found_inf is None else (found_inf.to(device) != 0)


class Constraint(Rule):
    """Base of constraints: a projection ``project_(params)`` applied after every step.

    Subclasses implement ``_project_(p, skip)`` (in place, one tensor; ``skip`` is None or
    a 0-d bool tensor meaning "change nothing") and may override ``_foreach_project_``.
    Constraints have no strength: ``strength_at`` is 0.
    """

    _modes = ("constraint",)
    _default_mode = "constraint"

    def __init__(
        self,
        *,
        on: _select.Selector | None = None,
        mode: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(on=on, mode=mode, name=name)
        self._strength = 0.0

    def _set_strength(self, strength, arg="strength"):
        raise AttributeError(f"{type(self).__name__} is a constraint and has no strength")

    def strength_at(self, step: int, rule: str | None = None) -> float:
        return 0.0

    def __repr__(self) -> str:
        extra = self._extra_repr()
        return f"{type(self).__name__}({extra + ', ' if extra else ''}on={self.on!r})"

    # ------------------------------------------------------------------ math
    def _project_(self, p: Tensor, skip: Tensor | None) -> None:
        raise NotImplementedError

    def _foreach_project_(self, params: list[Tensor]) -> None:
        for p in params:
            self._project_(p, None)

    def project(self, p: Tensor) -> Tensor:
        """The projection of ``p``, a new tensor."""
        with torch.no_grad():
            out = p.detach().clone()
            self._project_(out, None)
            return out

    def project_(
        self,
        params: Sequence[Tensor],
        *,
        found_inf: Tensor | None = None,
        impl: str = "foreach",
    ) -> None:
        """In place over tensors of one device/dtype. ``found_inf`` non-zero: change nothing."""
        if not params:
            return
        with torch.no_grad():
            if found_inf is not None or impl == "reference":
                skip = _skip_mask(found_inf, params[0].device)
                for p in params:
                    self._project_(p, skip)
            else:
                self._foreach_project_(list(params))


class _GroupConstraint(Constraint):
    def __init__(self, dim: Dim = None, eps: float = _EPS, **kw) -> None:
        self.dim = check_dim_arg(dim, type(self).__name__)
        self.eps = check_nonneg(eps, "eps", type(self).__name__)
        super().__init__(**kw)

    def _dims(self, p: Tensor) -> tuple[int, ...]:
        return rule_dims(self, self.dim, p, type(self).__name__)

    def _bind(self, names, params, modules=None):
        _bind_dims(type(self).__name__, self.dim, names, params)
        _record_layouts(self, self.dim, params, modules)

    def _factor(self, n: Tensor) -> Tensor:
        raise NotImplementedError

    def _project_(self, p, skip):
        f = self._factor(group_norm(p, self._dims(p)))
        # DTensor (FSDP2): the factors of the local groups broadcast against the local shard
        f, p = _dist.local(f), _dist.local(p)
        if skip is not None:
            f = torch.where(skip, torch.ones((), dtype=f.dtype, device=f.device), f)
        p.mul_(f)

    def _foreach_project_(self, params):
        # MaxNorm / UnitNorm (not subclasses with their own factor): one launch (Triton backend)
        kind = {MaxNorm._factor: "maxnorm", UnitNorm._factor: "unitnorm"}.get(type(self)._factor)
        m = getattr(self, "max_value", 0.0)
        if kind and _kernels.group_project_(params, self._dims, kind, m, self.eps):
            return
        factors = foreach_group_map(params, self._dims, lambda n, size: self._factor(n))
        params = _dist.locals_(params)
        if params[0].dtype in _LOW:  # fp32 factors, product rounded once to the param dtype
            for p, f in zip(params, factors):
                p.mul_(f)
        else:
            torch._foreach_mul_(params, factors)

    def stats_tensors(self, params, strength):
        if not params:
            return {}
        dev = params[0].device
        mx = [group_norm(p.detach(), self._dims(p)) for p in params if p.numel()]
        mx = [m.to(dev) for m in _dist.extremes(mx, "max")]  # DTensor: over shards, empty ones too
        return {"max_norm": torch.stack(mx).max().to(torch.float64)} if mx else {}


class MaxNorm(_GroupConstraint):
    r"""Max-norm constraint: every group's L2 norm is at most ``max_value``.

    After each step, a group with norm n > m becomes w·m/(ε + n) (Keras' formula); groups
    with n ≤ m are unchanged (no Keras-style shrink by n/(ε + n)). ``dim`` as for
    :class:`~torch_regularizers.GroupLasso`: the default bounds each output unit's incoming
    weights, by layer type (rows of a ``Linear``/``Conv`` weight; columns of an HF ``Conv1D``
    weight, dim 1 of a ``ConvTranspose`` weight), as does ``dim=1`` on a ``Linear`` weight.
    ``stats()`` reports ``max_norm``.
    """

    def __init__(
        self,
        max_value: float,
        dim: Dim = None,
        *,
        eps: float = _EPS,
        on: _select.Selector | None = None,
        mode: str | None = None,
        name: str | None = None,
    ) -> None:
        self.max_value = check_nonneg(max_value, "max_value", "MaxNorm")
        super().__init__(dim, eps, on=on, mode=mode, name=name)

    def _extra_repr(self):
        return f"{self.max_value!r}, dim={self.dim!r}"

    def summary_strength(self):
        return self.max_value

    def _factor(self, n):
        m = self.max_value
        return torch.where(
            n > m, m / (n + self.eps), torch.ones((), dtype=n.dtype, device=n.device)
        )


class UnitNorm(_GroupConstraint):
    r"""Unit-norm constraint (Keras): every group becomes w/(ε + ‖w‖) after each step.

    An all-zero group stays 0. ``dim`` as for :class:`~torch_regularizers.GroupLasso`
    (default: one group per output unit, by layer type: HF ``Conv1D`` and ``ConvTranspose``
    weights group along dim 1).
    """

    def __init__(
        self,
        dim: Dim = None,
        *,
        eps: float = _EPS,
        on: _select.Selector | None = None,
        mode: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(dim, eps, on=on, mode=mode, name=name)

    def _extra_repr(self):
        return f"dim={self.dim!r}"

    def summary_strength(self):
        return 1.0

    def _factor(self, n):
        return 1 / (n + self.eps)


class NonNeg(Constraint):
    """Non-negativity (Keras ``NonNeg``): w ← w·(w ≥ 0), computed as ``clamp_min(w, 0)``.

    ``stats()`` reports ``min`` (the smallest value, ≥ 0 after a step).
    """

    def _project_(self, p, skip):
        if skip is None:
            p.clamp_min_(0)
        else:
            lo = torch.where(skip, float("-inf"), 0.0).to(p.dtype)
            p.clamp_min_(lo)

    def _foreach_project_(self, params):
        torch._foreach_clamp_min_(params, 0.0)

    def stats_tensors(self, params, strength):
        ps = [p for p in params if p.numel()]
        if not ps:
            return {}
        dev = ps[0].device
        mins = _dist.extremes(ps, "min")  # DTensor: min over shards, empty ones too
        return {"min": torch.stack([m.to(dev, torch.float64) for m in mins]).min()}


# --------------------------------------------------------------------------- norm control
#: ``FixedNorm(dim=ALL)``: the whole tensor is one group (``dim=None`` is the default groups)
ALL = "all"
#: power iterations added to the first projection of a matrix (its vectors start random),
#: as ``torch.nn.utils.parametrizations.spectral_norm`` does when it is registered
WARMUP_ITERATIONS = 15


def _lookup(by_id: dict, params: list, p: Tensor):
    """The state recorded for bound parameter ``p`` (or a detached alias of it), or None."""
    e = by_id.get(id(p))
    if e is not None:
        return e
    if _dist.is_dtensor(p):
        return None
    try:
        ptr = p.data_ptr()
    except (RuntimeError, TypeError):  # pragma: no cover - tensors without storage
        return None
    for q in params:
        if _dist.is_dtensor(q) or q.is_meta:
            continue
        if ptr and q.data_ptr() == ptr and q.shape == p.shape and q.stride() == p.stride():
            return by_id.get(id(q))
    return None


def _check_names(owner: str, what: str, saved: object, names: list[str]) -> dict:
    if not isinstance(saved, dict):
        raise ValueError(f"{owner}: saved {what} must be a dict name -> tensor")
    missing = [n for n in names if n not in saved]
    extra = [n for n in saved if n not in names]
    if missing or extra:
        raise ValueError(
            f"{owner}: saved {what} do not match the bound parameters "
            f"(missing: {missing or 'none'}, unexpected: {extra or 'none'})"
        )
    bad = [n for n in names if not isinstance(saved[n], Tensor)]
    if bad:
        raise ValueError(f"{owner}: saved {what} of {', '.join(bad)} are not tensors")
    return saved


class FixedNorm(_GroupConstraint):
    r"""Fixed-norm constraint: every group is rescaled to L2 norm ``radius`` after each step
    (nGPT / hyperball-style training: weights live on a sphere).

    w_g ← w_g·r_g/‖w_g‖₂, with r_g = ``radius`` for every group, or, with ``radius=None``,
    the group's own norm when the :class:`~torch_regularizers.Regularizer` is built (recorded
    at construction, kept when parameters are replaced and still fit, saved and restored
    exactly by ``reg.state_dict()``; parameters must be materialized by then: not on the meta
    device). A group whose norm is below ``tiny·max(1, r_g)`` (an all-zero group; ``tiny`` the
    smallest normal number of the norm's dtype) is left as it is: it stays zero, never NaN.
    With ``radius=None`` a group that is all-zero at construction has radius 0 and is kept at
    zero: give zero-initialized weights a ``radius=``.

    Args:
        radius: the target norm r ≥ 0, or ``None`` (each group keeps its norm at construction).
        dim: the dims reduced for each group norm, as for :class:`MaxNorm`. ``None``
            (default): the same output-unit groups as ``MaxNorm``, by layer type (rows of a
            ``Linear``/``Conv`` weight, columns of an HF ``Conv1D`` weight, dim 1 of a
            ``ConvTranspose`` weight). ``dim="all"`` (``tr.constraints.ALL``): the whole tensor
            is one group, on tensors of any shape (a sentinel, because ``dim=None`` means the
            default groups here as for every group rule).

    The factor r_g/‖w_g‖ is computed in fp32 for fp16/bf16 parameters (one rounding of the
    product). A step skipped by ``GradScaler`` changes no bit, without a host sync.
    ``stats()`` reports ``max_norm``.
    """

    def __init__(
        self,
        radius: float | None = None,
        dim: Dim | str = None,
        *,
        on: _select.Selector | None = None,
        mode: str | None = None,
        name: str | None = None,
    ) -> None:
        self.radius = None if radius is None else check_nonneg(radius, "radius", "FixedNorm")
        super().__init__(None, 0.0, on=on, mode=mode, name=name)
        if isinstance(dim, str):
            if dim != ALL:
                raise ValueError(
                    f"FixedNorm: dim={dim!r}; use dim='all' for the whole tensor, None for the "
                    "default groups, or an int / tuple of ints"
                )
            self.dim = ALL
        else:
            self.dim = check_dim_arg(dim, "FixedNorm")
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._norms: list[Tensor] = []
        self._by_id: dict[int, Tensor] = {}

    def _extra_repr(self):
        return f"radius={self.radius!r}, dim={self.dim!r}"

    def summary_strength(self):
        return "init" if self.radius is None else self.radius

    def _dims(self, p: Tensor) -> tuple[int, ...]:
        if self.dim == ALL:
            return tuple(range(p.dim()))
        return super()._dims(p)

    # ------------------------------------------------------------------ binding and state
    def _bind(self, names, params, modules=None):
        if self.dim != ALL:
            super()._bind(names, params, modules)
        norms: list[Tensor] = []
        if self.radius is None:
            meta = [n for n, p in zip(names, params) if p.is_meta]
            if meta:
                raise ValueError(
                    "FixedNorm: radius=None keeps each group's norm when the Regularizer is "
                    f"built, but these are on the meta device (not materialized): "
                    f"{', '.join(meta)}. Build the Regularizer after to_empty() and loading the "
                    "weights, or pass radius="
                )
            with torch.no_grad():
                norms = [group_norm(p.detach(), self._dims(p)) for p in params]
        self._names, self._params, self._norms = list(names), list(params), norms
        self._by_id = {id(p): n for p, n in zip(params, norms)}

    def _rebind(self, names, params, modules=None):
        """Replaced parameters: the norms recorded at construction are kept for every name
        whose groups still fit (same group shape and device); the others are taken now."""
        old = dict(zip(self._names, self._norms))
        self._bind(names, params, modules)
        self._norms = kept_state(old, self._names, self._norms, same_layout)
        self._by_id = {id(p): n for p, n in zip(self._params, self._norms)}

    def _unbind(self) -> None:
        super()._unbind()
        self._names, self._params, self._norms, self._by_id = [], [], [], {}

    @property
    def radii(self) -> dict[str, Tensor]:
        """``radius=None``: parameter name → the group norms recorded at construction
        (``keepdim`` shape; DTensors for DTensor parameters)."""
        return dict(zip(self._names, self._norms))

    def rule_state_dict(self) -> dict:
        if self.radius is not None:
            return {}
        return {"radius": {n: r.detach().clone() for n, r in zip(self._names, self._norms)}}

    def load_rule_state_dict(self, state: dict) -> None:
        if self.radius is not None:
            return
        saved = _check_names("FixedNorm", "radii", state.get("radius"), self._names)
        bad = [
            f"{n} (saved {tuple(saved[n].shape)}, groups {tuple(r.shape)})"
            for n, r in zip(self._names, self._norms)
            if tuple(saved[n].shape) != tuple(r.shape)
        ]
        if bad:
            raise ValueError("FixedNorm: saved radius shape differs: " + ", ".join(bad))
        neg = [n for n in self._names if bool((_dist.full(saved[n]) < 0).any())]
        if neg:
            raise ValueError(f"FixedNorm: saved radii of {', '.join(neg)} are negative")
        with torch.no_grad():
            for n, r in zip(self._names, self._norms):
                s = saved[n]
                r.copy_(_dist.like(s, r) if _dist.is_dtensor(r) or _dist.is_dtensor(s) else s)

    # ------------------------------------------------------------------ math
    def _target(self, p: Tensor) -> float | Tensor:
        if self.radius is not None:
            return self.radius
        r = _lookup(self._by_id, self._params, p)
        if r is None:
            raise ValueError(
                "FixedNorm(radius=None): this tensor is not one of the parameters bound at "
                "Regularizer construction (their norms are the radii); build a tr.Regularizer "
                "with this rule first, or pass radius="
            )
        return _dist.local(r)

    @staticmethod
    def _scale(n: Tensor, r: float | Tensor) -> Tensor:
        """r/n per group; 1 where n < tiny·max(1, r) (zero groups stay zero, never NaN)."""
        tiny = torch.finfo(n.dtype).tiny
        if isinstance(r, Tensor):
            r = r.to(n.dtype)
            floor: float | Tensor = r.clamp_min(1) * tiny
        else:
            floor = tiny * max(1.0, r)
        one = torch.ones((), dtype=n.dtype, device=n.device)
        return torch.where(n >= floor, r / torch.clamp_min(n, floor), one)

    def project(self, p: Tensor) -> Tensor:
        r = self._target(p)  # resolved on the bound parameter, before the copy
        with torch.no_grad():
            out = p.detach().clone()
            f = self._scale(_dist.local(group_norm(out, self._dims(out))), r)
            _dist.local(out).mul_(f)
            return out

    def _project_(self, p, skip):
        r = self._target(p)
        f = self._scale(_dist.local(group_norm(p, self._dims(p))), r)
        if skip is not None:
            f = torch.where(skip, torch.ones((), dtype=f.dtype, device=f.device), f)
        _dist.local(p).mul_(f)

    def _foreach_project_(self, params):
        targets = [self._target(p) for p in params]
        norms = foreach_group_map(params, self._dims, lambda n, size: n)
        factors = [self._scale(n, r) for n, r in zip(norms, targets)]
        params = _dist.locals_(params)
        if params[0].dtype in _LOW:  # fp32 factors, product rounded once to the param dtype
            for p, f in zip(params, factors):
                p.mul_(f)
        else:
            torch._foreach_mul_(params, factors)


class SpectralNorm(Constraint):
    r"""Spectral-norm cap: the largest singular value of each selected matrix is at most
    ``max_value`` = c after every step: W ← W·min(1, c/σ̂).

    The matrix is the weight viewed as (out, −1) with the output units as rows, by layer type
    as in :class:`MaxNorm` (conv weights (out, in·k…); ``ConvTranspose`` weights move their
    dim 1 first, as ``torch.nn.utils.spectral_norm`` does; an HF ``Conv1D`` weight is
    transposed, which leaves σ unchanged). Needs tensors with at least 2 dims. A matrix with
    σ̂ ≤ c is not changed (not one bit); an all-zero matrix stays zero.

    σ̂ comes from power iteration on the matrix with persistent vectors u (out), v (in) that
    are warm-started from the previous step: ``n_power_iterations`` iterations per step
    (v ← Wᵀu/‖Wᵀu‖, u ← Wv/‖Wv‖, σ̂ = ‖Wv‖), plus ``WARMUP_ITERATIONS`` (15) at a matrix's
    first projection, from random unit vectors (a fixed seed: every rank and every run starts
    alike). The vectors live with the rule on the parameter's device (fp32 for fp16/bf16
    parameters) and are saved and restored exactly by ``reg.state_dict()``, so a resumed run
    is bit-identical. A step skipped by ``GradScaler`` changes no bit of the weights (no host
    sync); the vectors still take their iterations on the unchanged weights.

    **Bias.** Power iteration *under*-estimates σ (σ̂ = ‖Wv‖ ≤ σ for any unit v), so a binding
    cap is held only as well as σ̂ tracks σ. When the top singular values are clustered and the
    optimizer rotates the top singular directions, warm-started iterations lag behind. Measured
    (3-layer tanh MLP 32→64→64→10 with weights orthogonal·2 — all σ equal — or default·4;
    c = 1; 200 steps; the true σ/c of the worst matrix after every step: the peak over the
    steps, over both inits, and in parentheses the worse median after step 20)::

                         n=1                n=2          n=5          n=10                exact
        Adam lr 1e-3     1.01–1.04 (1.006)  1.01–1.03    1.005–1.02   1.001–1.02 (1.0001)  ≤ 1+1e-6
        Adam lr 1e-2     1.09–1.14 (1.03)   1.06–1.11    1.04–1.07    1.02–1.04 (1.0001)   ≤ 1+1e-6
        Adam lr 3e-2     1.24      (1.04)   1.14–1.19    1.09–1.14    1.05–1.12 (1.0003)   ≤ 1+1e-6
        SGD(0.9) lr 0.1  1.02–1.12 (1.016)  1.01–1.10    1.01–1.06    1.01–1.04 (1.0001)   ≤ 1+1e-6
        SGD(0.9) lr 0.5  1.15–1.24 (1.024)  1.12–1.18    1.06–1.10    1.04–1.07 (1.0000)   ≤ 1+1e-6

    So with one iteration per step the weights sit up to ~4 % over the cap (median) and peak
    up to 24 % over it; more iterations shrink the lag but do not bound it
    (``tests/test_norm_constraints.py`` checks that the bias is there). **The setting that
    holds the cap is** ``exact=True``: σ is ``torch.linalg.matrix_norm(W, ord=2)`` (an SVD per
    matrix and step, O(out·in·min(out, in)): meant for small and medium matrices), and σ/c ≤
    1 + a few ulps after every step. Where an SVD per step is too slow, ``n_power_iterations=10``
    keeps the median within 0.03 % of the cap, with transient peaks of a few percent.

    Args:
        max_value: the cap c ≥ 0 on σ_max.
        n_power_iterations: power iterations per step (≥ 1); ignored with ``exact=True``.
        exact: compute σ exactly (SVD) instead of by power iteration (no vectors, no state).

    FSDP2 (DTensor weights, e.g. ``Shard(0)``): *sharded* power iteration — the matrix-vector
    products run on the local shards (DTensor ``mm``: Wv stays sharded like the rows, Wᵀu is a
    partial sum), and only the vectors are all-reduced / all-gathered (out + in values per
    iteration), never the matrix; u, v are replicated plain tensors, identical on every rank.
    ``exact=True`` gathers the matrix (``full_tensor()``) for its SVD. The factor is applied to
    the local shard. ``stats()`` reports ``max_sigma``: the largest σ over the matrices, exact
    with ``exact=True``, else the power-iteration estimate (``n_power_iterations`` more
    iterations from the current vectors, not stored: a lower bound).
    """

    def __init__(
        self,
        max_value: float,
        n_power_iterations: int = 1,
        *,
        exact: bool = False,
        on: _select.Selector | None = None,
        mode: str | None = None,
        name: str | None = None,
    ) -> None:
        self.max_value = check_nonneg(max_value, "max_value", "SpectralNorm")
        n = n_power_iterations
        if isinstance(n, float) and n.is_integer():  # configs may give 3.0
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(
                f"SpectralNorm: n_power_iterations must be an int >= 1, got {n_power_iterations!r}"
            )
        if n < 1:
            raise ValueError(f"SpectralNorm: n_power_iterations must be >= 1, got {n!r}")
        if not isinstance(exact, bool):
            raise TypeError(f"SpectralNorm: exact must be True or False, got {exact!r}")
        self.n_power_iterations = n
        self.exact = exact
        super().__init__(on=on, mode=mode, name=name)
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._vecs: list[dict] = []  # per parameter: {"u", "v", "cold"}
        self._by_id: dict[int, dict] = {}

    def _extra_repr(self):
        return f"{self.max_value!r}, n_power_iterations={self.n_power_iterations!r}" + (
            ", exact=True" if self.exact else ""
        )

    def summary_strength(self):
        return self.max_value

    # ------------------------------------------------------------------ matrix view
    def _out_dim(self, p: Tensor) -> int:
        red = rule_dims(self, None, p, "SpectralNorm")
        kept = [d for d in range(p.dim()) if d not in red]
        return kept[0] if len(kept) == 1 else 0

    def _matrix(self, p: Tensor) -> Tensor:
        od = self._out_dim(p)
        w = p if od == 0 else p.movedim(od, 0)
        return w.reshape(w.shape[0], -1)

    def _shape(self, p: Tensor) -> tuple[int, int]:
        out = p.shape[self._out_dim(p)]
        return out, (p.numel() // out if out else 0)

    @staticmethod
    def _fresh(shape: tuple[int, int], p: Tensor) -> dict:
        """Random unit vectors (fixed seed), on ``p``'s device, fp32 for fp16/bf16."""
        g = torch.Generator().manual_seed(0)
        dtype = torch.float32 if p.dtype in _LOW else p.dtype
        out = {"cold": True}
        for k, n in zip(("u", "v"), shape):
            x = torch.randn(n, generator=g, dtype=torch.float64)
            x = x / x.norm().clamp_min(1e-300)
            out[k] = x.to(device=p.device, dtype=dtype)
        return out

    # ------------------------------------------------------------------ binding and state
    def _bind(self, names, params, modules=None):
        bad = [f"{n} (shape {tuple(p.shape)})" for n, p in zip(names, params) if p.dim() < 2]
        if bad:
            raise ValueError(
                "SpectralNorm: needs parameters with at least 2 dims; selected " + ", ".join(bad)
            )
        cplx = [n for n, p in zip(names, params) if p.is_complex()]
        if cplx:
            raise ValueError(
                f"SpectralNorm: complex parameters are not supported: {', '.join(cplx)}"
            )
        _record_layouts(self, None, params, modules)
        self._names, self._params = list(names), list(params)
        self._vecs = [{} if self.exact else self._fresh(self._shape(p), p) for p in params]
        self._by_id = {id(p): e for p, e in zip(params, self._vecs)}

    def _rebind(self, names, params, modules=None):
        """Replaced parameters: the vectors are kept for every name whose matrix still has
        the same shape, device and dtype; the others start afresh."""
        old = dict(zip(self._names, self._vecs))
        self._bind(names, params, modules)
        self._vecs = kept_state(
            old, self._names, self._vecs,
            lambda e, new: bool(e and new and all(same_layout(e[k], new[k]) for k in ("u", "v"))),
        )
        self._by_id = {id(p): e for p, e in zip(self._params, self._vecs)}

    def _unbind(self) -> None:
        super()._unbind()
        self._names, self._params, self._vecs, self._by_id = [], [], [], {}

    @property
    def vectors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Parameter name → the power-iteration vectors (u, v) (empty with ``exact=True``)."""
        return {n: (e["u"], e["v"]) for n, e in zip(self._names, self._vecs) if e}

    def rule_state_dict(self) -> dict:
        if self.exact:
            return {}
        return {
            "u": {n: e["u"].clone() for n, e in zip(self._names, self._vecs)},
            "v": {n: e["v"].clone() for n, e in zip(self._names, self._vecs)},
            "cold": [n for n, e in zip(self._names, self._vecs) if e["cold"]],
        }

    def load_rule_state_dict(self, state: dict) -> None:
        if self.exact:
            return
        us = _check_names("SpectralNorm", "vectors u", state.get("u"), self._names)
        vs = _check_names("SpectralNorm", "vectors v", state.get("v"), self._names)
        cold = state.get("cold", [])
        if not isinstance(cold, (list, tuple)) or not all(isinstance(n, str) for n in cold):
            raise ValueError("SpectralNorm: saved 'cold' must be a list of parameter names")
        bad = [
            f"{n} (saved {k} {tuple(s[n].shape)}, expected {tuple(e[k].shape)})"
            for n, e in zip(self._names, self._vecs)
            for k, s in (("u", us), ("v", vs))
            if tuple(s[n].shape) != tuple(e[k].shape)
        ]
        if bad:
            raise ValueError("SpectralNorm: saved vector shape differs: " + ", ".join(bad))
        for n, e in zip(self._names, self._vecs):
            for k, s in (("u", us), ("v", vs)):
                x = _dist.full(s[n]).detach()
                e[k] = x.to(device=e[k].device, dtype=e[k].dtype, copy=True)
            e["cold"] = n in cold

    # ------------------------------------------------------------------ math
    @staticmethod
    def _mv(w: Tensor, x: Tensor) -> Tensor:
        """w @ x as a plain tensor; a DTensor ``w`` multiplies its local shard (DTensor mm)
        and the result vector is reduced / gathered (the vector only)."""
        if not _dist.is_dtensor(w):
            return w @ x
        from torch.distributed.tensor import DTensor, Replicate

        mesh = w.device_mesh
        xd = DTensor.from_local(x.unsqueeze(1), mesh, [Replicate()] * mesh.ndim, run_check=False)
        return torch.mm(w, xd).full_tensor().squeeze(1)

    def _power(self, w: Tensor, u: Tensor, v: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` power iterations from (u, v): new (u, v) and σ̂ = ‖Wv‖ (≤ σ). A zero product
        keeps the previous vector (an all-zero matrix gives σ̂ = 0, never NaN)."""
        tiny = torch.finfo(u.dtype).tiny
        wt = w.transpose(0, 1)
        sigma = torch.zeros((), dtype=u.dtype, device=u.device)
        for _ in range(n):
            t = self._mv(wt, u)
            nt = torch.linalg.vector_norm(t)
            v = torch.where(nt >= tiny, t / nt.clamp_min(tiny), v)
            s = self._mv(w, v)
            sigma = torch.linalg.vector_norm(s)
            u = torch.where(sigma >= tiny, s / sigma.clamp_min(tiny), u)
        return u, v, sigma

    def _sigma(self, p: Tensor, update: bool) -> Tensor:
        """σ̂ of ``p``'s matrix view (exact, or power iteration on its vectors, stored when
        ``update``); a plain 0-d tensor (fp32 for fp16/bf16)."""
        w = self._matrix(p)
        w = w.float() if w.dtype in _LOW else w
        if self.exact:
            return torch.linalg.matrix_norm(_dist.full(w), ord=2)
        e = _lookup(self._by_id, self._params, p)
        if e is None:  # not bound (a direct call): fresh vectors, not kept
            e = self._fresh(tuple(w.shape), p)
        n = self.n_power_iterations + (WARMUP_ITERATIONS if e["cold"] else 0)
        u, v, sigma = self._power(w, e["u"], e["v"], n)
        if update:
            e["u"], e["v"], e["cold"] = u, v, False
        return sigma

    def _factor(self, sigma: Tensor) -> Tensor:
        c = self.max_value
        one = torch.ones((), dtype=sigma.dtype, device=sigma.device)
        return torch.where(sigma > c, c / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), one)

    def project(self, p: Tensor) -> Tensor:
        """The projection of ``p``, a new tensor (the rule's vectors are read, not updated)."""
        with torch.no_grad():
            f = self._factor(self._sigma(p, update=False))
            out = p.detach().clone()
            _dist.local(out).mul_(f)
            return out

    def _project_(self, p, skip):
        if p.numel() == 0:
            return
        f = self._factor(self._sigma(p, update=True))
        if skip is not None:
            f = torch.where(skip, torch.ones((), dtype=f.dtype, device=f.device), f)
        _dist.local(p).mul_(f)

    def stats_tensors(self, params, strength):
        ps = [p for p in params if p.numel()]
        if not ps:
            return {}
        dev = ps[0].device
        sig = [self._sigma(p, update=False).to(dev, torch.float64) for p in ps]
        return {"max_sigma": torch.stack(sig).max()}
