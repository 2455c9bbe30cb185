"""Constraints: projections applied after each optimizer step (after any prox rule).

Keras 3 formulas, ``ε = 1e-7`` (Keras' ``backend.epsilon()``):

* ``MaxNorm(m, dim)``: groups whose norm n exceeds m are scaled to w·m/(ε + n); groups
  with n ≤ m are left untouched (Keras computes w·clip(n, 0, m)/(ε + n) for every group,
  which also shrinks groups under the cap by a factor n/(ε + n); we do not).
* ``UnitNorm(dim)``: w/(ε + ‖w‖) per group.
* ``NonNeg()``: w·(w ≥ 0), computed as ``clamp_min(w, 0)`` (negative entries become +0.0).

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
from . import select as _select
from ._precision import LOW_PRECISION as _LOW
from ._rule import Rule, check_nonneg
from .structured import (
    Dim,
    _bind_dims,
    _record_layouts,
    check_dim_arg,
    foreach_group_map,
    group_norm,
    rule_dims,
)

__all__ = ["Constraint", "MaxNorm", "NonNeg", "UnitNorm"]

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
        mx = [group_norm(p.detach(), self._dims(p)).max() for p in params if p.numel()]
        mx = [m.to(dev) for m in _dist.full_values(mx)]  # DTensor: max over shards
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
        mins = _dist.full_values([p.detach().min() for p in ps])  # DTensor: min over shards
        return {"min": torch.stack([m.to(dev, torch.float64) for m in mins]).min()}
