"""The optimizer's diagonal metric, for ``metric="adaptive"`` prox rules (ProxGen, Yun et al. 2021).

An adaptive optimizer takes the step θ ← θ − lr·D⁻¹m with D = diag(√v̂ + ε). The proximal
step that matches it solves argmin_x ½‖x − θ‖²_D + lr·R(x); for a separable R this is the
ordinary prox with a per-coordinate step t_i = lr/(√v̂_i + ε):

* Adam, AdamW, NAdam, RAdam: v̂ = ``exp_avg_sq`` / (1 − β₂^step) (``max_exp_avg_sq`` with amsgrad),
  ε = the group's ``eps``;
* RMSprop: v̂ = ``square_avg`` (minus ``grad_avg``² when centered);
* Adagrad: v̂ = ``sum`` and lr = its decayed lr, lr / (1 + (step − 1)·lr_decay).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["SUPPORTED", "adaptive_step", "check_supported"]

SUPPORTED = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


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
    else:
        step = _num(state["step"])
        beta2 = _num(group["betas"][1])
        v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    return torch.reciprocal(denom).mul_(eta)
