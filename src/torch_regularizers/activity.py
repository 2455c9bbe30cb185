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
  adding R(y) to the loss, without building any extra graph. With ``torch.amp.GradScaler``
  pass it to ``reg.attach(optimizer, scaler=scaler)``: the backward of
  ``scaler.scale(loss)`` carries S·∂L/∂y, so the term added is S·∂R/∂y (S read on device
  during backward, no host sync) and ``unscale_`` gives exactly the gradients of the
  unscaled run. Gradient accumulation that divides the loss by k is not seen by the hook:
  use ``mode="loss"`` (or divide λ by k yourself). An output modified in place after the
  module returns raises at backward (its values are needed there).
* ``"loss"``: the forward hook computes R(y) with autograd; ``reg.penalty()`` returns and
  consumes the terms of the **latest forward** of each module. Call it after every forward
  — with gradient accumulation, once per micro-batch: ``loss = crit(...) + reg.penalty()``
  counts each micro-batch's term exactly once, with its own loss and scaling. A second
  forward before ``penalty()`` *replaces* the first one's term (its graph is released; a
  warning says so once): forwards that never reach ``penalty()`` (a validation pass left
  with autograd on, 500 forwards without a step) hold one forward's graph, not 500 — and
  two forwards that both need the penalty (two views of a batch) need a ``penalty()`` call
  after each. A module called several times within one forward of the model (a shared
  activation, an RNN cell) contributes every call. Terms not consumed are also dropped
  after each optimizer step (and by ``reg.advance()``).

Hooks act only while autograd is enabled (not under ``torch.no_grad()`` /
``inference_mode``, e.g. evaluation) and only on outputs that require grad. They are
registered when the :class:`~torch_regularizers.Regularizer` is built (so ``"loss"`` mode
works without an optimizer), removed by ``reg.detach()`` and registered again by
``reg.attach()``. They act only for the modules they were registered on: ``copy.deepcopy``
of the model copies forward hooks, and on the copy they do nothing (build another
Regularizer for the copy). ``reg.stats()``/``reg.value()`` report the penalty of each
module's most recent forward.
"""

from __future__ import annotations

import fnmatch
import warnings
import weakref
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

    ``mode="loss"``: ``reg.penalty()`` holds the term of each module's latest forward only;
    with gradient accumulation call it after each micro-batch's forward (``loss = crit(...)
    + reg.penalty()``). A forward whose term was not taken is replaced by the next one
    (never summed with it). ``mode="grad"`` with ``GradScaler``: ``reg.attach(opt,
    scaler=scaler)``.
    """

    def _act_value(self, y):
        return y.abs().sum()

    def _act_grad(self, y):
        return torch.sign(y)


class ActivityL2(ActivityPenalty):
    r"""Activity L2: R(y) = ½·λ·Σy² / B on the outputs of the selected modules.
    ∂R/∂y = λ·y/B. Keras' ``activity_regularizer=l2(k)`` is λ = 2k. See
    :mod:`torch_regularizers.activity`.

    ``mode="loss"``: ``reg.penalty()`` holds the term of each module's latest forward only;
    with gradient accumulation call it after each micro-batch's forward (``loss = crit(...)
    + reg.penalty()``). A forward whose term was not taken is replaced by the next one
    (never summed with it). ``mode="grad"`` with ``GradScaler``: ``reg.attach(opt,
    scaler=scaler)``.
    """

    def _act_value(self, y):
        return 0.5 * (y * y).sum()

    def _act_grad(self, y):
        return y.clone()


def _is_bound(module: nn.Module, ref: weakref.ref) -> bool:
    """``module`` is the one a hook was registered on, or an ``nn.DataParallel`` replica of it
    (a shallow copy made per forward that shares its hook dict; ``copy.deepcopy`` makes a new
    one)."""
    bound = ref()
    if module is bound:
        return True
    return (
        bound is not None
        and getattr(module, "_is_replica", False)
        and module._forward_hooks is bound._forward_hooks
    )


class ActivityHooks:
    """The forward hooks of one activity rule on its modules (owned by a Regularizer).

    Args:
        rule: the rule.
        name: its name in the Regularizer.
        modules: ``[(name, module)]`` to hook. They are held weakly and by identity: a hook
            copied with its module (``copy.deepcopy(model)`` copies forward hooks) does nothing
            on the copy. ``nn.DataParallel``'s per-forward replicas (which share the module's
            hook dict) act as the module itself.
        step_fn: the current step (for scheduled strengths).
        scale_fn: ``None`` or a callable returning ``None`` (no scaling) or the current
            ``GradScaler`` scale S (a float or a 0-d tensor, read without a host sync); it is
            called during backward, and grad-mode terms are multiplied by S, since they join an
            output gradient that the scaled loss has already multiplied by S.
        root: the model. A forward of ``root`` (with autograd enabled) is one *forward*: the
            terms of a module called several times in it (a shared activation, an RNN cell)
            are summed, and it replaces every loss-mode term still pending from an earlier
            forward. Without ``root`` each call of a module is its own forward.

    Loss mode keeps at most the terms of the latest forward per module (``pending``,
    ``(module index, output device)`` -> term; one key per device for ``nn.DataParallel``
    replicas): a new forward of a module replaces its term not yet taken by
    :meth:`pop_pending` (a warning says so once), so forwards that never reach ``penalty()``
    do not pile up graphs. ``last`` (same keys) holds the detached values of the latest
    forward, for ``value()``/``stats()``.
    """

    def __init__(
        self,
        rule: ActivityPenalty,
        name: str,
        modules: list[tuple[str, nn.Module]],
        step_fn: Callable[[], int],
        scale_fn: Callable[[], Any] | None = None,
        root: nn.Module | None = None,
    ) -> None:
        self.rule = rule
        self.name = name
        self._names = [n for n, _ in modules]
        self._refs = [weakref.ref(m) for _, m in modules]
        self._root = weakref.ref(root) if root is not None else None
        self.step_fn = step_fn
        self.scale_fn = scale_fn
        # loss mode: (module index, device) -> differentiable term of its latest forward, not
        # taken yet; last: -> detached value of its latest forward (both modes)
        self.pending: dict[tuple[int, torch.device], Tensor] = {}
        self.last: dict[tuple[int, torch.device], Tensor] = {}
        self._gen: dict[tuple[int, torch.device], int | None] = {}  # the forward they came from
        self._forward = 0  # root forwards with autograd enabled, so far
        self._depth = 0  # root forwards in progress (nested calls of the root count once)
        self._warned = False
        self.handles: list[Any] = []

    @property
    def modules(self) -> list[tuple[str, nn.Module]]:
        """``[(name, module)]`` of the hooked modules still alive."""
        return [(n, m) for n, r in zip(self._names, self._refs) if (m := r()) is not None]

    def register(self) -> None:
        if self.handles:
            return
        for i, (mname, ref) in enumerate(zip(self._names, self._refs)):
            m = ref()
            if m is not None:
                self.handles.append(m.register_forward_hook(self._make_hook(i, mname, ref)))
        root = self._root() if self._root is not None else None
        if root is not None:
            # plain closures, not bound methods: deepcopy copies a bound method's object
            def root_pre(module: nn.Module, args: Any) -> None:
                self._root_pre(module)

            def root_post(module: nn.Module, args: Any, output: Any) -> None:
                self._root_post(module)

            self.handles.append(root.register_forward_pre_hook(root_pre))
            self.handles.append(root.register_forward_hook(root_post, always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.pending.clear()
        self._depth = 0

    def pop_pending(self) -> list[Tensor]:
        """The pending loss-mode terms (the latest forward of each module), consumed."""
        out = list(self.pending.values())
        self.pending.clear()
        return out

    def _lam(self) -> float:
        r = self.rule
        return (
            r.strength_at(self.step_fn(), self.name) if callable(r.strength) else float(r.strength)
        )

    # ------------------------------------------------------------------ forwards of the root
    def _root_pre(self, module: nn.Module) -> None:
        if self._root is None or module is not self._root():
            return  # a copy of the model (deepcopy copies hooks): not ours
        self._depth += 1
        if self._depth == 1 and torch.is_grad_enabled():
            self._forward += 1
            if self.pending and self.rule.mode == "loss":
                self._replaced()
                self.pending.clear()

    def _root_post(self, module: nn.Module) -> None:
        if self._root is not None and module is self._root():
            self._depth = max(0, self._depth - 1)

    def _current(self) -> int | None:
        """The forward a module call belongs to: the root forward in progress, else None."""
        return self._forward if self._depth > 0 else None

    def _replaced(self) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"activity rule {self.name!r} (mode='loss'): a forward ran before reg.penalty() "
            "took the terms of the previous one; only the latest forward's terms are kept. "
            "Call reg.penalty() after every forward (per micro-batch), or run forwards that "
            "need no penalty under torch.no_grad()",
            stacklevel=2,
        )

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, i: int, mname: str, ref: weakref.ref):
        rule = self.rule

        def forward_hook(module: nn.Module, args: Any, output: Any) -> None:
            if not _is_bound(module, ref):
                return  # a copy of the bound module (deepcopy copies hooks): not ours
            if not torch.is_grad_enabled():
                return
            ys = [y for y in _tensors(output) if y.requires_grad]
            if not ys:
                return
            lam = self._lam()
            key = (i, ys[0].device)
            gen = self._current()
            same = gen is not None and self._gen.get(key, -1) == gen  # another call, same forward
            self._gen[key] = gen
            if rule.mode == "loss":
                v = rule._value(ys[0], lam)
                for y in ys[1:]:
                    v = v + rule._value(y, lam)
                old = self.pending.get(key)
                if old is not None and same:
                    v = old + v
                elif old is not None:
                    self._replaced()
                self.pending[key] = v
                self.last[key] = v.detach()
                return
            with torch.no_grad():
                val = sum(rule._value(y.detach(), lam) for y in ys)
                old_val = self.last.get(key) if same else None
                self.last[key] = val if old_val is None else old_val + val  # type: ignore[assignment]
            if lam == 0:
                return
            for y in ys:
                self._add_grad_hook(y, lam, mname or type(module).__name__)

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
                    f"{mname!r} was modified in place after "
                    "the module returned, so its penalty gradient cannot be computed; avoid the "
                    "in-place op (e.g. inplace=True) or use mode='loss'"
                )
            if y_is_leaf and handle is not None:
                handle.remove()  # a leaf keeps its hooks across iterations: fire once
            with torch.no_grad():
                t = rule._grad(d, lam)
                scale = self.scale_fn() if self.scale_fn is not None else None
                if scale is not None:  # GradScaler: g is S·∂L/∂y, so the term is S·∂R/∂y
                    if t.dtype in (torch.float16, torch.bfloat16):
                        t = t.float()  # S·∂R/∂y in fp32, rounded once below
                    if isinstance(scale, Tensor) and scale.device != t.device:
                        scale = scale.to(t.device)
                    t = t.mul_(scale)
                return t.to(g.dtype).add_(g)

        y_is_leaf = y.grad_fn is None
        handle = y.register_hook(tensor_hook)
