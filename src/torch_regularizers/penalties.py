"""Penalties: the math of each regularizer, nothing else.

Every penalty R has three single-tensor *reference* functions, written as plainly
as possible and used by the tests as the ground truth for the fast paths:

* ``value(p)``  – R(θ), a 0-d tensor (differentiable when ``p`` requires grad);
* ``grad(p)``   – ∇R(θ) (a subgradient; 0 at 0 for L1);
* ``prox(p, t)`` – prox_{t·R}(θ) = argmin_x ½‖x − θ‖² + t·R(x).

and three in-place *multi-tensor* operations used by the
:class:`~torch_regularizers.Regularizer` on the hot path, each with a reference
per-tensor loop and a ``torch._foreach_*`` implementation, picked by ``impl``:

* ``grad_(params, grads, strength, scale)``  – g ← g + scale·∇R(θ)     (mode ``"grad"``)
* ``decay_(params, strength, eta)``          – θ ← θ − η·∇R(θ)         (mode ``"decoupled"``)
* ``prox_(params, strength, eta)``           – θ ← prox_{η·R}(θ)       (mode ``"prox"``)

``scale`` and ``eta`` may be Python floats or 0-d tensors (a tensor learning rate,
or a ``GradScaler`` scale / ``found_inf`` mask): tensors never cause a host sync.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Callable, Union

import torch
from torch import Tensor

from . import kernels as _kernels
from . import select as _select
from ._precision import LOW_PRECISION as _LOW
from ._precision import acc as _acc
from ._rule import Rule, Strength, check_nonneg, check_ratio

__all__ = ["L1", "L2", "ElasticNet", "Penalty"]

Scalar = Union[float, Tensor]
IMPLS = ("reference", "foreach")
#: ``"euclidean"``: prox_{η·R}; ``"adaptive"``: the prox in the optimizer's diagonal metric
#: (ProxGen): per-coordinate step η_i = lr/(√v̂_i + ε), see ``Regularizer``.
METRICS = ("euclidean", "adaptive")


def _soft_threshold_(p: Tensor, t: Scalar) -> Tensor:
    """In place: θ ← sign(θ)·max(|θ| − t, 0), computed as θ − clamp(θ, −t, t).

    The clamp form is exact: coordinates with |θ| ≤ t become exactly +0.
    """
    if p.dtype in _LOW:  # fp32 math (a bf16 clamp bound would round t), rounded once
        w = p.float()
        return p.copy_(w.sub_(torch.clamp(w, min=-t, max=t)))
    return p.sub_(torch.clamp(p, min=-t, max=t))


#: the header of the arguments block of ``Penalty``'s docstring (``__init_subclass__``)
_COMMON_ARGS = "Args (common to every penalty):"


def _foreach_soft_threshold_(params: list[Tensor], t: float) -> None:
    clipped = torch._foreach_clamp_max(params, t)
    torch._foreach_clamp_min_(clipped, -t)
    torch._foreach_sub_(params, clipped)


class Penalty(Rule):
    """Base class of penalties. Subclasses implement the reference math.

    Args (common to every penalty):
        strength: λ ≥ 0: a float, or a schedule ``f(step) -> float`` of the applied optimizer
            steps (:mod:`~torch_regularizers.schedules`); ``alpha`` for ElasticNet. Change it
            later with ``reg.set_strength(name, value)``.
        on: selector of the parameters it applies to (default ``tr.select.weights``).
        mode: ``"grad"`` (default), ``"decoupled"``, ``"prox"`` or ``"loss"`` (docs/design.md §3).
        name: name in ``summary()``/``stats()``; default lower-case class name.
        lr_coupling: for decoupled/prox, the step c = η·λ with η = the group's ``"lr"``
            (default), ``"lr_ratio"`` (lr / lr₀, lr₀ = the scheduler's ``initial_lr``, else
            the first nonzero lr seen), ``"corrected"`` (lr² / lr_max, AdamC: Defazio 2025,
            lr_max = ``initial_lr``, else the first nonzero lr; the paper applies it to
            layers followed by a normalization) or ``"none"`` (η = 1).
        metric: ``"euclidean"`` (default) or ``"adaptive"`` for elementwise prox rules (L1, L2,
            ElasticNet, L2SP): the prox in the optimizer's diagonal metric (ProxGen), see
            ``_metric.py``.
        stochastic_rounding: decoupled/prox rules on bf16/fp16 parameters round the result
            stochastically, so the expected decay is kept.
        cautious: decoupled rules (L1, L2, ElasticNet, L2SP) decay only the coordinates where
            the optimizer's own update agrees in sign with the decay direction (Cautious
            Weight Decay, Chen et al. 2025): θ ← θ − η·u − c·𝟙[u ⊙ ∇R(θ) ≥ 0] ⊙ ∇R(θ)/λ·λ,
            with −η·u this step's update by the optimizer and ∇R at the weights before it.
            With the mask all ones this is the plain decoupled step. Memory: one persistent
            copy of the selected parameters (θ before the update is kept to find u). Needs
            an optimizer step (not available to manual ``apply_decoupled``).
        timescale: decoupled L2 and L2SP only, instead of ``strength``: the decay's timescale
            τ = 1/(η·λ) in optimizer steps (see :class:`L2`).
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # help() of every penalty shows the arguments they all take, documented once: the
        # "Args (common to every penalty)" block, the last part of Penalty's docstring
        doc, base = cls.__dict__.get("__doc__"), Penalty.__doc__
        if doc and base and _COMMON_ARGS not in doc and _COMMON_ARGS in base:
            base = inspect.cleandoc(base)
            cls.__doc__ = f"{inspect.cleandoc(doc)}\n\n{base[base.index(_COMMON_ARGS):]}\n"

    #: whether ``cautious=True`` is available (an elementwise decay direction)
    supports_cautious: bool = False
    #: whether ``timescale=`` may replace ``strength`` (L2-type decay)
    supports_timescale: bool = False

    #: whether ``prox`` is implemented (modes ``"prox"`` needs it)
    has_prox: bool = True
    #: whether ``stats()`` reports the fraction of exact zeros
    reports_sparsity: bool = False
    #: whether prox acts coordinate-wise with a per-coordinate step (``metric="adaptive"``)
    elementwise_prox: bool = False

    def __init__(
        self,
        strength: Strength | None = None,
        *,
        on: _select.Selector | None = None,
        mode: str = "grad",
        name: str | None = None,
        lr_coupling: str = "lr",
        metric: str = "euclidean",
        stochastic_rounding: bool = False,
        cautious: bool = False,
        timescale: float | None = None,
    ) -> None:
        super().__init__(on=on, mode=mode, name=name, lr_coupling=lr_coupling)
        cls = type(self).__name__
        if not isinstance(cautious, bool):
            raise TypeError(f"{cls}: cautious must be a bool, got {cautious!r}")
        if cautious and (self.mode != "decoupled" or not self.supports_cautious):
            raise ValueError(
                f"{cls}: cautious=True needs mode='decoupled' and an elementwise decay "
                "(L1, L2, ElasticNet, L2SP)"
            )
        self.cautious = cautious
        self.timescale: float | None = None
        if timescale is not None:
            if not self.supports_timescale:
                raise ValueError(f"{cls}: timescale= is only for L2 and L2SP")
            if strength is not None:
                raise ValueError(f"{cls}: give strength or timescale=, not both")
            if self.mode != "decoupled":
                raise ValueError(f"{cls}: timescale= needs mode='decoupled' (τ is a decay timescale)")
            t = check_nonneg(timescale, "timescale", cls)
            if t == 0:
                raise ValueError(f"{cls}: timescale must be > 0 steps, got {timescale!r}")
            self.timescale = t
            strength = 1.0 / t
        elif strength is None:
            hint = " (or timescale= for a decoupled L2/L2SP)" if self.supports_timescale else ""
            raise TypeError(f"{cls}.__init__() missing 1 required positional argument: 'strength'{hint}")
        #: lr_peak of the first param group, for reporting λ of a timescale rule
        self._lr_peak: float | None = None
        if self.mode == "prox" and not self.has_prox:
            raise ValueError(f"{cls}: mode='prox' is not available (no prox)")
        if metric not in METRICS:
            raise ValueError(f"{cls}: metric={metric!r} is not one of {METRICS}")
        if metric == "adaptive" and (self.mode != "prox" or not self.elementwise_prox):
            raise ValueError(
                f"{cls}: metric='adaptive' needs mode='prox' and an elementwise prox "
                "(L1, L2, ElasticNet)"
            )
        if not isinstance(stochastic_rounding, bool):
            raise TypeError(f"{cls}: stochastic_rounding must be a bool")
        if stochastic_rounding and self.mode not in ("decoupled", "prox"):
            raise ValueError(f"{cls}: stochastic_rounding=True needs mode='decoupled' or 'prox'")
        self.metric = metric
        self.stochastic_rounding = stochastic_rounding
        self._set_strength(strength)

    # ------------------------------------------------------------ reference math
    def _value(self, p: Tensor, lam: float) -> Tensor:
        raise NotImplementedError

    def _grad(self, p: Tensor, lam: float) -> Tensor:
        raise NotImplementedError

    def _prox(self, p: Tensor, lam: float, t: Scalar) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no prox")

    def _decay_dir(self, p: Tensor, before: Tensor) -> Tensor:
        """∇R/λ at ``before`` (the weights of ``p`` before the update), for ``cautious``."""
        return self._grad(before, 1.0)

    # ------------------------------------------------------------ timescale
    def strength_at(self, step: int, rule: str | None = None) -> float:
        """λ at the ``step``-th applied step. A ``timescale=T`` rule has λ = 1/(T·lr_peak)
        under ``lr_coupling="lr"``/``"corrected"`` (lr_peak of its first param group, once
        an optimizer step has seen it; 1/T before) and λ = 1/T otherwise."""
        if self.timescale is None:
            return super().strength_at(step, rule)
        if self.lr_coupling in ("lr", "corrected") and self._lr_peak:
            return 1.0 / (self.timescale * self._lr_peak)
        return 1.0 / self.timescale

    def step_strength(self, step: int, rule: str | None = None) -> float:
        """The λ the step path multiplies with its step size η: for a timescale rule 1/T,
        with η = lr/lr_peak (or (lr/lr_peak)² for ``"corrected"``, 1 for ``"none"``)."""
        if self.timescale is not None:
            return 1.0 / self.timescale
        return self.strength_at(step, rule)

    def timescale_at(self, step: int, lr_peak: float | None) -> float | None:
        """τ in optimizer steps of a decoupled L2-type rule: 1/(η_peak·λ) (Wang & Aitchison
        2025); None for other rules or while lr_peak is unknown under an lr coupling."""
        if not self.supports_timescale or self.mode != "decoupled":
            return None
        if self.timescale is not None:
            return self.timescale
        lam = self.strength_at(step)
        if self.lr_coupling in ("lr", "corrected"):
            if not lr_peak:
                return None
            c = lam * lr_peak
        else:
            c = lam
        return math.inf if c == 0 else 1.0 / c

    # ------------------------------------------------------------ public single-tensor API
    def value(self, p: Tensor, strength: float | None = None) -> Tensor:
        """R(θ) as a 0-d tensor (fp32 for fp16/bf16 parameters); differentiable."""
        return self._value(p, self._resolve_strength(strength))

    def grad(self, p: Tensor, strength: float | None = None) -> Tensor:
        """∇R(θ) (subgradient 0 at non-differentiable points), a new tensor."""
        with torch.no_grad():
            return self._grad(p.detach(), self._resolve_strength(strength))

    def prox(self, p: Tensor, step: Scalar, strength: float | None = None) -> Tensor:
        """prox_{step·R}(θ) = argmin_x ½‖x − θ‖² + step·R(x), a new tensor."""
        with torch.no_grad():
            return self._prox(p.detach().clone(), self._resolve_strength(strength), step)

    def stats_tensors(self, params, strength):
        out = {}
        if params:
            with torch.no_grad():
                vals = [self._value(p, strength) for p in params]
                out["value"] = torch.stack([v.to(vals[0].device, torch.float64) for v in vals]).sum()
                if self.reports_sparsity:
                    zeros = torch.stack([(p == 0).sum().to(vals[0].device) for p in params]).sum()
                    out["sparsity"] = zeros.to(torch.float64) / sum(p.numel() for p in params)
        return out

    # ------------------------------------------------------------ in-place, reference loop
    def _ref_grad_(self, p: Tensor, g: Tensor, lam: float, scale: Scalar) -> None:
        d = self._grad(p, lam)
        if isinstance(scale, Tensor):
            g.add_(d.mul_(scale))
        else:
            g.add_(d, alpha=scale)

    def _ref_decay_(self, p: Tensor, lam: float, eta: Scalar) -> None:
        d = self._grad(p, lam)
        if isinstance(eta, Tensor):
            p.sub_(d.mul_(eta))
        else:
            p.add_(d, alpha=-eta)

    def _ref_prox_(self, p: Tensor, lam: float, eta: Scalar) -> None:
        p.copy_(self._prox(p, lam, eta))

    # ------------------------------------------------------------ in-place, multi-tensor
    # Subclasses override these with torch._foreach_* sequences; they are only
    # called with Python-float ``scale``/``eta`` (tensors go to the reference loop).
    def _foreach_grad_(self, params: list[Tensor], grads: list[Tensor], lam: float, scale: float) -> None:
        for p, g in zip(params, grads):
            self._ref_grad_(p, g, lam, scale)

    def _foreach_decay_(self, params: list[Tensor], lam: float, eta: float) -> None:
        for p in params:
            self._ref_decay_(p, lam, eta)

    def _foreach_prox_(self, params: list[Tensor], lam: float, eta: float) -> None:
        for p in params:
            self._ref_prox_(p, lam, eta)

    # ------------------------------------------------------------ public hot path
    def _run(self, ref, fast, tensors: tuple, strength: float | None, coef: Scalar, impl: str) -> None:
        """Dispatch an in-place op: the per-tensor reference loop for ``impl="reference"`` or a
        tensor ``coef`` (tensor lr, GradScaler scale or found_inf mask), else the fast path."""
        if impl not in IMPLS:
            raise ValueError(f"{type(self).__name__}: impl={impl!r} is not one of {IMPLS}")
        lam = self._resolve_strength(strength)
        if lam == 0 or not tensors[0]:
            return
        with torch.no_grad():
            if impl == "reference" or isinstance(coef, Tensor):
                for ts in zip(*tensors):
                    ref(*ts, lam, coef)
            else:
                fast(*(list(t) for t in tensors), lam, float(coef))

    def grad_(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        strength: float | None = None,
        scale: Scalar = 1.0,
        *,
        impl: str = "foreach",
    ) -> None:
        """In place over tensors of one device/dtype: g ← g + scale·∇R(θ)."""
        self._run(self._ref_grad_, self._foreach_grad_, (params, grads), strength, scale, impl)

    def decay_(
        self,
        params: Sequence[Tensor],
        strength: float | None = None,
        eta: Scalar = 1.0,
        *,
        impl: str = "foreach",
    ) -> None:
        """In place: θ ← θ − η·∇R(θ) (decoupled / AdamW-style step)."""
        self._run(self._ref_decay_, self._foreach_decay_, (params,), strength, eta, impl)

    def prox_(
        self,
        params: Sequence[Tensor],
        strength: float | None = None,
        eta: Scalar = 1.0,
        *,
        impl: str = "foreach",
    ) -> None:
        """In place: θ ← prox_{η·R}(θ)."""
        self._run(self._ref_prox_, self._foreach_prox_, (params,), strength, eta, impl)

    # ------------------------------------------------------------ custom penalties
    @staticmethod
    def from_fn(
        fn: Callable[[Tensor], Tensor],
        strength: Strength = 1.0,
        *,
        name: str | None = None,
        on: _select.Selector | None = None,
        mode: str = "grad",
        lr_coupling: str = "lr",
    ) -> Penalty:
        """A penalty R(θ) = strength·fn(θ) from any differentiable ``fn(p) -> scalar``.

        The gradient is autograd of ``fn`` on a detached copy of the parameter, so the
        model's graph is never touched. Modes: grad, decoupled, loss (no prox).
        """
        from .structured import FnPenalty

        return FnPenalty(fn, strength, name=name, on=on, mode=mode, lr_coupling=lr_coupling)


class L2(Penalty):
    r"""L2 penalty R(θ) = ½·λ·‖θ‖².

    torch's ``weight_decay=λ`` convention: ∇R = λθ, so ``mode="grad"`` equals
    ``SGD/Adam/RMSprop(weight_decay=λ)`` bit for bit and ``mode="decoupled"`` (θ ← θ·(1 − lr·λ))
    equals ``AdamW(weight_decay=λ)`` bit for bit. Keras' ``l2(k)`` penalizes k·‖θ‖²: λ = 2k.
    prox_{tR}(θ) = θ / (1 + tλ).

    ``timescale=T`` (decoupled only) instead of λ: the decay's EMA timescale in optimizer
    steps (Wang & Aitchison, ICML 2025: τ = 1/(η·λ)), so the per-step decay at the peak lr is
    1/T: λ = 1/(T·lr_peak) under ``lr_coupling="lr"`` (lr_peak = the group's ``initial_lr``,
    else the first nonzero lr), λ = 1/T under ``"lr_ratio"``/``"none"``. Given as a fraction
    of the run, τ transfers across model and data size better than λ does.
    """

    elementwise_prox = True
    supports_cautious = True
    supports_timescale = True

    def _value(self, p: Tensor, lam: float) -> Tensor:
        a = _acc(p)
        return 0.5 * lam * (a * a).sum()

    def _grad(self, p: Tensor, lam: float) -> Tensor:
        return p * lam

    def _prox(self, p: Tensor, lam: float, t: Scalar) -> Tensor:
        return p.div_(1 + t * lam)

    def _ref_grad_(self, p: Tensor, g: Tensor, lam: float, scale: Scalar) -> None:
        if isinstance(scale, Tensor):
            g.add_(p * (scale * lam))
        else:
            g.add_(p, alpha=lam * scale)  # exactly torch's `grad.add(param, alpha=wd)`

    def _ref_decay_(self, p: Tensor, lam: float, eta: Scalar) -> None:
        p.mul_(1 - eta * lam)  # exactly AdamW's `param.mul_(1 - lr * wd)`

    def _foreach_grad_(self, params, grads, lam, scale):
        _kernels.l2_grad_(params, grads, lam * scale)

    def _foreach_decay_(self, params, lam, eta):
        _kernels.l2_decay_(params, 1 - eta * lam)

    def _foreach_prox_(self, params, lam, eta):
        _kernels.l2_prox_(params, 1 + eta * lam)


class L1(Penalty):
    r"""L1 penalty R(θ) = λ·‖θ‖₁ (lasso).

    ∇R = λ·sign(θ) (0 at 0). prox_{tR}(θ) = sign(θ)·max(|θ| − tλ, 0) (soft-threshold),
    which sets small coordinates to exactly 0: use ``mode="prox"`` for sparsity.
    ``mode="decoupled"`` is a plain subgradient step and never gives exact zeros.
    """

    elementwise_prox = True

    reports_sparsity = True
    supports_cautious = True

    def _value(self, p: Tensor, lam: float) -> Tensor:
        return lam * _acc(p).abs().sum()

    def _grad(self, p: Tensor, lam: float) -> Tensor:
        return torch.sign(p).mul_(lam)

    def _prox(self, p: Tensor, lam: float, t: Scalar) -> Tensor:
        return _soft_threshold_(p, t * lam)

    def _ref_grad_(self, p, g, lam, scale):
        if isinstance(scale, Tensor):
            g.add_(torch.sign(p).mul_(scale * lam))
        else:
            g.add_(torch.sign(p), alpha=lam * scale)

    def _ref_decay_(self, p, lam, eta):
        if isinstance(eta, Tensor):
            p.sub_(torch.sign(p).mul_(eta * lam))
        else:
            p.add_(torch.sign(p), alpha=-eta * lam)

    def _foreach_grad_(self, params, grads, lam, scale):
        _kernels.l1_grad_(params, grads, lam * scale)

    def _foreach_decay_(self, params, lam, eta):
        _kernels.l1_decay_(params, -eta * lam)

    def _foreach_prox_(self, params, lam, eta):
        _kernels.soft_threshold_(params, eta * lam)


class ElasticNet(Penalty):
    r"""Elastic net in scikit-learn's convention:
    R(θ) = α·ρ·‖θ‖₁ + ½·α·(1 − ρ)·‖θ‖²  (α = ``alpha`` = strength, ρ = ``l1_ratio``).

    ∇R = αρ·sign(θ) + α(1−ρ)·θ. prox_{tR}(θ) = soft-threshold(θ, tαρ) / (1 + tα(1−ρ)).
    ``l1_ratio=1`` is :class:`L1`, ``l1_ratio=0`` is :class:`L2`, both with strength α.
    """

    elementwise_prox = True

    reports_sparsity = True
    supports_cautious = True

    def __init__(
        self,
        alpha: Strength,
        l1_ratio: float = 0.5,
        *,
        on: _select.Selector | None = None,
        mode: str = "grad",
        name: str | None = None,
        lr_coupling: str = "lr",
        metric: str = "euclidean",
        stochastic_rounding: bool = False,
        cautious: bool = False,
    ) -> None:
        self.l1_ratio = check_ratio(l1_ratio, "l1_ratio", "ElasticNet")
        super().__init__(
            alpha,
            on=on,
            mode=mode,
            name=name,
            lr_coupling=lr_coupling,
            metric=metric,
            stochastic_rounding=stochastic_rounding,
            cautious=cautious,
        )

    def _set_strength(self, strength, arg="alpha"):
        super()._set_strength(strength, arg)

    def _extra_repr(self) -> str:
        return f"l1_ratio={self.l1_ratio}"

    def _value(self, p, lam):
        a = _acc(p)
        rho = self.l1_ratio
        return lam * rho * a.abs().sum() + 0.5 * lam * (1 - rho) * (a * a).sum()

    def _grad(self, p, lam):
        rho = self.l1_ratio
        return torch.sign(p).mul_(lam * rho).add_(p, alpha=lam * (1 - rho))

    def _prox(self, p, lam, t):
        rho = self.l1_ratio
        _soft_threshold_(p, t * (lam * rho))
        return p.div_(1 + t * (lam * (1 - rho)))

    def _ref_grad_(self, p, g, lam, scale):
        if isinstance(scale, Tensor):
            g.add_(self._grad(p, lam).mul_(scale))
            return
        rho = self.l1_ratio
        g.add_(torch.sign(p), alpha=lam * rho * scale)
        g.add_(p, alpha=lam * (1 - rho) * scale)

    def _foreach_grad_(self, params, grads, lam, scale):
        rho = self.l1_ratio
        _kernels.elastic_grad_(params, grads, lam * rho * scale, lam * (1 - rho) * scale)

    def _foreach_decay_(self, params, lam, eta):
        rho = self.l1_ratio
        _kernels.elastic_decay_(params, 1 - eta * (lam * (1 - rho)), -eta * (lam * rho))

    def _ref_decay_(self, p, lam, eta):
        rho = self.l1_ratio
        s = torch.sign(p)
        p.mul_(1 - eta * (lam * (1 - rho)))
        if isinstance(eta, Tensor):
            p.sub_(s.mul_(eta * (lam * rho)))
        else:
            p.add_(s, alpha=-eta * (lam * rho))

    def _foreach_prox_(self, params, lam, eta):
        rho = self.l1_ratio
        _kernels.soft_threshold_(params, eta * (lam * rho), 1 + eta * (lam * (1 - rho)))
