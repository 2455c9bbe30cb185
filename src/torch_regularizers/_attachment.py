"""One optimizer attached to a Regularizer: its hooks and the step transaction.

The order of operations of one optimizer step, in one place (docs/design.md §3)::

    phase        where                           what
    validate     step pre-hook                   every strength λ_k and step size c of this step
                                                 evaluated and checked (finite, >= 0, fits the
                                                 dtype; lr >= 0): raise here, before anything moved
    grad         pre-hook (after the closure's   g ← g + s·∇R(θ)   s = ±1 (maximize) × grad_scale
                 backward when step(closure))
    decoupled    pre-hook, same place            θ ← θ − c·∇R(θ)   masked by found_inf (fused)
                                                 (cautious rules: θ is kept instead)
    update       the optimizer                   θ ← θ − η·u
    cautious     step post-hook                  θ ← θ − c·𝟙[u ⊙ ∇R(θ_before) ≥ 0] ⊙ ∇R(θ_before)
    prox         post-hook                       θ ← prox_{c·R}(θ) masked by found_inf
    constraints  post-hook, after prox           θ ← Π(θ)          masked by found_inf
    anchors      post-hook                       θ₀ ← β·θ₀ + (1 − β)·θ (L2SP reference="ema")
    count        post-hook                       k ← k + 1 unless GradScaler skipped the step

c = lr·λ (``lr_coupling="lr"``), λ·lr/lr₀ (``"lr_ratio"``, lr₀ = the scheduler's
``initial_lr``, else the first nonzero lr seen; 0 until known), λ·lr²/lr₀ (``"corrected"``,
AdamC) or λ (``"none"``); a ``timescale=T`` rule has c = (lr/lr₀)/T (squared ratio for
``"corrected"``, 1/T for ``"none"``).

In optimizer steps only trainable parameters with a gradient take part (like torch);
manual ``apply_decoupled``/``apply_prox`` take every trainable selected parameter, with or
without a gradient. A step that raises between its pre-hook and its post-hook is *open*:
when ``step()`` is called again, gradients and parameters the open step's grad/decoupled
phase already handled and that nobody touched since (same tensor, same version counter
as after that phase) are not regularized again, so a retried step gives exactly what one
step gives. A tensor lr is not checked on the host (that would sync): a negative or
non-finite one gives c = 0.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import distributed as _dist
from . import kernels as _kernels
from ._binding import Binding
from ._metric import adaptive_step
from ._precision import LOW_PRECISION, stochastic_round_

__all__ = ["STEP_ORDER", "Attachment", "Bucket", "Plan", "binding_value", "sum_values", "unwrap_optimizer"]


#: The phases of one regularized optimizer step, in order (see the module docstring).
STEP_ORDER = (
    "validate", "grad", "decoupled", "update", "cautious", "prox", "constraints", "anchors", "count",
)


def unwrap_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` behind a wrapper (accelerate, Lightning): follow ``.optimizer``."""
    seen = 0
    # accelerate's AcceleratedOptimizer *subclasses* torch.optim.Optimizer without running its
    # __init__ (no hook dicts): look through anything whose `.optimizer` is an optimizer
    while not isinstance(opt, torch.optim.Optimizer) or isinstance(
        getattr(opt, "optimizer", None), torch.optim.Optimizer
    ):
        inner = getattr(opt, "optimizer", None)
        if inner is None or seen > 8:
            raise TypeError(
                f"attach() expects torch.optim.Optimizer instances (or wrappers exposing "
                f"`.optimizer`), got {type(opt).__name__}"
            )
        _dist.note_wrapper(opt, inner)  # DeepSpeed ZeRO: steps its own flat partitions
        opt, seen = inner, seen + 1
    return opt


@dataclass
class Bucket:
    """Parameters of one rule in one param group with one device and dtype."""

    binding: Binding
    group: dict | None  # the optimizer's param group (None for manual use without optimizer)
    group_index: int
    params: list[nn.Parameter]
    #: DTensor (FSDP2) parameters of an elementwise rule: kernels run on the local shards
    local: bool = False
    #: cautious rules: persistent copies of θ before the update, and the parameters they hold
    before: dict[int, Tensor] | None = None
    kept: list[Tensor] | None = None

    def live(self) -> tuple[list[Tensor], list[Tensor]]:
        """Parameters that take part in an optimizer step (trainable, with a gradient), and grads.

        The common case (every parameter has a gradient and is trainable) is one C loop
        (:func:`~torch_regularizers.kernels.live_grads`): tens of ns per tensor per step."""
        ps = self.params
        gs = _kernels.live_grads(ps)
        if gs is not None:
            return ps, gs
        keep = [i for i, p in enumerate(ps) if p.grad is not None and p.requires_grad]
        return [ps[i] for i in keep], [ps[i].grad for i in keep]

    def trainable(self) -> list[Tensor]:
        """Manual use: every trainable parameter, with or without a gradient."""
        if _kernels.all_trainable(self.params):
            return self.params
        return [p for p in self.params if p.requires_grad]


@dataclass
class Plan:
    """What the validate phase decided for one step: λ per rule, c per bucket."""

    step: int
    lam: dict[str, float]
    eta: dict[int, Any]  # id(bucket) -> step size c/λ (before the found_inf mask)
    found_inf: Tensor | None = None
    grad_scale: Tensor | None = None


def _groups_sig(opt: torch.optim.Optimizer) -> tuple:
    """Identity of an optimizer's param groups, their params lists and sizes (changes on
    add_param_group, load_state_dict and ``group["params"] = [...]``)."""
    return tuple((id(g), id(g["params"]), len(g["params"])) for g in opt.param_groups)


def _is_zero(v: Any) -> bool:
    return bool((v == 0).all()) if isinstance(v, Tensor) else v == 0


class Attachment:
    """One optimizer (held weakly) and what the regularizer does in its steps.

    ``opt=None`` is the manual attachment (``reg.apply_*()`` without an optimizer).
    """

    def __init__(
        self,
        bindings: Callable[[], list[Binding]],
        opt: torch.optim.Optimizer | None,
        *,
        name: str | None = None,
        impl: str = "foreach",
        has_schedule: Callable[[], bool] = lambda: False,
    ) -> None:
        self._bindings = bindings
        self._opt = weakref.ref(opt) if opt is not None else None
        self.name = name
        self.impl = impl
        self._has_schedule = has_schedule
        self.buckets: dict[str, list[Bucket]] = defaultdict(list)
        self.steps = 0
        self.skipped: Tensor | None = None  # device-side count of found_inf steps not synced yet
        self.ref_lr: dict[int, Any] = {}  # lr_ratio reference lr per group (when no initial_lr)
        self.handles: list[Any] = []
        self.multi_eval = isinstance(opt, torch.optim.LBFGS)
        self.groups_sig: tuple = ()
        self.plan: Plan | None = None
        self.open = False  # a step's pre-hook ran and its post-hook did not (it raised)
        #: what the open step changed, per phase: (tensors, their versions after the phase)
        self.done: dict[str, tuple[list[Tensor], Sequence[int]]] = {}
        self.on_step_end: Callable[[], None] = lambda: None
        self.rebuild()

    # ------------------------------------------------------------------ structure
    @property
    def opt(self) -> torch.optim.Optimizer | None:
        return self._opt() if self._opt is not None else None

    def rebuild(self) -> None:
        """Split every rule's parameters by param group, device, dtype (and DTensor-ness)."""
        opt = self.opt
        owner: dict[int, int] = {}
        if opt is not None:
            for gi, g in enumerate(opt.param_groups):
                for p in g["params"]:
                    owner.setdefault(id(p), gi)
        buckets: dict[str, list[Bucket]] = defaultdict(list)
        for b in self._bindings():
            modes = [m for m in (b.rule.mode,) if m != "loss"]
            if getattr(b.rule, "ema_decay", None) is not None:
                modes.append("anchor")  # the reference follows θ, whatever the mode
            if not modes or not b.infos:
                continue
            split: dict[tuple, list[nn.Parameter]] = defaultdict(list)
            for p in b.params:
                if opt is not None and id(p) not in owner:
                    continue
                gi = owner.get(id(p), 0)
                split[(gi, p.device, p.dtype, _dist.is_dtensor(p))].append(p)
            on_shards = _dist.runs_on_local_shards(b.rule)
            for (gi, _, _, dt), ps in split.items():
                group = opt.param_groups[gi] if opt is not None else None
                for mode in modes:
                    buckets[mode].append(Bucket(b, group, gi, ps, local=dt and on_shards))
        self.buckets = buckets
        if opt is not None:
            self.groups_sig = _groups_sig(opt)
            self.note_lrs()

    def refresh(self) -> None:
        """Re-bucket if the optimizer's param groups changed (``add_param_group``,
        ``load_state_dict``): O(#groups) per step, no per-tensor work."""
        opt = self.opt
        if opt is not None and _groups_sig(opt) != self.groups_sig:
            self.rebuild()

    def params(self) -> set[int]:
        """ids of the parameters this attachment regularizes in steps (non-loss rules)."""
        return {id(p) for bks in self.buckets.values() for bk in bks for p in bk.params}

    # ------------------------------------------------------------------ hooks
    def register(self, on_step_end: Callable[[], None]) -> None:
        opt = self.opt
        self.on_step_end = on_step_end
        # the optimizer's hooks hold this attachment (and so the regularizer) strongly: a
        # regularizer attached and not stored keeps working; the attachment holds the
        # optimizer weakly, so a dropped optimizer is freed with its hooks
        self.handles.append(opt.register_step_pre_hook(self._pre_hook))
        self.handles.append(opt.register_step_post_hook(self._post_hook))
        # optimizer.load_state_dict() replaces the param-group dicts: re-bucket against the
        # new ones, or lr / initial_lr / maximize would be read from stale groups
        self.handles.append(opt.register_load_state_dict_post_hook(self._load_hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.open = False
        self.plan = None
        self._forget()

    def _pre_hook(self, opt, args, kwargs):
        self.refresh()
        retry, self.open = self.open, True
        if not retry:
            self._forget()
        args = tuple(args)
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        self.plan = self.validate()
        if closure is not None:
            wrapped = self._wrap_closure(closure, retry)
            if "closure" in kwargs:
                return args, {**kwargs, "closure": wrapped}
            return (args[0], wrapped, *args[2:]), kwargs
        self.before_update(self.plan, retry=retry)
        return None

    def _post_hook(self, opt, args, kwargs):
        plan = self.plan
        if plan is None:  # attached during this step: its pre-hook did not run
            return
        self.after_update(plan)
        self.count(plan.found_inf)
        if self.steps & (self.steps - 1) == 0:  # steps 1, 2, 4, 8, …: log2(n) syncs in all
            self._warn_zeroed_tensors()
        self.plan, self.open = None, False
        self._forget()
        self.on_step_end()

    def _load_hook(self, opt):
        self.refresh()

    def _wrap_closure(self, closure, retry: bool):
        calls = 0

        def regularized_closure():
            nonlocal calls
            loss = closure()
            calls += 1
            if calls > 1 and not self.multi_eval and self.buckets["decoupled"]:
                raise RuntimeError(
                    f"{type(self.opt).__name__} evaluated its closure twice in one step: "
                    "decoupled rules would be applied twice; use mode='grad' or mode='loss' with it"
                )
            with torch.no_grad():
                # a closure computes fresh gradients: only the first evaluation of a retried
                # step can meet gradients the failed attempt already regularized
                self.before_update(self.plan, retry=retry and calls == 1)
            if self.multi_eval and self.buckets["grad"] and loss is not None:
                loss = loss + self.mode_value("grad", self.plan.step).to(loss)
            return loss

        return regularized_closure

    # ------------------------------------------------------------------ counting
    def step_count(self) -> int:
        if self.skipped is not None:
            self.steps -= int(self.skipped.item())
            self.skipped = None
        return self.steps

    def schedule_step(self) -> int:
        """The applied-step count; exact (skipped fused steps resolved) when a schedule reads it."""
        return self.step_count() if self.skipped is not None and self._has_schedule() else self.steps

    def count(self, found_inf: Tensor | None) -> None:
        """Count an applied step; a step skipped by GradScaler (``found_inf``) does not count.

        Without schedules the skip is counted on device (no host sync) and resolved when
        the count is read; with a schedule the next strength needs the exact count.
        """
        if found_inf is None:
            self.steps += 1
        elif self._has_schedule():
            self.steps += 0 if bool(found_inf.item()) else 1
        else:
            inc = (found_inf != 0).to(torch.int64)
            self.skipped = inc if self.skipped is None else self.skipped + inc.to(self.skipped.device)
            self.steps += 1

    # ------------------------------------------------------------------ validate
    def note_lrs(self) -> None:
        """Remember each group's first nonzero lr (the ``"lr_ratio"`` reference without a
        scheduler's ``initial_lr``). A tensor lr is cloned: it is usually changed in place."""
        opt = self.opt
        if opt is None:
            return
        for gi, g in enumerate(opt.param_groups):
            v = g.get("lr")
            if v is None or (gi in self.ref_lr and not _is_zero(self.ref_lr[gi])):
                continue
            if isinstance(v, Tensor):
                if gi in self.ref_lr:  # on device, no host sync: keep the first nonzero value
                    old = self.ref_lr[gi]
                    self.ref_lr[gi] = torch.where(old == 0, v.detach().to(old), old)
                else:
                    self.ref_lr[gi] = v.detach().clone()
            elif v != 0:
                self.ref_lr[gi] = v

    def validate(self, lr: Any = None, modes: tuple[str, ...] = ("grad", "decoupled", "prox")) -> Plan:
        """Evaluate and check every strength and step size of this step before anything moves."""
        opt = self.opt
        step = self.schedule_step()
        found_inf = getattr(opt, "found_inf", None) if opt is not None else None
        grad_scale = getattr(opt, "grad_scale", None) if opt is not None else None
        plan = Plan(step, {}, {}, found_inf, grad_scale)
        self.note_lrs()
        for mode in modes:
            for bk in self.buckets[mode]:
                b = bk.binding
                if b.name not in plan.lam:
                    strength = getattr(b.rule, "step_strength", b.rule.strength_at)
                    plan.lam[b.name] = strength(step, b.name)
                lam = plan.lam[b.name]
                _check_fits(b.name, step, lam, bk.params[0].dtype, "strength")
                if mode != "grad":
                    eta = self._eta(bk, lr, step)
                    plan.eta[id(bk)] = eta
                    if not isinstance(eta, Tensor):
                        _check_fits(b.name, step, eta * lam, bk.params[0].dtype, "step size lr·λ")
        return plan

    def _eta(self, bk: Bucket, lr: Any, step: int) -> Any:
        coupling = bk.binding.rule.lr_coupling
        if coupling == "none":
            return 1.0
        if lr is None:
            if bk.group is None:
                raise ValueError(
                    f"rule {bk.binding.name!r}: no optimizer is attached, pass lr= "
                    "to apply_decoupled()/apply_prox()"
                )
            lr = bk.group["lr"]
        if isinstance(lr, Tensor):
            # checking a tensor lr would cost a host sync (and break CUDA graphs): a negative
            # or non-finite one gives c = 0 instead (nothing applied), on device
            lr = torch.where(torch.isfinite(lr) & (lr >= 0), lr, torch.zeros_like(lr))
        elif math.isnan(lr) or lr < 0:
            raise ValueError(
                f"rule {bk.binding.name!r} at step {step}: the learning rate is {lr!r}; "
                f"lr_coupling={coupling!r} needs lr >= 0 (a negative lr would move the weights "
                "away from the penalty's minimum)"
            )
        rule = bk.binding.rule
        if getattr(rule, "timescale", None) is not None:  # c = (lr/lr_peak)^k / T
            peak = self._lr_reference(bk, lr)
            if rule._lr_peak is None and peak is not None and not isinstance(peak, Tensor):
                rule._lr_peak = float(peak)  # for reporting λ = 1/(T·lr_peak)
            ratio = _ratio(lr, peak)
            return ratio * ratio if coupling == "corrected" else ratio
        if coupling == "lr":
            return lr
        if coupling == "corrected":  # AdamC: c = λ·lr²/lr_max (timm: lr ** 2 / max_lr)
            return _ratio(lr**2, self._lr_reference(bk, lr))
        return _ratio(lr, self._lr_reference(bk, lr))

    def _lr_reference(self, bk: Bucket, lr: Any) -> Any:
        """lr₀: the scheduler's ``initial_lr`` if nonzero, else the first nonzero lr seen."""
        init = bk.group.get("initial_lr") if bk.group is not None else None
        if init is not None and not (not isinstance(init, Tensor) and init == 0):
            return init
        ref = self.ref_lr.get(bk.group_index)
        if ref is None:
            if isinstance(lr, Tensor):
                ref = self.ref_lr[bk.group_index] = lr.detach().clone()
            elif lr != 0:
                ref = self.ref_lr[bk.group_index] = lr
        return ref

    # ------------------------------------------------------------------ apply
    def before_update(self, plan: Plan, *, retry: bool = False) -> None:
        """The grad, then the decoupled phase (inside step(), before the update)."""
        self.grad_phase(plan, retry=retry)
        self.decoupled_phase(plan, retry=retry)

    def after_update(self, plan: Plan) -> None:
        """The cautious, prox, constraints and anchors phases (after the update)."""
        self.cautious_phase(plan)
        self.prox_phase(plan)
        self.constraint_phase(plan)
        self.anchor_phase(plan)

    def grad_phase(self, plan: Plan, *, retry: bool = False) -> None:
        """g ← g + s·∇R(θ) for trainable parameters with a gradient."""
        skip = self._already_done("grad") if retry else set()
        touched: list[Tensor] = []
        with torch.no_grad():
            for bk in self.buckets["grad"]:
                ps, gs = bk.live()
                touched += gs
                if skip:
                    keep = [i for i, g in enumerate(gs) if id(g) not in skip]
                    ps, gs = [ps[i] for i in keep], [gs[i] for i in keep]
                lam = plan.lam[bk.binding.name]
                if not ps or lam == 0:
                    continue
                if bk.local:
                    ps, gs = _dist.locals_(ps), _dist.locals_(gs)
                scale: Any = -1.0 if bk.group is not None and bk.group.get("maximize", False) else 1.0
                if plan.grad_scale is not None:
                    scale = plan.grad_scale.to(ps[0].device) * scale
                bk.binding.rule.grad_(ps, gs, lam, scale, impl=self.impl)
        self._record("grad", touched)

    def decoupled_phase(self, plan: Plan, *, retry: bool = False, live: bool = True) -> None:
        """θ ← θ − c·∇R(θ); ``live``: only parameters taking part in an optimizer step."""
        skip = self._already_done("decoupled") if retry else set()
        touched: list[Tensor] = []
        with torch.no_grad():
            for bk in self.buckets["decoupled"]:
                ps = bk.live()[0] if live else bk.trainable()
                if getattr(bk.binding.rule, "cautious", False):
                    _keep_before(bk, ps)  # decayed after the update (the cautious phase)
                    continue
                touched += ps
                if skip:
                    ps = [p for p in ps if id(p) not in skip]
                lam = plan.lam[bk.binding.name]
                if ps and lam != 0:
                    self._update(bk, "decay", ps, lam, self._masked(plan, bk))
        if live:
            self._record("decoupled", touched)

    def cautious_phase(self, plan: Plan) -> None:
        """θ ← θ − c·𝟙[u ⊙ d ≥ 0] ⊙ d, d = ∇R(θ_before)/λ, u ∝ θ_before − θ (the update)."""
        with torch.no_grad():
            for bk in self.buckets["decoupled"]:
                if not bk.kept:
                    continue
                lam = plan.lam[bk.binding.name]
                c = self._masked(plan, bk)
                rule = bk.binding.rule
                for p in bk.kept:
                    before = bk.before[id(p)]
                    w = _dist.local(p)
                    d = rule._decay_dir(p, before)
                    keep = (before - w) * d >= 0  # the update agrees with the decay direction
                    w.sub_(d.mul_(keep.to(d.dtype)).mul_(lam).mul_(c))
                bk.kept = None

    def anchor_phase(self, plan: Plan) -> None:
        """L2SP ``reference="ema"``: θ₀ ← β·θ₀ + (1 − β)·θ, nothing for a skipped step."""
        for bk in self.buckets["anchor"]:
            ps = bk.live()[0]
            if not ps:
                continue
            w: Any = 1.0 - bk.binding.rule.ema_decay
            if plan.found_inf is not None:
                w = (plan.found_inf.to(ps[0].device) == 0).to(torch.float32) * w
            bk.binding.rule.ema_update_(ps, w)

    def _record(self, phase: str, tensors: list[Tensor]) -> None:
        """Inside an optimizer step, remember the version of every tensor a phase handled,
        after the whole phase (two rules on one tensor bump its version twice). Manual
        ``apply_*`` calls are not steps that can be retried: nothing to remember."""
        if self.open:
            self.done[phase] = (tensors, _kernels.versions(tensors))

    def _already_done(self, phase: str) -> set[int]:
        """ids of the tensors the open step's ``phase`` handled and nobody touched since."""
        tensors, then = self.done.get(phase, ([], ()))
        return {id(t) for t, v, w in zip(tensors, then, _kernels.versions(tensors)) if v == w}

    def prox_phase(self, plan: Plan, *, live: bool = True) -> None:
        """θ ← prox_{c·R}(θ)."""
        with torch.no_grad():
            for bk in self.buckets["prox"]:
                ps = bk.live()[0] if live else bk.trainable()
                lam = plan.lam[bk.binding.name]
                if ps and lam != 0:
                    self._update(bk, "prox", ps, lam, self._masked(plan, bk))

    def _warn_zeroed_tensors(self) -> None:
        """A prox rule that zeroed a whole selected tensor says so, once per rule: usually
        λ is far too large for that tensor (or it was not meant to be selected)."""
        for bk in self.buckets["prox"]:
            rule = bk.binding.rule
            if getattr(rule, "_warned_zeroed", False) or not bk.params:
                continue
            with torch.no_grad():
                flags = torch.stack([(_dist.local(p) == 0).all() for p in bk.params]).tolist()
            names = {id(i.param): i.name for i in bk.binding.infos}
            zeroed = [names.get(id(p), "?") for p, z in zip(bk.params, flags) if z]
            if zeroed:
                rule._warned_zeroed = True
                warnings.warn(
                    f"rule {bk.binding.name!r} ({type(rule).__name__}, mode='prox') has set every "
                    f"entry of {', '.join(zeroed[:8])} to exactly 0 (after {self.steps} steps): its "
                    "strength is likely far too large for them, or they were not meant to be selected",
                    UserWarning,
                    stacklevel=2,
                )

    def constraint_phase(self, plan: Plan, *, live: bool = True) -> None:
        """θ ← Π(θ) (masked by ``found_inf`` on device)."""
        with torch.no_grad():
            for bk in self.buckets["constraint"]:
                ps = bk.live()[0] if live else bk.trainable()
                if ps:
                    if bk.local:
                        ps = _dist.locals_(ps)
                    bk.binding.rule.project_(ps, found_inf=plan.found_inf, impl=self.impl)

    def _masked(self, plan: Plan, bk: Bucket) -> Any:
        eta = plan.eta[id(bk)]
        if plan.found_inf is not None:
            eta = (plan.found_inf.to(bk.params[0].device) == 0).to(torch.float32) * eta
        return eta

    def _update(self, bk: Bucket, op: str, ps: list, lam: float, eta: Any) -> None:
        """A decoupled ("decay") or prox update of one bucket.

        The fast multi-tensor kernel, unless the rule asks for the optimizer's metric
        (per-coordinate step, see ``_metric``) or stochastic rounding of bf16/fp16
        parameters (fp32 math, then unbiased rounding, see ``_precision``).
        """
        rule = bk.binding.rule
        adaptive = op == "prox" and getattr(rule, "metric", "euclidean") == "adaptive"
        sr = getattr(rule, "stochastic_rounding", False) and ps[0].dtype in LOW_PRECISION
        if not (adaptive or sr):
            if bk.local:
                ps = _dist.locals_(ps)
            (rule.decay_ if op == "decay" else rule.prox_)(ps, lam, eta, impl=self.impl)
            return
        ref = rule._ref_decay_ if op == "decay" else rule._ref_prox_
        for p in ps:
            step_p = eta
            if adaptive:
                if self.opt is None or bk.group is None:
                    raise ValueError(
                        f"rule {bk.binding.name!r}: metric='adaptive' needs an attached optimizer"
                    )
                step_p = adaptive_step(self.opt, bk.group, p, eta, decay_lr=rule.lr_coupling == "lr")
                if step_p is None:
                    continue
            if bk.local:
                p, step_p = _dist.local(p), _dist.local(step_p)
            if sr:
                w = p.float()
                ref(w, lam, step_p)
                stochastic_round_(_dist.local(p), _dist.local(w))
            else:
                ref(p, lam, step_p)

    def _forget(self) -> None:
        self.done = {}

    # ------------------------------------------------------------------ values
    def mode_value(self, mode: str, step: int) -> Tensor:
        """Σ R(θ) of the rules of ``mode`` in this attachment (LBFGS: the closure's loss)."""
        seen: dict[int, Binding] = {id(bk.binding): bk.binding for bk in self.buckets[mode]}
        return sum_values([binding_value(b, b.rule.strength_at(step, b.name)) for b in seen.values()])


def _keep_before(bk: Bucket, ps: list[Tensor]) -> None:
    """Copy θ of ``ps`` into persistent buffers (allocated once per parameter)."""
    if bk.before is None:
        bk.before = {}
    for p in ps:
        w = _dist.local(p)
        buf = bk.before.get(id(p))
        if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
            buf = bk.before[id(p)] = torch.empty_like(w)
        buf.copy_(w)
    bk.kept = list(ps)


def _ratio(num: Any, den: Any) -> Any:
    """num/den, 0 while den is unknown or 0 (never inf); on device for tensors (no sync)."""
    if den is None:
        return 0.0 * num
    if isinstance(den, Tensor) or isinstance(num, Tensor):
        den_t = den if isinstance(den, Tensor) else torch.as_tensor(den, dtype=torch.float32)
        safe = torch.where(den_t == 0, torch.ones_like(den_t), den_t)
        return torch.where(den_t == 0, torch.zeros_like(den_t), num / safe)
    return 0.0 if den == 0 else num / den


def _check_fits(rule: str, step: int, v: float, dtype: torch.dtype, what: str) -> None:
    """``v`` must be finite and >= 0 and representable in the parameters' dtype."""
    if not isinstance(v, (int, float)):
        return
    big = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    if not (0 <= v <= big):
        raise ValueError(
            f"rule {rule!r} at step {step}: {what} = {v!r} is not a finite number >= 0 that "
            f"fits {dtype} (max {big:.4g}); applying it would write non-finite values into the "
            "weights. Check the schedule and the learning rate"
        )


def binding_value(b: Binding, lam: float) -> Tensor:
    """Σ R(θ) of one rule's parameters (reduced across shards for DTensors); an exact 0 for
    λ = 0 (without evaluating R: 0·inf would be NaN)."""
    if lam == 0 or not b.infos:
        dev = b.infos[0].param.device if b.infos else None
        return torch.zeros((), device=dev)
    return sum_values(_dist.full_values([_dist.value(b.rule, p, lam) for p in b.params]))


def sum_values(vals: list[Tensor], device: torch.device | None = None) -> Tensor:
    """Sum of 0-d tensors (moved to the first one's device); 0 when empty."""
    if not vals:
        return torch.zeros((), device=device)
    total = vals[0]
    for v in vals[1:]:
        total = total + v.to(total.device)
    return total
