"""A Regularizer's resumable state: step counts, lr references, strengths, rule state
(docs/design.md §6).

Per optimizer, the state holds its applied step count and lr references. An optimizer's
entry is identified by what survives a restart: the ``name=`` given to
``reg.attach(opt, name=...)``, else its position among the *currently attached* unnamed
optimizers. When nothing is attached (between ``with reg.attached(opt):`` blocks), the
optimizers of the last ``detach()`` that are still alive are saved. Entries that no
attached optimizer took yet wait for the next ``attach``.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

__all__ = ["VERSION", "check_entry", "check_rule_state", "take_entry"]

#: 3: entries carry ``name``; ``kinds`` records each rule's class
VERSION = 3
_KNOWN = (1, 2, 3)
#: top-level keys of a saved state (``steps``: the first format's list of counts)
KEYS = frozenset({"version", "optimizers", "steps", "manual_steps", "strengths", "rules", "kinds"})


def check_version(state: dict[str, Any]) -> int:
    v = state.get("version", 1)
    if isinstance(v, bool) or not isinstance(v, int) or v not in _KNOWN:
        raise ValueError(
            f"load_state_dict(): unknown state version {v!r} (this torch-regularizers reads "
            f"versions {_KNOWN}); was it saved by a newer release?"
        )
    return v


def _count(v: Any, where: str) -> int:
    if isinstance(v, Tensor) and v.numel() == 1 and not v.is_floating_point():
        v = int(v.item())
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"load_state_dict(): {where} must be an int >= 0, got {v!r}")
    return v


def _lr(v: Any, where: str) -> Any:
    if isinstance(v, Tensor):
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise ValueError(f"load_state_dict(): {where} must be finite and >= 0, got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or v < 0:
        raise ValueError(f"load_state_dict(): {where} must be a finite number >= 0, got {v!r}")
    return v


def check_entry(e: Any, where: str) -> dict[str, Any]:
    """One optimizer's entry, validated: ``{"steps", "initial_lr", "name"}``."""
    if not isinstance(e, dict):
        raise ValueError(f"load_state_dict(): {where} must be a dict, got {type(e).__name__}")
    unknown = sorted(set(e) - {"steps", "initial_lr", "name"})
    if unknown:
        raise ValueError(f"load_state_dict(): unknown key(s) {unknown} in {where}")
    name = e.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"load_state_dict(): {where}.name must be a string, got {name!r}")
    lrs = e.get("initial_lr", {})
    if not isinstance(lrs, dict):
        raise ValueError(f"load_state_dict(): {where}.initial_lr must be a dict, got {lrs!r}")
    out_lrs: dict[int, Any] = {}
    for gi, v in lrs.items():
        try:
            g = int(gi)
        except (TypeError, ValueError):
            raise ValueError(f"load_state_dict(): {where}.initial_lr has a bad group index {gi!r}") from None
        out_lrs[g] = _lr(v, f"{where}.initial_lr[{gi!r}]")
    return {"steps": _count(e.get("steps", 0), f"{where}.steps"), "initial_lr": out_lrs, "name": name}


def check_rule_state(name: str, state: Any) -> None:
    """Tensors in a rule's saved state (L2-SP references) must be finite."""
    if not isinstance(state, dict):
        raise ValueError(f"load_state_dict(): rules[{name!r}] must be a dict, got {type(state).__name__}")
    stack = [(f"rules[{name!r}]", state)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, dict):
            stack += [(f"{where}[{k!r}]", x) for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            stack += [(f"{where}[{i}]", x) for i, x in enumerate(v)]
        elif isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"load_state_dict(): {where} holds NaN or inf values")


def take_entry(pending: list[dict[str, Any]], name: str | None) -> dict[str, Any] | None:
    """Remove and return the pending entry for an optimizer attached under ``name``
    (the first unnamed one when ``name`` is None)."""
    for i, e in enumerate(pending):
        if e.get("name") == name:
            return pending.pop(i)
    return None
