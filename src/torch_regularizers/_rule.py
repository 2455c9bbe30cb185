"""What every rule (penalty or constraint) shares: target selector, mode, name, strength.

A rule is declarative: it holds its math and options, never a model. The
:class:`~torch_regularizers.Regularizer` binds rules to parameters.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Callable, Union

from . import select as _select

__all__ = ["LR_COUPLINGS", "MODES", "Rule", "Strength", "check_nonneg", "check_ratio", "kept_state", "same_layout"]

#: Modes a penalty can run in (see docs/design.md §3).
MODES = ("grad", "decoupled", "prox", "loss")
#: How the step size of decoupled/prox rules follows the optimizer's learning rate.
LR_COUPLINGS = ("lr", "lr_ratio", "corrected", "none")

Strength = Union[float, Callable[[int], float]]


def check_nonneg(value: object, arg: str, owner: str) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` if it is negative or NaN."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{owner}: {arg} must be a real number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or v < 0 or math.isinf(v):
        raise ValueError(f"{owner}: {arg} must be a finite number >= 0, got {value!r}")
    return v


def same_layout(a: Any, b: Any) -> bool:
    """``a`` and ``b`` have the same shape, device and dtype (a saved state still fits)."""
    return a.shape == b.shape and a.device == b.device and a.dtype == b.dtype


def kept_state(old: dict[str, Any], names: list[str], fresh: list, fits: Callable[[Any, Any], bool]) -> list:
    """For :meth:`Rule._rebind` of rules with per-parameter state: per name, the state
    bound before (``old[name]``) where ``fits(old, fresh)``, else the fresh one."""
    out = list(fresh)
    for i, n in enumerate(names[: len(out)]):
        o = old.get(n)
        if o is not None and fits(o, out[i]):
            out[i] = o
    return out


def check_ratio(value: object, arg: str, owner: str) -> float:
    """Return ``value`` as a float in [0, 1], or raise ``ValueError`` naming ``arg``."""
    v = check_nonneg(value, arg, owner)
    if v > 1:
        raise ValueError(f"{owner}: {arg} must be in [0, 1], got {value!r}")
    return v


class Rule:
    """Base of penalties and constraints: ``on=`` (selector), ``mode=``, ``name=``.

    Subclasses set ``_modes`` (the modes they support) and ``_default_mode``.
    """

    _modes: tuple[str, ...] = MODES
    _default_mode: str = "grad"

    def __init__(
        self,
        *,
        on: _select.Selector | None = None,
        mode: str | None = None,
        name: str | None = None,
        lr_coupling: str = "lr",
    ) -> None:
        cls = type(self).__name__
        if on is None:
            on = _select.weights
        if not isinstance(on, _select.Selector):
            raise TypeError(
                f"{cls}: on= must be a tr.select selector (e.g. tr.select.name('fc.*')), "
                f"got {type(on).__name__}"
            )
        mode = self._default_mode if mode is None else mode
        if mode not in self._modes:
            raise ValueError(f"{cls}: mode={mode!r} is not one of {self._modes}")
        if lr_coupling not in LR_COUPLINGS:
            raise ValueError(f"{cls}: lr_coupling={lr_coupling!r} is not one of {LR_COUPLINGS}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"{cls}: name= must be a non-empty string, got {name!r}")
        self.on = on
        self.mode = mode
        self.name = name
        self.lr_coupling = lr_coupling

    @property
    def default_name(self) -> str:
        """Lower-case class name, used when ``name=`` is not given."""
        return type(self).__name__.lower()

    def _set_strength(self, strength: Strength, arg: str = "strength") -> None:
        if callable(strength):
            self._strength: Strength = strength
        else:
            self._strength = check_nonneg(strength, arg, type(self).__name__)

    @property
    def strength(self) -> Strength:
        """The strength λ: a float, or a schedule ``f(step) -> float``."""
        return self._strength

    @strength.setter
    def strength(self, value: Strength) -> None:
        self._set_strength(value)

    def strength_at(self, step: int, rule: str | None = None) -> float:
        """λ at the ``step``-th applied optimizer step (0-based).

        Raises ``ValueError`` naming the rule and the step if a schedule returns a
        negative, infinite or NaN value.
        """
        s = self._strength
        if not callable(s):
            return s
        v = s(step)
        try:
            fv = float(v)
        except (TypeError, ValueError):
            fv = float("nan")
        if math.isnan(fv) or math.isinf(fv) or fv < 0:
            raise ValueError(
                f"rule {rule or self.name or self.default_name!r}: strength schedule returned "
                f"{v!r} at step {step}; it must be a finite number >= 0"
            )
        return fv

    def _resolve_strength(self, strength: float | None) -> float:
        return self.strength_at(0) if strength is None else float(strength)

    # ------------------------------------------------------------------ hooks for the Regularizer
    def _bind(self, names: list[str], params: list, modules: list | None = None) -> None:
        """Called once by the Regularizer with the selected parameters and their owning modules
        (``modules[i]`` owns ``params[i]``; a parametrization's ``original`` is owned by the
        parametrized module); may raise ``ValueError`` naming the parameters it cannot handle
        (wrong ndim, reference shape, ...)."""

    def _rebind(self, names: list[str], params: list, modules: list | None = None) -> None:
        """Bind again after the model's parameters were replaced (same contract as
        :meth:`_bind`); rules with per-parameter state keep what still applies."""
        self._bind(names, params, modules)

    def _unbind(self) -> None:
        """Forget per-binding state: called on a copy made for another Regularizer."""
        self.__dict__.pop("_default_dims", None)

    def stats_tensors(self, params: list, strength: float) -> dict:
        """0-d tensors for ``reg.stats()`` (``value``, ``sparsity``, ...), no host sync."""
        return {}

    def summary_strength(self) -> object:
        """What ``summary()`` shows as this rule's strength."""
        return None

    def rule_state_dict(self) -> dict:
        """State to save with the regularizer (e.g. L2-SP references)."""
        return {}

    def load_rule_state_dict(self, state: dict) -> None:
        """Restore :meth:`rule_state_dict`."""

    def __repr__(self) -> str:
        s = self._strength
        s_txt = getattr(s, "__name__", repr(s)) if callable(s) else repr(s)
        extra = self._extra_repr()
        return (
            f"{type(self).__name__}({s_txt}{', ' + extra if extra else ''}, "
            f"mode={self.mode!r}, on={self.on!r})"
        )

    def _extra_repr(self) -> str:
        return ""
