"""The Regularizer: rules bound to a model's parameters, applied by optimizer hooks.

The modes are tabled in the :class:`Regularizer` docstring; the order of one step
(validate → grad → decoupled → update → prox → constraints → count) is the table in
``_attachment.py`` (docs/design.md §3).

The concerns live in one module each: binding rules to parameters (``_binding``), one
attached optimizer with its hooks and step transaction (``_attachment``), reporting
(``_report``) and resumable state (``_state``). This class ties them together.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _binding
from . import _state as _st
from . import distributed as _dist
from . import select as _select
from ._attachment import Attachment, binding_value, sum_values, unwrap_optimizer
from ._metric import PRECONDITIONED, check_supported
from ._report import format_summary, stats, summary_dict
from ._rule import Rule
from .activity import ActivityHooks, ActivityPenalty
from .penalties import Penalty
from .weight_decay import check_double_decay

__all__ = ["Regularizer", "unwrap_optimizer"]

IMPLS = ("auto", "reference", "foreach")

# optimizer -> the regularizers attached to it (both weakly): two regularizers on one
# optimizer must select disjoint parameters
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.WeakSet] = weakref.WeakKeyDictionary()


class Regularizer:
    """Regularization rules bound to a model's parameters.

    Example::

        reg = tr.Regularizer(model, [
            tr.L2(1e-4, mode="decoupled"),                       # on tr.select.weights
            tr.L1(1e-5, on=tr.select.name("head.*"), mode="prox"),
        ])
        reg.attach(optimizer)       # every optimizer.step() now applies it
        print(reg.summary())

    Modes::

        mode          when                         what
        "grad"        in optimizer.step(), before  g ← g + ∇R(θ)       (= R added to the loss)
        "decoupled"   in optimizer.step(), before  θ ← θ − c·∇R(θ)     (AdamW-style, any optimizer)
        "prox"        in optimizer.step(), after   θ ← prox_{c·R}(θ)   (exact zeros)
        "loss"        never automatically          reg.penalty() returns Σ R(θ), differentiable

    with c = lr·λ (``lr_coupling="lr"``), λ·lr/lr₀ (``"lr_ratio"``) or λ (``"none"``).
    Constraints project after the update, after any prox.

    A rule instance belongs to the first Regularizer built with it; another Regularizer
    given the same instance binds a copy of it (``reg.rules[name]``). The selection is by
    name: when the model's parameters are replaced (``to_empty``, ``load_state_dict(
    assign=True)``, assigning a new ``nn.Parameter``), the rules follow the new tensors at
    the next ``attach``/``penalty``/``value``/``stats``/``summary``/``apply_*`` call.

    Args:
        model: the model (wrappers such as DDP or ``torch.compile`` are looked through).
        rules: penalties and constraints. Each selects its parameters with ``on=``.
        allow_empty: do not raise when a rule's selector matches no parameter (or the rule
            list is empty).
        impl: ``"auto"`` (fastest known), ``"foreach"`` (``torch._foreach_*`` multi-tensor
            kernels) or ``"reference"`` (plain per-tensor loop, for checking).

    Raises:
        TypeError: ``rules`` is not a rule or a list of rule instances.
        ValueError: a rule selects nothing (unless ``allow_empty``), two ``"prox"`` rules
            select one parameter, a rule name is used twice, or a rule rejects a parameter.
    """

    def __init__(
        self,
        model: nn.Module,
        rules: Iterable[Rule] | Rule,
        *,
        allow_empty: bool = False,
        impl: str = "auto",
    ) -> None:
        rules = _binding.normalize_rules(rules, allow_empty)
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
        self.model = model
        self.impl = "foreach" if impl == "auto" else impl
        self._allow_empty = allow_empty
        self._index = _select.index(model)
        rules = [_binding.own(r, self) for r in rules]
        names = _binding.rule_names(rules)
        self._bindings = _binding.bind_rules(model, self._index, rules, names, allow_empty)
        self._fingerprint = _binding.fingerprint(model)
        self._watch = _binding.ModelWatch(model)
        self._manual = self._new_attachment(None)
        self._attachments: list[Attachment] = []  # attached now, in attach order
        # detached optimizers (weakly) -> their attachment: re-attaching continues counting
        self._detached: weakref.WeakKeyDictionary[Any, Attachment] = weakref.WeakKeyDictionary()
        self._last_detached: list[Attachment] = []
        self._pending: list[dict[str, Any]] = []  # saved optimizer entries not attached yet
        self._scaler: Any = None
        self._activity: list[ActivityHooks] = []  # forward hooks of activity rules
        for b in self._bindings:
            if isinstance(b.rule, ActivityPenalty):  # selects modules, not parameters
                self._bind_activity(b)

    def _new_attachment(self, opt: torch.optim.Optimizer | None, name: str | None = None) -> Attachment:
        zero = _dist.deepspeed_of(opt) if opt is not None else None
        if zero is not None:  # DeepSpeed ZeRO: the rules act on its fp32 partitions (_zero.py)
            from ._zero import ZeroAttachment

            return ZeroAttachment(
                self._synced_bindings, opt, zero, name=name, impl=self.impl, has_schedule=self._has_schedule
            )
        return Attachment(self._synced_bindings, opt, name=name, impl=self.impl, has_schedule=self._has_schedule)

    def _synced_bindings(self) -> list[_binding.Binding]:
        """The bindings, bound again first if the model's parameters were replaced (an
        attachment rebuilding its buckets after its param groups changed asks for them)."""
        self._sync()
        return self._bindings

    def _has_schedule(self) -> bool:
        return any(callable(b.rule.strength) for b in self._bindings if isinstance(b.rule, Penalty))

    # ------------------------------------------------------------------ rebinding
    def _sync(self) -> None:
        """Follow replaced parameters: bind the rules again (by name) if the model's parameter
        tensors are not the ones bound (see the class docstring). Cheap when nothing changed
        (:class:`~._binding.ModelWatch`): it runs on every manual ``apply_*`` call."""
        if self._watch.model is not self.model:  # reg.model was reassigned
            self._watch = _binding.ModelWatch(self.model)
            self._fingerprint = ()
        elif not self._watch.changed():
            return
        fp = _binding.fingerprint(self.model)
        if fp == self._fingerprint:  # the tree changed, not the parameters
            self._watch.reset()
            return
        if _dist.fsdp2_unsharded(self.model):  # FSDP2 mid-step: transient
            return
        self._index = _select.index(self.model)
        rules = [b.rule for b in self._bindings]
        names = [b.name for b in self._bindings]
        self._bindings = _binding.bind_rules(
            self.model, self._index, rules, names, self._allow_empty, rebind=True
        )
        self._fingerprint = fp
        self._watch.reset()
        for att in [self._manual, *self._live_attachments()]:
            att.rebuild()

    # ------------------------------------------------------------------ attach / detach
    def attach(
        self,
        *optimizers: Any,
        names: str | Sequence[str | None] | None = None,
        scaler: Any = None,
    ) -> Regularizer:
        """Apply the rules inside every ``step()`` of these optimizers (all at once, e.g. a GAN's).

        Wrappers exposing ``.optimizer`` (accelerate, Lightning) are looked through. All or
        nothing: if any optimizer is refused, none is attached.

        Args:
            names: a name per optimizer (a str for one optimizer): the key of its entry in
                :meth:`state_dict`, so a resumed run gives each optimizer its own step count
                whatever the attach order. Unnamed optimizers are matched by position among
                the attached unnamed ones.
            scaler: the ``torch.amp.GradScaler`` of the loop, for activity rules in
                ``"grad"`` mode (their term joins the scaled output gradient, so it is
                scaled by the scaler's current scale).

        Raises:
            ValueError: a selected trainable parameter belongs to none of the attached
                optimizers; another Regularizer attached to one of them selects some of the
                same parameters; decoupled/prox rules meet an optimizer that evaluates its
                closure several times per step (LBFGS); a param group lacks ``"lr"`` that an
                lr-coupled rule needs.
        """
        if not optimizers:
            raise TypeError("attach() needs at least one optimizer")
        opts = [unwrap_optimizer(o) for o in optimizers]
        if names is None or isinstance(names, str):
            names_l: list[str | None] = [names] * len(opts) if names is None else [names]
        else:
            names_l = list(names)
        if len(names_l) != len(opts):
            raise ValueError(f"attach(): names has {len(names_l)} entries for {len(opts)} optimizers")
        for n in names_l:
            if n is not None and (not isinstance(n, str) or not n):
                raise ValueError(f"attach(): names must be non-empty strings, got {n!r}")
        pairs: list[tuple[torch.optim.Optimizer, str | None]] = []
        for o, n in zip(opts, names_l):  # one optimizer given twice (or with its wrapper): once
            if not any(o is q for q, _ in pairs):
                pairs.append((o, n))
        self._sync()
        live = self._live_attachments()
        mine = {id(p) for p in self.model.parameters()}
        orphans = [a for a in live if not any(id(p) in mine for p in _dist.stepped_params(a.opt))]
        if orphans:  # their optimizers step replaced tensors only (assign=True, to_empty)
            live = [a for a in live if a not in orphans]
        new = [(o, n) for o, n in pairs if not any(a.opt is o for a in live)]
        for o, n in pairs:  # already attached: a name given now is its name from now on
            for a in live:
                if a.opt is o and n is not None:
                    a.name = n
        taken = [a.name for a in live if a.name is not None] + [n for _, n in new if n]
        dup = sorted({n for n in taken if taken.count(n) > 1})
        if dup:
            raise ValueError(f"attach(): optimizer name {dup[0]!r} is used twice")
        # validate everything before registering anything (all or nothing)
        self._check_owned([o for o, _ in pairs])
        atts: list[Attachment] = []
        for opt, name in new:
            att = self._detached.get(opt)
            if att is None:
                att = self._new_attachment(opt, name)
            else:  # re-attached after detach(): keeps counting
                att.rebuild()
            self._check_optimizer(att, live + atts)
            atts.append(att)
        for a in orphans:
            a.remove()
            _ATTACHED.get(a.opt, weakref.WeakSet()).discard(self)
        self._attachments = live
        for att, (_, name) in zip(atts, new):
            self._detached.pop(att.opt, None)
            att.name = name if name is not None else att.name
            entry = _st.take_entry(self._pending, att.name)
            if entry is not None:
                self._apply_entry(att, entry)
            elif self._pending:
                saved = [e.get("name") for e in self._pending]
                warnings.warn(
                    f"attach(): the loaded state has optimizer entries named {saved} but none "
                    f"for this {type(att.opt).__name__} (name {att.name!r}): it starts at step "
                    f"{att.steps}. Attach it with the name it was saved under (names=...)",
                    UserWarning,
                    stacklevel=2,
                )
            att.register(self._activity_clear)
            self._attachments.append(att)
            _ATTACHED.setdefault(att.opt, weakref.WeakSet()).add(self)
            check_double_decay(self, att.opt)
            self._hint_metric(att)
        self._scaler = scaler if scaler is not None else self._scaler
        self._last_detached = []
        self._activity_register()
        return self

    def _check_owned(self, opts: list[torch.optim.Optimizer]) -> None:
        owned = {id(p) for o in [*opts, *self._optimizers()] for p in _dist.stepped_params(o)}
        missing = [
            f"{info.name} (rule {b.name!r})"
            for b in self._bindings
            if b.rule.mode != "loss"
            for info in b.infos
            if info.param.requires_grad and id(info.param) not in owned
        ]
        if missing:
            raise ValueError(
                "attach(): these selected trainable parameters belong to none of the given "
                "optimizers, so their rules would never apply: "
                + ", ".join(missing)
                + ". Pass every optimizer to attach(), or narrow the rule with on="
            )

    def _check_optimizer(self, att: Attachment, others: list[Attachment]) -> None:
        """What must hold for ``att``'s optimizer before any hook is registered."""
        opt = att.opt
        if isinstance(opt, torch.optim.LBFGS):
            bad = [b.name for b in self._bindings if b.rule.mode in ("decoupled", "prox", "constraint")]
            if bad:
                raise ValueError(
                    f"rules {bad} use mode decoupled/prox/constraint, which is not defined for "
                    f"{type(opt).__name__} (it evaluates the closure several times per step); "
                    "use mode='grad' or mode='loss'"
                )
        adaptive = sorted(
            {bk.binding.name for bk in att.buckets["prox"] if getattr(bk.binding.rule, "metric", "") == "adaptive"}
        )
        if adaptive:
            check_supported(opt, adaptive)
        no_lr = sorted(
            {
                f"{bk.binding.name!r} (param group {bk.group_index})"
                for mode in ("decoupled", "prox")
                for bk in att.buckets[mode]
                if bk.binding.rule.lr_coupling != "none" and "lr" not in bk.group
            }
        )
        if no_lr:
            raise ValueError(
                f"attach(): {type(opt).__name__} has param groups without an 'lr', which the "
                f"lr-coupled rules {', '.join(no_lr)} need; use lr_coupling='none' for them"
            )
        mine = att.params()
        for a in others:  # an optimizer swap without detach() would keep the old one counting
            shared = mine & a.params()
            if shared:
                raise ValueError(
                    f"attach(): this regularizer is already attached to a {type(a.opt).__name__} "
                    f"that steps some of the same parameters ({self._names_of(shared)}). To "
                    "switch optimizers, reg.detach() first (step counts then start anew for the "
                    "new one; name them with attach(..., names=) to resume each its own)"
                )
        for other in list(_ATTACHED.get(opt, ())):
            if other is self:
                continue
            theirs = [a for a in other._live_attachments() if a.opt is opt]
            if not theirs:
                continue
            theirs[0].refresh()  # param groups added since it attached
            shared = mine & theirs[0].params()
            if shared:
                raise ValueError(
                    f"attach(): another Regularizer (rules {list(other.rules)}) is already "
                    f"attached to this {type(opt).__name__} and regularizes some of the same "
                    f"parameters: {self._names_of(shared)}. Both would apply in every step (e.g. "
                    "L2 twice). Put all rules in one Regularizer, or select disjoint parameters"
                )

    def _hint_metric(self, att: Attachment) -> None:
        """Euclidean prox with an adaptive optimizer: say once why zeros may come and go."""
        if not isinstance(att.opt, PRECONDITIONED):
            return
        names = sorted(
            {
                bk.binding.name
                for bk in att.buckets["prox"]
                if getattr(bk.binding.rule, "elementwise_prox", False)
                and getattr(bk.binding.rule, "metric", "") == "euclidean"
                and not getattr(bk.binding.rule, "_hinted_metric", False)
            }
        )
        if not names:
            return
        for n in names:
            self.rules[n]._hinted_metric = True
        warnings.warn(
            f"prox rules {names} use metric='euclidean' with {type(att.opt).__name__}: the prox "
            "thresholds every coordinate by lr·λ while the optimizer moves coordinate i by about "
            "lr/(√v̂ᵢ+ε), so exact zeros may appear and vanish erratically. metric='adaptive' "
            "thresholds in the optimizer's own metric (re-tune λ when switching: the same λ gives "
            "far more zeros there). See the README FAQ",
            UserWarning,
            stacklevel=3,
        )

    def _names_of(self, ids: set[int], limit: int = 8) -> str:
        names = [i.name for i in self._index.params if id(i.param) in ids]
        return ", ".join(names[:limit]) + (" …" if len(names) > limit else "")

    def detach(self) -> None:
        """Remove every hook this regularizer registered.

        Step counts are kept: attaching the same optimizer again continues the schedules
        (``with reg.attached(opt):`` once per epoch counts every step), and until another
        optimizer is attached :meth:`state_dict` still saves them. A detached optimizer is
        held weakly: deleting it frees it and forgets its count.
        """
        for att in self._attachments:
            opt = att.opt
            att.remove()
            if opt is not None:
                self._detached[opt] = att
                regs = _ATTACHED.get(opt)
                if regs is not None:
                    regs.discard(self)
        self._last_detached = list(self._attachments)
        self._attachments = []
        self._activity_remove()

    @contextlib.contextmanager
    def attached(self, *optimizers: Any, **kwargs: Any) -> Iterator[Regularizer]:
        """``with reg.attached(opt): ...`` attaches for the block, then detaches."""
        self.attach(*optimizers, **kwargs)
        try:
            yield self
        finally:
            self.detach()

    def _live_attachments(self) -> list[Attachment]:
        """Attachments whose optimizer is alive. One whose optimizer was deleted keeps its
        count (``step``, :meth:`state_dict`) until the next :meth:`attach` drops it."""
        return [a for a in self._attachments if a.opt is not None]

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [a.opt for a in self._live_attachments()]

    # ------------------------------------------------------------------ manual use
    def apply_grad(self) -> None:
        """Manual use: g ← g + ∇R(θ) for every grad-mode rule (parameters with a gradient)."""
        self._sync()
        for att in self._manual_targets():
            att.grad_phase(att.validate(modes=("grad",)))

    def apply_decoupled(self, lr: float | Tensor | None = None) -> None:
        """Manual use: θ ← θ − c·∇R(θ) for every decoupled rule, on every selected parameter
        (with or without a gradient); ``lr`` defaults to each group's."""
        self._sync()
        cautious = [b.name for b in self._bindings if getattr(b.rule, "cautious", False)]
        if cautious:
            raise ValueError(
                f"apply_decoupled(): rules {cautious} are cautious=True: they decay by the sign of "
                "the optimizer's update, which only an optimizer step makes (attach the optimizer)"
            )
        for att in self._manual_targets():
            att.decoupled_phase(att.validate(lr, modes=("decoupled",)), live=False)

    def apply_prox(self, lr: float | Tensor | None = None) -> None:
        """Manual use: θ ← prox_{c·R}(θ) for every prox rule, then the constraints, on every
        selected parameter (with or without a gradient); ``lr`` defaults to each group's."""
        self._sync()
        for att in self._manual_targets():
            plan = att.validate(lr, modes=("prox",))
            att.prox_phase(plan, live=False)
            att.constraint_phase(plan, live=False)

    def advance(self) -> None:
        """Manual use: count one step (schedules use the step count). Hooks advance by themselves."""
        for att in self._manual_targets():
            att.steps += 1
        self._activity_clear()

    def _manual_targets(self) -> list[Attachment]:
        return self._live_attachments() or [self._manual]

    # ------------------------------------------------------------------ values
    @property
    def step(self) -> int:
        """Applied steps so far: of the first attached optimizer (after ``detach()``, of the
        first one detached; an optimizer that was deleted counts until the next ``attach``);
        the manual count when none was ever attached."""
        atts = self._attachments or self._last_detached or [self._manual]
        return atts[0].step_count()

    def penalty(self) -> Tensor:
        """Differentiable Σ R(θ) over the ``mode="loss"`` rules only: add it to the loss.

        With FSDP2 (DTensor parameters) it is the unsharded value, the same on every rank: a
        collective, call it on every rank (also for :meth:`value` and :meth:`stats`)."""
        self._sync()
        step = self.step
        vals = [
            binding_value(b, b.rule.strength_at(step, b.name))
            for b in self._bindings
            if b.rule.mode == "loss" and isinstance(b.rule, Penalty)
        ]
        vals += [v for h in self._activity for v in h.pop_pending()]
        return sum_values(vals, self._default_device())

    def value(self) -> Tensor:
        """Detached Σ R(θ) over every penalty rule, whatever its mode (for reporting)."""
        self._sync()
        step = self.step
        with torch.no_grad(), _dist.zero3_gathered(self._bound_params()):  # DeepSpeed ZeRO-3
            vals = [
                binding_value(b, b.rule.strength_at(step, b.name))
                for b in self._bindings
                if isinstance(b.rule, Penalty)
            ]
        vals += [v for h in self._activity for v in h.last.values()]
        return sum_values(vals, self._default_device())

    def stats(self) -> dict[str, float]:
        """Floats for a logger: ``<rule>/value``, ``<rule>/sparsity`` (fraction of exact zeros),
        ``<rule>/zero_groups`` (group rules) — one device sync for all of them."""
        self._sync()
        with _dist.zero3_gathered(self._bound_params()):  # DeepSpeed ZeRO-3: full weights
            return stats(self._bindings, self.step, self._activity)

    def _bound_params(self) -> list[Tensor]:
        return [p for b in self._bindings for p in b.params]

    def _default_device(self) -> torch.device:
        for info in self._index.params:
            return info.param.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ activity rules
    # Activity rules select modules, not parameters: a binding without parameters plus
    # forward hooks (see ``activity.py``), registered at construction, removed by detach(),
    # registered again by attach(). Loss-mode terms are consumed by penalty() and dropped
    # after every optimizer step / advance().
    def _bind_activity(self, b: _binding.Binding) -> None:
        mods = b.rule.on.modules(self.model)
        if not mods and not self._allow_empty:
            raise ValueError(
                f"rule {b.name!r} ({type(b.rule).__name__}, on={b.rule.on!r}) selects no module of "
                f"{type(self.model).__name__}; check on=, or pass allow_empty=True"
            )
        hooks = ActivityHooks(
            b.rule, b.name, mods, lambda: self.step, scale_fn=self._grad_scale, root=self.model
        )
        hooks.register()
        self._activity.append(hooks)

    def _grad_scale(self) -> Any:
        """The current scale of the attached GradScaler (a device tensor), or None."""
        s = self._scaler
        if s is None or not s.is_enabled():
            return None
        return getattr(s, "_scale", None)

    def _activity_register(self) -> None:
        for h in self._activity:
            h.register()

    def _activity_remove(self) -> None:
        for h in self._activity:
            h.remove()

    def _activity_clear(self) -> None:
        for h in self._activity:
            h.pending.clear()

    # ------------------------------------------------------------------ inspection
    @property
    def rules(self) -> dict[str, Rule]:
        """Rule name -> rule, in declaration order."""
        return {b.name: b.rule for b in self._bindings}

    def summary(self, as_dict: bool = False) -> str | dict[str, Any]:
        """Which parameter gets what: a text table (or a dict with ``as_dict=True``).

        Dict form: ``{"params": [{"name", "aliases", "shape", "numel", "rules": [{"rule",
        "mode", "strength"}], "lr"}], "unselected": [names], "rules": {rule: {"params",
        "numel", "mode"}}}``.
        """
        self._sync()
        d = summary_dict(self._bindings, self._index, self.step, self._optimizers())
        return d if as_dict else format_summary(d, type(self.model).__name__)

    def __repr__(self) -> str:
        inner = ", ".join(f"{b.name}={b.rule!r}" for b in self._bindings)
        return f"Regularizer({inner})"

    # ------------------------------------------------------------------ state
    def set_strength(self, rule: str, value: Any) -> None:
        """Change a rule's strength (a float or a schedule ``f(step)``) from the next step on.

        Shows in :meth:`summary` and is kept by :meth:`state_dict`. A schedule sees the
        global step count (applied steps since the start), not steps since this call.
        """
        b = next((b for b in self._bindings if b.name == rule), None)
        if b is None:
            raise ValueError(f"set_strength(): no rule named {rule!r}; rules are {[b.name for b in self._bindings]}")
        if b.rule.mode == "constraint":
            raise ValueError(f"set_strength(): rule {rule!r} is a {type(b.rule).__name__} constraint and has no strength")
        b.rule.strength = value

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue bit-identically.

        ``optimizers``: per attached optimizer, in attach order (between ``with
        reg.attached(opt):`` blocks: the optimizers of the last detach), the applied step
        count, the lr reference of each param group (for ``lr_coupling="lr_ratio"``) and the
        ``name`` given to :meth:`attach`; then saved entries no optimizer took yet.
        ``manual_steps``; ``strengths``: each rule's strength (a float, a ``tr.schedules``
        config, a stateful callable's ``state_dict()``, or None for a plain callable);
        ``rules``: each rule's own state (e.g. L2-SP references); ``kinds``: each rule's class.
        """
        from .schedules import strength_state

        atts = self._attachments or [a for a in self._last_detached if a.opt is not None]
        opts = [
            {
                "steps": a.step_count(),
                "initial_lr": {
                    gi: (v.detach().clone() if isinstance(v, Tensor) else v) for gi, v in a.ref_lr.items()
                },
                "name": a.name,
            }
            for a in atts
        ]
        return {
            "version": _st.VERSION,
            "optimizers": opts + [dict(e) for e in self._pending],
            "manual_steps": self._manual.steps,
            "strengths": {
                b.name: strength_state(b.rule.strength) for b in self._bindings if b.rule.mode != "constraint"
            },
            "rules": {b.name: b.rule.rule_state_dict() for b in self._bindings},
            "kinds": {b.name: type(b.rule).__name__ for b in self._bindings},
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` saved. Everything is validated before anything
        changes (``ValueError`` naming the bad entry).

        Optimizer entries go to the attached optimizers: by ``name`` where one was given,
        else by position among the attached unnamed ones; entries for optimizers not attached
        yet are applied when they are (so loading before ``attach`` works, as in Lightning,
        which restores callbacks before it builds the optimizers). With ``strict``, rule
        names must match this regularizer's. A rule's state saved by another rule type
        under the same name raises.
        """
        from .schedules import load_strength_state

        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict() expects a dict, got {type(state).__name__}")
        _st.check_version(state)
        unknown = sorted(set(state) - _st.KEYS)
        if unknown:
            raise ValueError(f"load_state_dict(): unknown key(s) {unknown}; known: {sorted(_st.KEYS)}")
        rules_state = state.get("rules", {})
        strengths = state.get("strengths", {})
        kinds = state.get("kinds", {})
        if not isinstance(rules_state, dict) or not isinstance(strengths, dict) or not isinstance(kinds, dict):
            raise ValueError("load_state_dict(): 'rules', 'strengths' and 'kinds' must be dicts")
        names = [b.name for b in self._bindings]
        if strict:
            unexpected = sorted((set(rules_state) | set(strengths)) - set(names))
            missing = [n for n in names if n not in rules_state]
            if unexpected or missing:
                raise ValueError(
                    "load_state_dict(): the saved rules do not match this regularizer's "
                    f"(missing: {missing or 'none'}, unexpected: {unexpected or 'none'}); "
                    "pass strict=False to load the matching ones"
                )
        for b in self._bindings:
            kind = kinds.get(b.name)
            if kind is not None and kind != type(b.rule).__name__:
                raise ValueError(
                    f"load_state_dict(): rule {b.name!r} was saved as a {kind} and is a "
                    f"{type(b.rule).__name__} here; rename one of them"
                )
            if b.name in rules_state:
                _st.check_rule_state(b.name, rules_state[b.name])
        if "optimizers" in state:
            raw = state["optimizers"]
            if not isinstance(raw, (list, tuple)):
                raise ValueError("load_state_dict(): 'optimizers' must be a list")
            entries = [_st.check_entry(e, f"optimizers[{i}]") for i, e in enumerate(raw)]
        else:  # first format: a list of step counts
            entries = [_st.check_entry({"steps": n}, f"steps[{i}]") for i, n in enumerate(state.get("steps", []))]
        manual = _st.check_entry({"steps": state.get("manual_steps", 0)}, "manual_steps")["steps"]
        # apply; if a rule refuses its part (e.g. an L2-SP reference of another shape), put
        # everything back as it was, so a failed load changes nothing
        saved = (
            list(self._pending),
            [(a, a.steps, a.skipped, dict(a.ref_lr)) for a in self._live_attachments()],
            self._manual.steps,
            list(self._last_detached),
            [(b.rule, b.rule.__dict__.get("_strength"), b.rule.rule_state_dict()) for b in self._bindings],
        )
        try:
            self._pending = entries
            self._last_detached = []  # the loaded entries supersede the last detach's counts
            for att in self._live_attachments():
                e = _st.take_entry(self._pending, att.name)
                if e is not None:
                    self._apply_entry(att, e)
            self._manual.steps = manual
            for b in self._bindings:
                where = "strengths"
                try:
                    if b.name in strengths and b.rule.mode != "constraint":
                        load_strength_state(b.rule, strengths[b.name])
                    where = "rules"
                    if b.name in rules_state:
                        b.rule.load_rule_state_dict(rules_state[b.name])
                except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
                    raise ValueError(f"load_state_dict(): {where}[{b.name!r}]: {e}") from e
        except BaseException:
            self._pending, atts, self._manual.steps, self._last_detached, rules = saved
            for a, steps, skipped, ref_lr in atts:
                a.steps, a.skipped, a.ref_lr = steps, skipped, ref_lr
            for rule, strength, rstate in rules:
                if strength is not None:
                    rule._strength = strength
                rule.load_rule_state_dict(rstate)
            raise

    @staticmethod
    def _apply_entry(att: Attachment, e: dict[str, Any]) -> None:
        att.steps, att.skipped = e["steps"], None
        att.ref_lr.update(e["initial_lr"])

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, model: nn.Module, config: Any, **overrides: Any) -> Regularizer:
        """Build from a config: a dict, or a ``.yaml``/``.yml``/``.json`` path (see
        ``torch_regularizers.config``). Unknown keys and bad values raise ``ValueError``
        naming the key path (``rules[1].strength``); a config never imports code."""
        from .config import from_config

        return from_config(model, config, cls=cls, **overrides)

    def to_config(self) -> dict[str, Any]:
        """Plain data (dicts, lists, numbers, strings) that :meth:`from_config` turns back into
        an equal regularizer. ``ValueError`` for what a config cannot hold (``where(...)``
        selectors, Python callables, explicit reference tensors)."""
        from .config import to_config

        return to_config(self)
