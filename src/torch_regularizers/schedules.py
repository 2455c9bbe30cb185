"""Strength schedules: λ as a function of the number of applied optimizer steps.

Any ``strength=`` accepts a float or a callable ``f(step) -> float``. The k-th
*applied* optimizer step (0-based) uses ``f(k)``: each attached optimizer counts its
own steps, and a step skipped by ``GradScaler`` (inf/NaN gradients) does not count.
With manual use (``reg.apply_*``) the count is advanced by ``reg.advance()``.

The schedules below are plain callables that can also be written to and read from a
config (``to_config()`` / :func:`from_config`), and they are pure functions of the
step, so a resumed run only needs the step count (saved by ``reg.state_dict()``)::

    tr.L1(tr.schedules.linear_warmup(1e-4, warmup_steps=1000), mode="prox")
    tr.L2(tr.schedules.cosine(1e-2, total_steps=10_000, final=1e-4), mode="decoupled")

Each formula is the closed form of the torch LR scheduler of the same name, with the
base learning rate replaced by ``value``:

============================================  ==============================================
schedule                                      λ at step k
============================================  ==============================================
``constant(v)``                               v
``linear_warmup(v, W, start=0)``              start + (v − start)·min(k, W)/W   (``LinearLR``)
``cosine(v, T, final=0)``                     final + (v − final)·(1 + cos(π·min(k, T)/T))/2
                                              (``CosineAnnealingLR``, held at ``final`` after T)
``step(v, step_size, gamma=0.1)``             v·γ^⌊k/step_size⌋                 (``StepLR``)
``multistep(v, milestones, gamma=0.1)``       v·γ^(number of milestones ≤ k)    (``MultiStepLR``)
============================================  ==============================================

``linear_warmup`` also takes a schedule as ``value``: λ(k) = start + (v(k) − start)·min(k, W)/W,
e.g. ``linear_warmup(cosine(1e-3, 10_000), 500)``. A decreasing ``start > value`` ramp is allowed,
and ``cosine`` with ``final > value`` increases. A schedule that returns a negative or NaN value
raises at the step where it does (naming the rule and the step).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from numbers import Real
from typing import Any, Callable, ClassVar, Union

__all__ = [
    "Constant",
    "Cosine",
    "LinearWarmup",
    "MultiStep",
    "Schedule",
    "Step",
    "constant",
    "cosine",
    "from_config",
    "linear_warmup",
    "multistep",
    "step",
]


def _number(value: object, arg: str, owner: str, *, nonneg: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{owner}: {arg} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or math.isinf(v) or (nonneg and v < 0):
        raise ValueError(f"{owner}: {arg} must be a finite number{' >= 0' if nonneg else ''}, got {value!r}")
    return v


def _int(value: object, arg: str, owner: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{owner}: {arg} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {arg} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Schedule:
    """Base class of the built-in schedules: ``sched(step) -> float``.

    Subclasses define ``kind`` (the ``type`` in a config) and ``_fields`` (the
    constructor arguments, stored as attributes of the same name).
    """

    kind: ClassVar[str] = ""
    _fields: ClassVar[tuple[str, ...]] = ()

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        """``{"type": kind, <arguments>}``: plain JSON/YAML data; :func:`from_config` inverts it."""
        out: dict[str, Any] = {"type": self.kind}
        for f in self._fields:
            v = getattr(self, f)
            if isinstance(v, Schedule):
                v = v.to_config()
            elif isinstance(v, tuple):
                v = list(v)
            out[f] = v
        return out

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_config() == self.to_config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{self.kind}({args})"


class Constant(Schedule):
    """λ(k) = ``value``."""

    kind = "constant"
    _fields = ("value",)

    def __init__(self, value: float) -> None:
        self.value = _number(value, "value", "constant")

    def __call__(self, step: int) -> float:
        return self.value


class LinearWarmup(Schedule):
    """λ(k) = start + (v − start)·min(k, W)/W with v = ``value`` (a float or a schedule at k).

    ``warmup_steps=0`` is ``value`` from the first step on.
    """

    kind = "linear_warmup"
    _fields = ("value", "warmup_steps", "start")

    def __init__(self, value: float | Callable[[int], float], warmup_steps: int, start: float = 0.0) -> None:
        if not isinstance(value, Schedule):
            value = _number(value, "value", "linear_warmup")
        self.value = value
        self.warmup_steps = _int(warmup_steps, "warmup_steps", "linear_warmup", minimum=0)
        self.start = _number(start, "start", "linear_warmup")

    def __call__(self, step: int) -> float:
        v = self.value(step) if callable(self.value) else self.value
        w = self.warmup_steps
        if w == 0 or step >= w:
            return float(v)
        return self.start + (v - self.start) * step / w


class Cosine(Schedule):
    """λ(k) = final + (value − final)·(1 + cos(π·min(k, T)/T))/2, T = ``total_steps``."""

    kind = "cosine"
    _fields = ("value", "total_steps", "final")

    def __init__(self, value: float, total_steps: int, final: float = 0.0) -> None:
        self.value = _number(value, "value", "cosine")
        self.total_steps = _int(total_steps, "total_steps", "cosine", minimum=1)
        self.final = _number(final, "final", "cosine")

    def __call__(self, step: int) -> float:
        k = min(step, self.total_steps)
        return self.final + (self.value - self.final) * (1 + math.cos(math.pi * k / self.total_steps)) / 2


class Step(Schedule):
    """λ(k) = value·gamma^⌊k / step_size⌋ (torch's ``StepLR``)."""

    kind = "step"
    _fields = ("value", "step_size", "gamma")

    def __init__(self, value: float, step_size: int, gamma: float = 0.1) -> None:
        self.value = _number(value, "value", "step")
        self.step_size = _int(step_size, "step_size", "step", minimum=1)
        self.gamma = _number(gamma, "gamma", "step")

    def __call__(self, step: int) -> float:
        return self.value * self.gamma ** (step // self.step_size)


class MultiStep(Schedule):
    """λ(k) = value·gamma^(number of milestones ≤ k) (torch's ``MultiStepLR``)."""

    kind = "multistep"
    _fields = ("value", "milestones", "gamma")

    def __init__(self, value: float, milestones: Sequence[int], gamma: float = 0.1) -> None:
        self.value = _number(value, "value", "multistep")
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise ValueError(f"multistep: milestones must be a list of step numbers, got {milestones!r}")
        ms = tuple(_int(m, "milestones", "multistep", minimum=1) for m in milestones)
        if list(ms) != sorted(ms):
            raise ValueError(f"multistep: milestones must be increasing, got {list(milestones)!r}")
        self.milestones = ms
        self.gamma = _number(gamma, "gamma", "multistep")

    def __call__(self, step: int) -> float:
        return self.value * self.gamma ** bisect.bisect_right(self.milestones, step)


constant = Constant
linear_warmup = LinearWarmup
cosine = Cosine
step = Step
multistep = MultiStep

#: config ``type`` -> schedule class
KINDS: dict[str, type[Schedule]] = {c.kind: c for c in (Constant, LinearWarmup, Cosine, Step, MultiStep)}

ScheduleConfig = Union[float, dict]


def from_config(cfg: Any, path: str = "schedule") -> Schedule:
    """Build a schedule from ``{"type": ..., <arguments>}``; errors name the key path."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a schedule is a mapping with a 'type' key, got {cfg!r}")
    kind = cfg.get("type")
    if kind not in KINDS:
        raise ValueError(
            f"{path}.type: unknown schedule {kind!r}; expected one of {sorted(KINDS)}"
        )
    cls = KINDS[kind]
    kwargs: dict[str, Any] = {}
    for key, val in cfg.items():
        if key == "type":
            continue
        if key not in cls._fields:
            raise ValueError(
                f"{path}.{key}: unknown key for schedule {kind!r}; expected {list(cls._fields)}"
            )
        if key == "value" and isinstance(val, dict):
            if cls is not LinearWarmup:
                raise ValueError(f"{path}.value: only linear_warmup takes a schedule as value")
            val = from_config(val, f"{path}.value")
        kwargs[key] = _coerce_number(val)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None
    except ValueError as e:
        msg = str(e)
        bad = next((k for k in cls._fields if f": {k} " in msg), None)
        raise ValueError(f"{path}{'.' + bad if bad else ''}: {msg}") from None


def _coerce_number(val: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string: accept numeric strings where numbers are expected."""
    if isinstance(val, str):
        try:
            return float(val)
        except ValueError:
            return val
    if isinstance(val, list):
        return [_coerce_number(v) for v in val]
    return val


# --------------------------------------------------------------------------- strength state


def strength_state(strength: Any) -> Any:
    """What ``reg.state_dict()`` keeps of a rule's strength: the float, a built-in schedule's
    config, the ``state_dict()`` of a stateful callable, or ``None`` for a plain callable."""
    if isinstance(strength, Schedule):
        return {"schedule": strength.to_config()}
    if callable(strength):
        sd = getattr(strength, "state_dict", None)
        return {"callable_state": sd()} if callable(sd) else None
    return float(strength)


def load_strength_state(rule: Any, state: Any) -> None:
    """Inverse of :func:`strength_state` on ``rule`` (a plain callable is left as it is)."""
    if state is None:
        return
    if isinstance(state, dict) and "schedule" in state:
        rule.strength = from_config(state["schedule"])
    elif isinstance(state, dict) and "callable_state" in state:
        load = getattr(rule.strength, "load_state_dict", None)
        if callable(load):
            load(state["callable_state"])
    else:
        rule.strength = float(state)
