"""The optimizer's diagonal metric, for ``metric="adaptive"`` prox rules (ProxGen, Yun et al. 2021).

An adaptive optimizer takes the step θ ← θ − lr·D⁻¹m with a diagonal D. The proximal
step that matches it solves argmin_x ½‖x − θ‖²_D + lr·R(x); for a separable R this is the
ordinary prox with a per-coordinate step t_i = lr/D_i. D is read from the optimizer's own
state after its update (``step`` already counts the step just taken):

* Adam, AdamW: D = √v̂ + ε, v̂ = ``exp_avg_sq`` / (1 − β₂^step) (``max_exp_avg_sq`` with
  amsgrad), ε = the group's ``eps``;
* NAdam: the same D as Adam. Its update (torch/optim/nadam.py) is
  θ ← θ − lr·[(1−μ_t)/(1−Πμ)·g + μ_{t+1}/(1−Πμ·μ_{t+1})·m] / (√v̂ + ε): the momentum schedule
  (``mu_product``, ``momentum_decay``) only sets the coefficients of g and m — the step's
  *direction*, as 1/(1−β₁^t) is Adam's — while every coordinate is divided by the same
  √v̂ + ε. So the metric is Adam's; ``decoupled_weight_decay`` (a separate multiplicative
  decay) does not change it either;
* RAdam (torch/optim/radam.py): with ρ_∞ = 2/(1−β₂) − 1 and
  ρ_t = ρ_∞ − 2·t·β₂^t/(1 − β₂^t), t = ``step``:

  - while ρ_t ≤ 5 the step is un-preconditioned, θ ← θ − lr·m̂ (SGD with momentum): D = 1,
    t_i = lr, the Euclidean prox;
  - afterwards θ ← θ − lr·r_t·√(1 − β₂^t)/(√v + ε)·m̂ with the rectification
    r_t = √((ρ_t − 4)(ρ_t − 2)ρ_∞ / ((ρ_∞ − 4)(ρ_∞ − 2)ρ_t)), v = ``exp_avg_sq``:
    t_i = lr·r_t·√(1 − β₂^t)/(√v_i + ε). Note ε is added to √v, not to √v̂ as in Adam.

  ``decoupled_weight_decay`` and ``weight_decay`` change the gradient or θ, not D;
* RMSprop: D = √v̂ + ε, v̂ = ``square_avg`` (minus ``grad_avg``² when centered);
* Adagrad: D = √``sum`` + ε and lr = its decayed lr, lr / (1 + (step − 1)·lr_decay).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["PRECONDITIONED", "SUPPORTED", "adaptive_step", "check_supported"]

SUPPORTED = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)

#: optimizers that scale each coordinate by its own statistics: a Euclidean prox disagrees
#: with their metric (the supported ones, plus Adamax and SparseAdam whose metric we do not read)
PRECONDITIONED = (*SUPPORTED, torch.optim.Adamax, torch.optim.SparseAdam)


def check_supported(opt: torch.optim.Optimizer, rules: list[str]) -> None:
    """Raise ``ValueError`` if ``opt`` has no diagonal metric we know how to read."""
    if not isinstance(opt, SUPPORTED):
        raise ValueError(
            f"rules {rules} use metric='adaptive', which needs one of "
            f"{', '.join(c.__name__ for c in SUPPORTED)}; got {type(opt).__name__}. "
            "Use metric='euclidean' (the default) with this optimizer"
        )


def _num(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def adaptive_step(
    opt: torch.optim.Optimizer, group: dict, p: Tensor, eta: Any, decay_lr: bool = True
) -> Tensor | None:
    """Per-coordinate step η·D⁻¹ for ``p`` (``eta`` = the lr-coupled step), or None before the
    optimizer has state for ``p``. With ``decay_lr``, Adagrad's lr decay scales η too."""
    state = opt.state.get(p)
    if not state:
        return None
    eps = group["eps"]
    if isinstance(opt, torch.optim.Adagrad):
        if decay_lr:
            eta = eta / (1 + (_num(state["step"]) - 1) * group["lr_decay"])
        denom = state["sum"].sqrt().add_(eps)
    elif isinstance(opt, torch.optim.RMSprop):
        v = state["square_avg"]
        if group.get("centered", False):
            v = v.addcmul(state["grad_avg"], state["grad_avg"], value=-1)
        denom = v.sqrt().add_(eps)
    elif isinstance(opt, torch.optim.RAdam):
        step = _num(state["step"])
        beta2 = _num(group["betas"][1])
        v = state["exp_avg_sq"]
        rho_inf = 2 / (1 - beta2) - 1
        bias2 = 1 - beta2**step
        rho_t = rho_inf - 2 * step * beta2**step / bias2
        if rho_t <= 5.0:  # un-rectified: RAdam steps by lr·m̂, no preconditioner
            return torch.ones_like(v).mul_(eta)
        rect = math.sqrt(
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        )
        return torch.reciprocal(v.sqrt().add_(eps)).mul_(eta).mul_(rect * math.sqrt(bias2))
    else:  # Adam, AdamW, NAdam: √v̂ + ε
        step = _num(state["step"])
        beta2 = _num(group["betas"][1])
        v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    return torch.reciprocal(denom).mul_(eta)
