"""Activity regularization: penalties on module *outputs*, via forward hooks.

``tr.ActivityL1(strength, on=...)`` and ``tr.ActivityL2(strength, on=...)`` select
*modules*, not parameters. ``on=`` accepts module types (``nn.ReLU`` or
``(nn.Linear, nn.Conv2d)``), module instances (``model.encoder``), glob patterns over
module names (``"encoder.*"``, names as in ``named_modules()`` without wrapper prefixes),
a predicate ``fn(name, module) -> bool``, ``tr.select.modules(types...)`` (modules of those
types) or ``tr.select.within(instances...)`` (those modules), or a list mixing these.

Batch normalization (the Keras convention, which divides the activity penalty by the
batch size): for every floating-point output tensor ``y`` of a selected module,

* ``ActivityL1``: R(y) = λ·Σ|y| / B
* ``ActivityL2``: R(y) = ½·λ·Σy² / B   (½ as in :class:`~torch_regularizers.L2`; Keras'
  ``activity_regularizer=l2(k)`` is λ = 2k)

with B = ``y.shape[batch_dim]`` (``batch_dim=0`` by default; ``batch_dim=None`` or a 0-d
output: B = 1). Summing over the features and averaging over the batch makes λ independent
of the batch size and matches a mean-reduced data loss (torch's default), which is why
Keras does it. Tuple/list/dict outputs (``nn.LSTM``'s ``(out, (h, c))``) contribute every
floating-point tensor they contain, as in Keras.

Modes:

* ``"grad"`` (default): the forward hook registers a tensor hook on the output that adds
  ∂R/∂y to the output's gradient during backward — the same parameter gradients as
  adding R(y) to the loss, without building any extra graph. The term is added as if
  R were added to the loss *after* any scaling: with gradient accumulation that divides
  the loss by k, or with ``GradScaler`` (which multiplies it), use ``mode="loss"`` (or
  divide λ by k yourself). An output modified in place after the module returns raises
  at backward (its values are needed there).
* ``"loss"``: the forward hook computes R(y) with autograd; ``reg.penalty()`` returns (and
  consumes) the terms accumulated since its last call, so ``loss = crit(...) +
  reg.penalty()`` per micro-batch counts each forward exactly once, also with gradient
  accumulation (each micro-batch's term goes with its own loss and scaling). Terms not
  consumed are dropped after each optimizer step (and by ``reg.advance()``), so an
  unused forward never keeps its graph alive.

Hooks act only while autograd is enabled (not under ``torch.no_grad()`` /
``inference_mode``, e.g. evaluation) and only on outputs that require grad. They are
registered when the :class:`~torch_regularizers.Regularizer` is built (so ``"loss"`` mode
works without an optimizer), removed by ``reg.detach()`` and registered again by
``reg.attach()``. ``reg.stats()``/``reg.value()`` report the penalty of each module's most
recent forward.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import select as _select
from ._rule import Rule, Strength
from .penalties import _acc

__all__ = ["ActivityHooks", "ActivityL1", "ActivityL2", "ActivityPenalty", "ModuleSelector"]


class ModuleSelector(_select.Selector):
    """Selects modules for activity rules (and no parameter). See the module docstring."""

    def __init__(self, spec: Any) -> None:
        self.types: list[type] = []
        self.instances: list[nn.Module] = []
        self.patterns: list[str] = []
        self.preds: list[Callable[[str, nn.Module], bool]] = []
        items = list(spec) if isinstance(spec, (list, tuple, set)) else [spec]
        if not items:
            raise ValueError("activity rule: on= selects no module (empty list)")
        for it in items:
            if isinstance(it, type) and issubclass(it, nn.Module):
                self.types.append(it)
            elif isinstance(it, nn.Module):
                self.instances.append(it)
            elif isinstance(it, str):
                self.patterns.append(it)
            elif isinstance(it, ModuleSelector):
                self.types += it.types
                self.instances += it.instances
                self.patterns += it.patterns
                self.preds += it.preds
            elif isinstance(it, _select._Modules):
                self.types += list(it.types)
            elif isinstance(it, _select._Within):
                self.instances += list(it.mods)
            elif isinstance(it, _select.Selector):
                raise TypeError(
                    f"activity rule: on={it!r} selects parameters; activity rules select modules: "
                    "pass module types, module instances, name globs, fn(name, module), "
                    "tr.select.modules(...) or tr.select.within(...)"
                )
            elif callable(it):
                self.preds.append(it)
            else:
                raise TypeError(
                    f"activity rule: on= got {type(it).__name__}; pass module types, module "
                    "instances, name globs, fn(name, module), tr.select.modules(...) or "
                    "tr.select.within(...)"
                )

    def match(self, idx: _select.ParamIndex) -> set[int]:
        return set()  # no parameter: activity rules act on module outputs

    def _test(self, name: str, m: nn.Module) -> bool:
        return (
            (bool(self.types) and isinstance(m, tuple(self.types)))
            or any(m is i for i in self.instances)
            or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)
            or any(bool(f(name, m)) for f in self.preds)
        )

    def modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``[(name, module)]`` of the selected modules, each once, in ``named_modules()`` order
        (wrappers such as DDP or ``torch.compile`` are looked through and never selected)."""
        out, seen = [], set()
        for prefix, m, _ in _select._walk(model):
            if id(m) in seen or _select._wrapped_attr(m) is not None:
                continue
            name = prefix[:-1] if prefix.endswith(".") else prefix
            if self._test(name, m):
                seen.add(id(m))
                out.append((name, m))
        return out

    def __repr__(self) -> str:
        parts = [t.__name__ for t in self.types] + [type(i).__name__ for i in self.instances]
        parts += [repr(p) for p in self.patterns] + [
            getattr(f, "__name__", "fn") for f in self.preds
        ]
        return f"modules_of({', '.join(parts)})"


def _tensors(out: Any) -> list[Tensor]:
    """Floating-point tensors in a module output (tensor, or nested tuple/list/dict)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


class ActivityPenalty(Rule):
    """Base of activity penalties: ``_act_value(y)`` (sum, before λ and 1/B) and
    ``_act_grad(y)`` (its gradient). ``value(y)``/``grad(y)`` give R(y) = λ·r(y)/B and its
    gradient for one output tensor.

    A :class:`~torch_regularizers.Rule` but not a parameter ``Penalty``: it selects modules,
    and the Regularizer gives it forward hooks instead of parameter buckets.
    """

    _modes = ("grad", "loss")
    _default_mode = "grad"

    def __init__(
        self,
        strength: Strength,
        *,
        on: Any = None,
        mode: str | None = None,
        name: str | None = None,
        batch_dim: int | None = 0,
    ) -> None:
        cls = type(self).__name__
        if on is None:
            raise TypeError(f"{cls}: on= is required (module types, instances or name globs)")
        if batch_dim is not None and (
            isinstance(batch_dim, bool) or not isinstance(batch_dim, int)
        ):
            raise TypeError(f"{cls}: batch_dim must be an int or None, got {batch_dim!r}")
        self.batch_dim = batch_dim
        super().__init__(on=ModuleSelector(on), mode=mode, name=name)
        self._set_strength(strength)

    def _extra_repr(self) -> str:
        return f"batch_dim={self.batch_dim!r}"

    def _batch(self, y: Tensor) -> int:
        bd = self.batch_dim
        if bd is None or y.dim() == 0:
            return 1
        if not -y.dim() <= bd < y.dim():
            raise ValueError(
                f"{type(self).__name__}: batch_dim={bd} is out of range for an output of shape "
                f"{tuple(y.shape)}"
            )
        return max(1, y.shape[bd])

    def _act_value(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _act_grad(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _value(self, p, lam):
        return self._act_value(_acc(p)) * (lam / self._batch(p))

    def _grad(self, p, lam):
        return self._act_grad(p).mul_(lam / self._batch(p))

    def value(self, y: Tensor, strength: float | None = None) -> Tensor:
        """R(y) for one output tensor (differentiable; fp32 for fp16/bf16)."""
        return self._value(y, self._resolve_strength(strength))

    def grad(self, y: Tensor, strength: float | None = None) -> Tensor:
        """∂R/∂y for one output tensor, a new tensor."""
        with torch.no_grad():
            return self._grad(y.detach(), self._resolve_strength(strength))

    def summary_strength(self) -> object:
        s = self.strength
        return getattr(s, "__name__", "schedule") if callable(s) else s


class ActivityL1(ActivityPenalty):
    r"""Activity L1: R(y) = λ·Σ|y| / B on the outputs of the selected modules (sparse
    activations). ∂R/∂y = λ·sign(y)/B. See :mod:`torch_regularizers.activity` for ``on=``,
    the modes and the batch normalization (B = ``y.shape[batch_dim]``, Keras' convention).
    """

    def _act_value(self, y):
        return y.abs().sum()

    def _act_grad(self, y):
        return torch.sign(y)


class ActivityL2(ActivityPenalty):
    r"""Activity L2: R(y) = ½·λ·Σy² / B on the outputs of the selected modules.
    ∂R/∂y = λ·y/B. Keras' ``activity_regularizer=l2(k)`` is λ = 2k. See
    :mod:`torch_regularizers.activity`.
    """

    def _act_value(self, y):
        return 0.5 * (y * y).sum()

    def _act_grad(self, y):
        return y.clone()


class ActivityHooks:
    """The forward hooks of one activity rule on its modules (owned by a Regularizer)."""

    def __init__(
        self,
        rule: ActivityPenalty,
        name: str,
        modules: list[tuple[str, nn.Module]],
        step_fn: Callable[[], int],
    ) -> None:
        self.rule = rule
        self.name = name
        self.modules = modules
        self.step_fn = step_fn
        self.pending: list[Tensor] = []  # loss mode: differentiable terms not consumed yet
        self.last: dict[int, Tensor] = {}  # module index -> detached value of its latest forward
        self.handles: list[Any] = []

    def register(self) -> None:
        if self.handles:
            return
        for i, (mname, m) in enumerate(self.modules):
            self.handles.append(m.register_forward_hook(self._make_hook(i, mname)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.pending.clear()

    def pop_pending(self) -> list[Tensor]:
        out, self.pending = self.pending, []
        return out

    def _lam(self) -> float:
        r = self.rule
        return (
            r.strength_at(self.step_fn(), self.name) if callable(r.strength) else float(r.strength)
        )

    def _make_hook(self, i: int, mname: str):
        rule = self.rule

        def forward_hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            ys = [y for y in _tensors(output) if y.requires_grad]
            if not ys:
                return
            lam = self._lam()
            if rule.mode == "loss":
                v = rule._value(ys[0], lam)
                for y in ys[1:]:
                    v = v + rule._value(y, lam)
                self.pending.append(v)
                self.last[i] = v.detach()
                return
            with torch.no_grad():
                self.last[i] = sum(rule._value(y.detach(), lam) for y in ys)  # type: ignore[assignment]
            if lam == 0:
                return
            for y in ys:
                self._add_grad_hook(y, lam, mname)

        return forward_hook

    def _add_grad_hook(self, y: Tensor, lam: float, mname: str) -> None:
        rule = self.rule
        d = y.detach()  # shares y's storage and version counter, not its graph
        version = y._version
        handle = None

        def tensor_hook(g: Tensor) -> Tensor:
            if d._version != version:
                raise RuntimeError(
                    f"activity rule {self.name!r} (mode='grad'): the output of module "
                    f"{mname or type(self.modules[0][1]).__name__!r} was modified in place after "
                    "the module returned, so its penalty gradient cannot be computed; avoid the "
                    "in-place op (e.g. inplace=True) or use mode='loss'"
                )
            if y_is_leaf and handle is not None:
                handle.remove()  # a leaf keeps its hooks across iterations: fire once
            with torch.no_grad():
                return rule._grad(d, lam).to(g.dtype).add_(g)

        y_is_leaf = y.grad_fn is None
        handle = y.register_hook(tensor_hook)
