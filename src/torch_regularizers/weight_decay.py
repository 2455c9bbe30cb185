"""The zero-overhead path: native param groups for an optimizer's own ``weight_decay=``.

When plain L2 (coupled for SGD/Adam, decoupled for AdamW) on a set of parameters is
all you need, the optimizer's own ``weight_decay`` costs nothing extra. What it lacks
is the selection: :func:`param_groups` splits a model's parameters with the same
selectors as the rules::

    opt = torch.optim.AdamW(tr.param_groups(model, weight_decay=0.05, lr=3e-4), betas=(0.9, 0.95))

decays exactly the parameters ``tr.Regularizer(model, [tr.L2(0.05, mode="decoupled")])``
would (``tr.select.weights``), and equals it bit for bit.

This module also holds the double-decay guard that ``Regularizer.attach`` runs.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from . import select as _select

__all__ = ["DoubleDecayWarning", "param_groups"]


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay: _select.Selector | None = None,
    *,
    lr: float | None = None,
    include_frozen: bool = False,
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    """Param groups ``[decay, no_decay]`` for any ``torch.optim`` optimizer.

    Args:
        model: the model (wrappers such as DDP or ``torch.compile`` are looked through).
        weight_decay: the decay group's ``weight_decay``; the other group gets 0.
        no_decay: parameters that must not be decayed. Default: everything
            ``tr.select.weights`` leaves out (biases, normalization layers, embeddings,
            tokens / ``no_weight_decay()``, and other tensors with fewer than 2 dims), so the
            decay set is ``tr.select.weights``, the default of every rule. Pass e.g.
            ``tr.select.biases | tr.select.norms`` to decay embeddings too.
        lr: put into both groups when given.
        include_frozen: also list parameters with ``requires_grad=False`` (default: left out,
            as the Hugging Face Trainer does).
        group_kwargs: more options for both groups (``betas=``, ``momentum=``, ...).

    Returns:
        ``[{"params": decay, "weight_decay": weight_decay, ...}, {"params": rest,
        "weight_decay": 0.0, ...}]`` in ``named_parameters()`` order, each tied parameter once;
        an empty group is left out. The decay set equals the parameters that
        ``tr.Regularizer(model, [tr.L2(weight_decay, on=tr.select.all - no_decay)])`` selects.
    """
    if no_decay is not None and not isinstance(no_decay, _select.Selector):
        raise TypeError(
            f"param_groups(): no_decay must be a tr.select selector, got {type(no_decay).__name__}"
        )
    if "params" in group_kwargs or "weight_decay" in group_kwargs:
        raise TypeError("param_groups(): 'params' and 'weight_decay' are set by param_groups itself")
    decay_sel = _select.weights if no_decay is None else _select.all - no_decay
    idx = _select.index(model)
    hit = decay_sel.match(idx)
    decay, rest = [], []
    for i, info in enumerate(idx.params):
        if not (include_frozen or info.param.requires_grad):
            continue
        (decay if i in hit else rest).append(info.param)
    extra = dict(group_kwargs)
    if lr is not None:
        extra["lr"] = lr
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), **extra},
        {"params": rest, "weight_decay": 0.0, **extra},
    ]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------- double-decay guard


class DoubleDecayWarning(UserWarning):
    """A rule with an L2 term is attached to an optimizer that already applies its own
    ``weight_decay`` to the same parameters: they would be decayed twice."""


def _has_l2_term(rule: Any) -> bool:
    from .penalties import L2, ElasticNet

    if isinstance(rule, L2):
        return True
    if isinstance(rule, ElasticNet):
        return rule.l1_ratio < 1
    return type(rule).__name__ == "L2SP" or bool(getattr(rule, "is_weight_decay", False))


def _decays(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


def check_double_decay(reg: Any, opt: Any, max_names: int = 8) -> None:
    """Warn once (per attach) if ``opt``'s own ``weight_decay > 0`` covers parameters that an
    L2-type rule of ``reg`` (L2, ElasticNet with l1_ratio < 1, L2SP) also decays."""
    wd_of: dict[int, float] = {}
    for g in opt.param_groups:
        if _decays(g.get("weight_decay", 0)):
            for p in g["params"]:
                wd_of.setdefault(id(p), float(g["weight_decay"]))
    if not wd_of:
        return
    hits: list[str] = []
    rules: list[str] = []
    wds: set[float] = set()
    for b in reg._bindings:
        if not _has_l2_term(b.rule):
            continue
        names = [i.name for i in b.infos if id(i.param) in wd_of]
        if names:
            rules.append(f"{b.name!r} ({type(b.rule).__name__}, mode={b.rule.mode!r})")
            wds.update(wd_of[id(i.param)] for i in b.infos if id(i.param) in wd_of)
            hits += [n for n in names if n not in hits]
    if not hits:
        return
    shown = ", ".join(hits[:max_names]) + (f" and {len(hits) - max_names} more" if len(hits) > max_names else "")
    wd_txt = ", ".join(f"{w:g}" for w in sorted(wds))
    warnings.warn(
        f"double weight decay: {type(opt).__name__} already applies its own weight_decay={wd_txt} "
        f"to parameters that rule {', '.join(rules)} also decays: {shown}. They are decayed twice. "
        f"Fix: build the optimizer with weight_decay=0 for them (e.g. "
        f"{type(opt).__name__}(model.parameters(), weight_decay=0.0, ...); note AdamW's default is "
        f"0.01), or drop the rule and use the optimizer's decay alone with "
        f"tr.param_groups(model, weight_decay=...).",
        DoubleDecayWarning,
        stacklevel=3,
    )
