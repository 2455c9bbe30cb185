"""The Regularizer: rules bound to a model's parameters, applied by optimizer hooks.

Modes (DESIGN §3)::

    mode          when                         what
    "grad"        in optimizer.step(), before  g ← g + ∇R(θ)           (= R added to the loss)
    "decoupled"   in optimizer.step(), before  θ ← θ − η·∇R(θ)         (AdamW-style, any optimizer)
    "prox"        in optimizer.step(), after   θ ← prox_{η·R}(θ)       (proximal gradient: exact zeros)
    "loss"        never automatically          reg.penalty() returns Σ R(θ), differentiable

η is the parameter's param-group ``lr`` (``lr_coupling="lr"``), ``lr / initial_lr``
(``"lr_ratio"``) or 1 (``"none"``). Constraints are projections after the update,
after any prox.

Everything that can be decided once is decided at ``attach``: each rule's
parameters are split by optimizer, param group, device and dtype into *buckets*;
a step only filters out parameters without a gradient and calls one multi-tensor
kernel per bucket.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed as _dist
from . import select as _select
from ._metric import adaptive_step, check_supported
from ._precision import LOW_PRECISION, stochastic_round_
from ._rule import Rule
from .activity import ActivityHooks, ActivityPenalty
from .penalties import Penalty
from .weight_decay import check_double_decay

__all__ = ["Regularizer"]

IMPLS = ("auto", "reference", "foreach")


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
        opt, seen = inner, seen + 1
    return opt


@dataclass
class _Binding:
    """A rule bound to a model: its unique name and its selected parameters."""

    rule: Rule
    name: str
    infos: list[_select.ParamInfo]

    @property
    def params(self) -> list[nn.Parameter]:
        return [i.param for i in self.infos]


@dataclass
class _Bucket:
    """Parameters of one rule in one param group with one device and dtype."""

    binding: _Binding
    group: dict | None  # the optimizer's param group (None for manual use without optimizer)
    group_index: int
    params: list[nn.Parameter]
    #: DTensor (FSDP2) parameters of an elementwise rule: kernels run on the local shards
    local: bool = False

    def live(self) -> tuple[list[Tensor], list[Tensor]]:
        """Parameters that take part in this step (trainable, with a gradient), and grads."""
        ps, gs = [], []
        for p in self.params:
            g = p.grad
            if g is not None and p.requires_grad:
                ps.append(p)
                gs.append(g)
        return ps, gs


@dataclass
class _OptState:
    """Per-optimizer bookkeeping: hooks, buckets by mode, applied step count."""

    opt: torch.optim.Optimizer | None
    buckets: dict[str, list[_Bucket]] = field(default_factory=lambda: defaultdict(list))
    steps: int = 0
    skipped: Tensor | None = None  # device-side count of found_inf steps not synced yet
    initial_lr: dict[int, Any] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)
    multi_eval: bool = False  # closure evaluated several times per step (LBFGS)
    attached: bool = True  # detach() keeps the state (step counts) for a later attach
    groups_sig: tuple = ()  # the optimizer's param groups when the buckets were built

    def step_count(self) -> int:
        if self.skipped is not None:
            self.steps -= int(self.skipped.item())
            self.skipped = None
        return self.steps


def _groups_sig(opt: torch.optim.Optimizer) -> tuple:
    """Identity of an optimizer's param groups and their sizes (changes on add_param_group
    and load_state_dict)."""
    return tuple((id(g), len(g["params"])) for g in opt.param_groups)


def _sum(vals: list[Tensor], device: torch.device | None = None) -> Tensor:
    """Sum of 0-d tensors (moved to the first one's device); 0 when empty."""
    if not vals:
        return torch.zeros((), device=device)
    total = vals[0]
    for v in vals[1:]:
        total = total + v.to(total.device)
    return total


def _fmt_strength(v: float) -> str:
    return f"{v:.4g}"


class Regularizer:
    """Regularization rules bound to a model's parameters.

    Example::

        reg = tr.Regularizer(model, [
            tr.L2(1e-4, mode="decoupled"),                       # on tr.select.weights
            tr.L1(1e-5, on=tr.select.name("head.*"), mode="prox"),
        ])
        reg.attach(optimizer)       # every optimizer.step() now applies it
        print(reg.summary())

    Args:
        model: the model (wrappers such as DDP or ``torch.compile`` are looked through).
        rules: penalties and constraints. Each selects its parameters with ``on=``.
        allow_empty: do not raise when a rule's selector matches no parameter.
        impl: ``"auto"`` (fastest known), ``"foreach"`` (``torch._foreach_*`` multi-tensor
            kernels) or ``"reference"`` (plain per-tensor loop, for checking).

    Raises:
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
        if isinstance(rules, Rule):
            rules = [rules]
        rules = list(rules)
        for i, r in enumerate(rules):
            if not isinstance(r, Rule):
                raise TypeError(
                    f"rules[{i}] must be a penalty or constraint (e.g. tr.L2(1e-4)), "
                    f"got {type(r).__name__}"
                )
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
        self.model = model
        self.impl = "foreach" if impl == "auto" else impl
        self._index = _select.index(model)
        self._bindings: list[_Binding] = []
        self._manual = _OptState(None)
        self._states: dict[int, _OptState] = {}  # id(optimizer) -> state, in attach order
        self._activity: list[ActivityHooks] = []  # forward hooks of activity rules
        used: dict[str, int] = {}
        explicit = {r.name for r in rules if r.name is not None}
        flat = _dist.fsdp1_managed(model)  # FSDP1 flat parameters: elementwise rules only
        for r in rules:
            nm = r.name
            if nm is None:
                base = r.default_name
                n = used.get(base, 0)
                nm = base if n == 0 else f"{base}_{n}"
                while nm in explicit or any(b.name == nm for b in self._bindings):
                    n += 1
                    nm = f"{base}_{n}"
                used[base] = n + 1
            elif any(b.name == nm for b in self._bindings):
                raise ValueError(f"rule name {nm!r} is used by two rules; give each a distinct name=")
            if isinstance(r, ActivityPenalty):  # selects modules, not parameters
                self._bind_activity(r, nm, allow_empty)
                continue
            hit = r.on.match(self._index)
            infos = [info for i, info in enumerate(self._index.params) if i in hit]
            if not infos and not allow_empty:
                raise ValueError(
                    f"rule {nm!r} ({type(r).__name__}, on={r.on!r}) selects no parameter of "
                    f"{type(model).__name__}; check the selector, or pass allow_empty=True"
                    + _dist.empty_selection_hint(flat)
                )
            binding = _Binding(r, nm, infos)
            _dist.check_flat_params(flat, [binding])
            r._bind([i.name for i in infos], [i.param for i in infos])
            self._bindings.append(binding)
        self._check_prox_conflicts()
        self._manual.buckets = self._make_buckets(None)

    # ------------------------------------------------------------------ construction helpers
    def _check_prox_conflicts(self) -> None:
        owners: dict[int, list[str]] = defaultdict(list)
        for b in self._bindings:
            if b.rule.mode == "prox":
                for info in b.infos:
                    owners[id(info.param)].append(b.name)
        clash = [
            f"{info.name} ({', '.join(owners[id(info.param)])})"
            for info in self._index.params
            if len(owners[id(info.param)]) > 1
        ]
        if clash:
            raise ValueError(
                "two 'prox' rules select the same parameter: "
                + "; ".join(clash)
                + ". Combine them in one penalty (tr.ElasticNet, tr.SparseGroupLasso) or use "
                "another mode for one of them"
            )

    def _make_buckets(self, opt: torch.optim.Optimizer | None) -> dict[str, list[_Bucket]]:
        owner: dict[int, int] = {}
        if opt is not None:
            for gi, g in enumerate(opt.param_groups):
                for p in g["params"]:
                    owner.setdefault(id(p), gi)
        buckets: dict[str, list[_Bucket]] = defaultdict(list)
        for b in self._bindings:
            mode = b.rule.mode
            if mode == "loss":
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
                buckets[mode].append(_Bucket(b, group, gi, ps, local=dt and on_shards))
        return buckets

    # ------------------------------------------------------------------ attach / detach
    def attach(self, *optimizers: Any) -> Regularizer:
        """Apply the rules inside every ``step()`` of these optimizers (all at once, e.g. a GAN's).

        Wrappers exposing ``.optimizer`` (accelerate, Lightning) are looked through.
        Raises ``ValueError`` if a selected trainable parameter belongs to none of the
        attached optimizers, or if decoupled/prox rules meet an optimizer that evaluates
        its closure several times per step (LBFGS).
        """
        if not optimizers:
            raise TypeError("attach() needs at least one optimizer")
        opts = [unwrap_optimizer(o) for o in optimizers]
        owned = {id(p) for o in [*opts, *self._optimizers()] for g in o.param_groups for p in g["params"]}
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
        for opt in opts:
            old = self._states.get(id(opt))
            if old is not None and old.opt is opt and old.attached:
                continue
            multi = isinstance(opt, torch.optim.LBFGS)
            if multi:
                bad = [b.name for b in self._bindings if b.rule.mode in ("decoupled", "prox") or b.rule.mode == "constraint"]
                if bad:
                    raise ValueError(
                        f"rules {bad} use mode decoupled/prox/constraint, which is not defined for "
                        f"{type(opt).__name__} (it evaluates the closure several times per step); "
                        "use mode='grad' or mode='loss'"
                    )
            st = _OptState(opt, buckets=self._make_buckets(opt), multi_eval=multi)
            adaptive = sorted(
                {bk.binding.name for bk in st.buckets["prox"] if getattr(bk.binding.rule, "metric", "") == "adaptive"}
            )
            if adaptive:
                check_supported(opt, adaptive)
            if old is not None and old.opt is opt:  # re-attach after detach(): keep counting
                st.steps, st.skipped, st.initial_lr = old.steps, old.skipped, old.initial_lr
            self._record_initial_lr(st)
            st.groups_sig = _groups_sig(opt)
            st.handles.append(opt.register_step_pre_hook(self._make_pre_hook(st)))
            st.handles.append(opt.register_step_post_hook(self._make_post_hook(st)))
            # optimizer.load_state_dict() replaces the param-group dicts: re-bucket against the
            # new ones, or lr / initial_lr / maximize would be read from stale groups
            st.handles.append(opt.register_load_state_dict_post_hook(self._make_load_hook(st)))
            self._states[id(opt)] = st
            self._load_pending_opt_state(st)
            check_double_decay(self, opt)
        self._activity_register()
        return self

    def detach(self) -> None:
        """Remove every hook this regularizer registered.

        Step counts are kept: attaching the same optimizer again continues the schedules
        (``with reg.attached(opt):`` once per epoch counts every step), and
        :meth:`state_dict` still saves them.
        """
        for st in self._states.values():
            for h in st.handles:
                h.remove()
            st.handles.clear()
            st.attached = False
        self._activity_remove()

    @staticmethod
    def _record_initial_lr(st: _OptState) -> None:
        """Remember each group's initial lr (for ``lr_coupling="lr_ratio"``) if not known yet.

        A tensor lr is cloned, as torch's LRScheduler does: it is usually changed in place.
        """
        for gi, g in enumerate(st.opt.param_groups):
            if gi not in st.initial_lr:
                v = g.get("initial_lr", g.get("lr"))
                st.initial_lr[gi] = v.detach().clone() if isinstance(v, Tensor) else v

    def _refresh(self, st: _OptState) -> None:
        """Re-bucket if the optimizer's param groups changed since the buckets were built
        (``add_param_group``, ``load_state_dict``): O(#groups) per step, no per-tensor work."""
        sig = _groups_sig(st.opt)
        if sig != st.groups_sig:
            st.buckets = self._make_buckets(st.opt)
            st.groups_sig = sig
            self._record_initial_lr(st)

    @contextlib.contextmanager
    def attached(self, *optimizers: Any) -> Iterator[Regularizer]:
        """``with reg.attached(opt): ...`` attaches for the block, then detaches."""
        self.attach(*optimizers)
        try:
            yield self
        finally:
            self.detach()

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [st.opt for st in self._states.values() if st.opt is not None and st.attached]

    # ------------------------------------------------------------------ hooks
    def _make_pre_hook(self, st: _OptState):
        def pre_hook(opt, args, kwargs):
            self._refresh(st)
            args = tuple(args)
            if "closure" in kwargs and kwargs["closure"] is not None:
                kwargs = dict(kwargs)
                kwargs["closure"] = self._wrap_closure(st, kwargs["closure"])
                return args, kwargs
            if len(args) > 1 and args[1] is not None:
                return (args[0], self._wrap_closure(st, args[1]), *args[2:]), kwargs
            self._before_update(st)
            return None

        return pre_hook

    def _make_load_hook(self, st: _OptState):
        def load_hook(opt):
            self._refresh(st)

        return load_hook

    def _make_post_hook(self, st: _OptState):
        def post_hook(opt, args, kwargs):
            self._after_update(st)
            self._activity_clear()

        return post_hook

    def _wrap_closure(self, st: _OptState, closure):
        calls = 0

        def regularized_closure():
            nonlocal calls
            loss = closure()
            calls += 1
            if calls > 1 and not st.multi_eval and (st.buckets["decoupled"]):
                raise RuntimeError(
                    f"{type(st.opt).__name__} evaluated its closure twice in one step: decoupled "
                    "rules would be applied twice; use mode='grad' or mode='loss' with it"
                )
            with torch.no_grad():
                self._before_update(st)
            if st.multi_eval and st.buckets["grad"] and loss is not None:
                loss = loss + self._mode_value(st, "grad").to(loss)
            return loss

        return regularized_closure

    # ------------------------------------------------------------------ the hot path
    def _lam(self, b: _Binding, step: int) -> float:
        return b.rule.strength_at(step, b.name)

    def _eta(self, st: _OptState, bucket: _Bucket, lr: Any, found_inf: Tensor | None) -> Any:
        coupling = bucket.binding.rule.lr_coupling
        if coupling == "none":
            eta: Any = 1.0
        else:
            if lr is None:
                if bucket.group is None:
                    raise ValueError(
                        f"rule {bucket.binding.name!r}: no optimizer is attached, pass lr= "
                        "to apply_decoupled()/apply_prox()"
                    )
                lr = bucket.group["lr"]
            if coupling == "lr_ratio":
                init = bucket.group.get("initial_lr") if bucket.group is not None else None
                if init is None:  # no LR scheduler set it: the lr seen at attach / first use
                    init = st.initial_lr.setdefault(bucket.group_index, lr)
                eta = lr / init
            else:
                eta = lr
        if found_inf is not None:
            eta = (found_inf.to(bucket.params[0].device) == 0).to(torch.float32) * eta
        return eta

    def _before_update(self, st: _OptState, lr: Any = None) -> None:
        """Grad-mode then decoupled rules, in rule order (inside step(), before the update)."""
        opt = st.opt
        found_inf = getattr(opt, "found_inf", None) if opt is not None else None
        grad_scale = getattr(opt, "grad_scale", None) if opt is not None else None
        step = self._step_for_schedules(st)
        with torch.no_grad():
            for bk in st.buckets["grad"]:
                ps, gs = bk.live()
                if not ps:
                    continue
                if bk.local:
                    ps, gs = _dist.locals_(ps), _dist.locals_(gs)
                scale: Any = -1.0 if bk.group is not None and bk.group.get("maximize", False) else 1.0
                if grad_scale is not None:
                    scale = grad_scale.to(ps[0].device) * scale
                bk.binding.rule.grad_(ps, gs, self._lam(bk.binding, step), scale, impl=self.impl)
            for bk in st.buckets["decoupled"]:
                ps, _ = bk.live()
                if ps:
                    eta = self._eta(st, bk, lr, found_inf)
                    self._update(st, bk, "decay", ps, self._lam(bk.binding, step), eta)

    def _after_update(self, st: _OptState, lr: Any = None, advance: bool = True) -> None:
        """Prox rules, then constraints (after the update); then count the step."""
        opt = st.opt
        found_inf = getattr(opt, "found_inf", None) if opt is not None else None
        step = self._step_for_schedules(st)
        with torch.no_grad():
            for bk in st.buckets["prox"]:
                ps, _ = bk.live()
                if ps:
                    eta = self._eta(st, bk, lr, found_inf)
                    self._update(st, bk, "prox", ps, self._lam(bk.binding, step), eta)
            for bk in st.buckets["constraint"]:
                ps, _ = bk.live()
                if ps:
                    if bk.local:
                        ps = _dist.locals_(ps)
                    bk.binding.rule.project_(ps, found_inf=found_inf, impl=self.impl)
        if advance:
            self._count_step(st, found_inf)

    def _update(self, st: _OptState, bk: _Bucket, op: str, ps: list, lam: float, eta: Any) -> None:
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
                if st.opt is None or bk.group is None:
                    raise ValueError(
                        f"rule {bk.binding.name!r}: metric='adaptive' needs an attached optimizer"
                    )
                step_p = adaptive_step(st.opt, bk.group, p, eta, decay_lr=rule.lr_coupling == "lr")
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

    def _step_for_schedules(self, st: _OptState) -> int:
        """The applied-step count; exact (skipped fused steps resolved) when a schedule reads it."""
        return st.step_count() if st.skipped is not None and self._has_schedule() else st.steps

    def _has_schedule(self) -> bool:
        return any(callable(b.rule.strength) for b in self._bindings if isinstance(b.rule, Penalty))

    def _count_step(self, st: _OptState, found_inf: Tensor | None) -> None:
        """Count an applied step; a step skipped by GradScaler (``found_inf``) does not count.

        Without schedules the skip is counted on device (no host sync) and resolved when
        the count is read; with a schedule the next strength needs the exact count.
        """
        if found_inf is None:
            st.steps += 1
        elif self._has_schedule():
            st.steps += 0 if bool(found_inf.item()) else 1
        else:
            inc = (found_inf != 0).to(torch.int64)
            st.skipped = inc if st.skipped is None else st.skipped + inc.to(st.skipped.device)
            st.steps += 1

    # ------------------------------------------------------------------ manual use
    def apply_grad(self) -> None:
        """Manual use: g ← g + ∇R(θ) for every grad-mode rule (without optimizer hooks)."""
        for st in self._manual_states():
            self._run_mode(st, "grad", None)

    def apply_decoupled(self, lr: float | Tensor | None = None) -> None:
        """Manual use: θ ← θ − η·∇R(θ) for every decoupled rule; ``lr`` defaults to each group's."""
        for st in self._manual_states():
            self._run_mode(st, "decoupled", lr)

    def apply_prox(self, lr: float | Tensor | None = None) -> None:
        """Manual use: θ ← prox_{η·R}(θ) for every prox rule, then constraints."""
        for st in self._manual_states():
            self._after_update(st, lr=lr, advance=False)

    def advance(self) -> None:
        """Manual use: count one step (schedules use the step count). Hooks advance by themselves."""
        for st in self._manual_states():
            st.steps += 1
        self._activity_clear()

    def _manual_states(self) -> list[_OptState]:
        return [st for st in self._states.values() if st.attached] or [self._manual]

    def _run_mode(self, st: _OptState, mode: str, lr: Any) -> None:
        keep = {m: st.buckets[m] for m in ("grad", "decoupled")}
        try:
            for m in keep:
                st.buckets[m] = keep[m] if m == mode else []
            self._before_update(st, lr=lr)
        finally:
            for m, v in keep.items():
                st.buckets[m] = v

    # ------------------------------------------------------------------ values
    @property
    def step(self) -> int:
        """Applied steps so far (of the first attached optimizer; manual count otherwise)."""
        st = next(iter(self._states.values()), self._manual)
        return st.step_count()

    def _mode_value(self, st: _OptState, mode: str) -> Tensor:
        bindings = {id(bk.binding): bk.binding for bk in st.buckets[mode]}
        return _sum([self._binding_value(b, st.steps) for b in bindings.values()])

    def _binding_value(self, b: _Binding, step: int) -> Tensor:
        lam = self._lam(b, step)
        # DTensor (FSDP2) values: reduced across shards (a collective: call on every rank)
        return _sum(_dist.full_values([b.rule.value(p, lam) for p in b.params]))

    def penalty(self) -> Tensor:
        """Differentiable Σ R(θ) over the ``mode="loss"`` rules only: add it to the loss.

        With FSDP2 (DTensor parameters) it is the unsharded value, the same on every rank: a
        collective, call it on every rank (also for :meth:`value` and :meth:`stats`)."""
        step = self.step
        vals = [
            self._binding_value(b, step)
            for b in self._bindings
            if b.rule.mode == "loss" and isinstance(b.rule, Penalty)
        ]
        vals += self._activity_pending()
        return _sum(vals, self._default_device())

    def value(self) -> Tensor:
        """Detached Σ R(θ) over every penalty rule, whatever its mode (for reporting)."""
        step = self.step
        with torch.no_grad():
            vals = [self._binding_value(b, step) for b in self._bindings if isinstance(b.rule, Penalty)]
        vals += self._activity_values()
        return _sum(vals, self._default_device())

    def stats(self) -> dict[str, float]:
        """Floats for a logger: ``<rule>/value``, ``<rule>/sparsity`` (fraction of exact zeros),
        ``<rule>/zero_groups`` (group rules) — one device sync for all of them."""
        step = self.step
        keys: list[str] = []
        vals: list[Tensor] = []
        with torch.no_grad():
            for b in self._bindings:
                if not b.infos:
                    continue
                lam = self._lam(b, step) if isinstance(b.rule, Penalty) else 0.0
                for k, v in b.rule.stats_tensors(b.params, lam).items():
                    keys.append(f"{b.name}/{k}")
                    vals.append(v.detach().to(torch.float64))
            self._activity_stats(keys, vals)
        if not vals:
            return {}
        vals = _dist.full_values(vals)  # DTensor stats of custom rules: reduced across shards
        dev = vals[0].device
        out = torch.stack([v.to(dev) for v in vals]).tolist()  # the one host sync
        return dict(zip(keys, out))

    # ------------------------------------------------------------------ activity rules (issue 4)
    # Activity rules select modules, not parameters: a binding without parameters plus
    # forward hooks (see ``activity.py``), registered at construction, removed by detach(),
    # registered again by attach(). Loss-mode terms are consumed by penalty() and dropped
    # after every optimizer step / advance().
    def _bind_activity(self, rule: ActivityPenalty, name: str, allow_empty: bool) -> None:
        mods = rule.on.modules(self.model)
        if not mods and not allow_empty:
            raise ValueError(
                f"rule {name!r} ({type(rule).__name__}, on={rule.on!r}) selects no module of "
                f"{type(self.model).__name__}; check on=, or pass allow_empty=True"
            )
        self._bindings.append(_Binding(rule, name, []))
        hooks = ActivityHooks(rule, name, mods, lambda: self.step)
        hooks.register()
        self._activity.append(hooks)

    def _activity_register(self) -> None:
        for h in self._activity:
            h.register()

    def _activity_remove(self) -> None:
        for h in self._activity:
            h.remove()

    def _activity_clear(self) -> None:
        for h in self._activity:
            h.pending.clear()

    def _activity_pending(self) -> list[Tensor]:
        return [v for h in self._activity for v in h.pop_pending()]

    def _activity_values(self) -> list[Tensor]:
        return [v for h in self._activity for v in h.last.values()]

    def _activity_stats(self, keys: list[str], vals: list[Tensor]) -> None:
        for h in self._activity:
            if h.last:
                keys.append(f"{h.name}/value")
                vals.append(_sum(list(h.last.values())).detach().to(torch.float64))

    def _default_device(self) -> torch.device:
        for info in self._index.params:
            return info.param.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ inspection
    @property
    def rules(self) -> dict[str, Rule]:
        """Rule name -> rule, in declaration order."""
        return {b.name: b.rule for b in self._bindings}

    def _group_lr(self, p: nn.Parameter) -> Any:
        for st in self._states.values():
            for g in st.opt.param_groups:
                if any(q is p for q in g["params"]):
                    lr = g.get("lr")
                    return float(lr) if isinstance(lr, Tensor) else lr
        return None

    def summary(self, as_dict: bool = False) -> str | dict[str, Any]:
        """Which parameter gets what: a text table (or a dict with ``as_dict=True``).

        Dict form: ``{"params": [{"name", "aliases", "shape", "numel", "rules": [{"rule",
        "mode", "strength"}], "lr"}], "unselected": [names], "rules": {rule: {"params",
        "numel", "mode"}}}``.
        """
        step = self.step
        per_param: dict[int, list[dict[str, Any]]] = defaultdict(list)
        rules: dict[str, dict[str, Any]] = {}
        for b in self._bindings:
            strength = self._lam(b, step) if isinstance(b.rule, Penalty) else b.rule.summary_strength()
            rules[b.name] = {
                "params": len(b.infos),
                "numel": sum(i.param.numel() for i in b.infos),
                "mode": b.rule.mode,
                "kind": type(b.rule).__name__,
            }
            for info in b.infos:
                per_param[id(info.param)].append({"rule": b.name, "mode": b.rule.mode, "strength": strength})
        params, unselected = [], []
        for info in self._index.params:
            entry = per_param.get(id(info.param))
            if not entry:
                unselected.append(info.name)
                continue
            params.append(
                {
                    "name": info.name,
                    "aliases": list(info.aliases),
                    "shape": tuple(info.param.shape),
                    "numel": info.param.numel(),
                    "trainable": info.param.requires_grad,
                    "rules": entry,
                    "lr": self._group_lr(info.param),
                }
            )
        d = {"params": params, "unselected": unselected, "rules": rules}
        if as_dict:
            return d
        return _format_summary(d, type(self.model).__name__)

    def __repr__(self) -> str:
        inner = ", ".join(f"{b.name}={b.rule!r}" for b in self._bindings)
        return f"Regularizer({inner})"

    # ------------------------------------------------------------------ state (issue 6)
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

    def _strength_rules(self) -> list[_Binding]:
        return [b for b in self._bindings if b.rule.mode != "constraint"]

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue bit-identically.

        ``optimizers``: per attached optimizer, in attach order, the applied step count and
        the initial lr of each param group (for ``lr_coupling="lr_ratio"``); ``manual_steps``;
        ``strengths``: each rule's strength (a float, a ``tr.schedules`` config, a stateful
        callable's ``state_dict()``, or None for a plain callable), so :meth:`set_strength`
        survives a restart, as ``optimizer.load_state_dict`` restores ``lr``; ``rules``: each
        rule's own state (e.g. L2-SP references).
        """
        from .schedules import strength_state

        opts = [
            {
                "steps": st.step_count(),
                "initial_lr": {
                    gi: (v.detach().clone() if isinstance(v, Tensor) else v) for gi, v in st.initial_lr.items()
                },
            }
            for st in self._states.values()
        ]
        return {
            "version": 2,
            "optimizers": opts + list(getattr(self, "_pending_opt_states", [])),
            "manual_steps": self._manual.steps,
            "strengths": {b.name: strength_state(b.rule.strength) for b in self._strength_rules()},
            "rules": {b.name: b.rule.rule_state_dict() for b in self._bindings},
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` saved.

        Step counts go to the attached optimizers in attach order; entries for optimizers not
        attached yet are applied when they are (so loading before ``attach`` works, as in
        Lightning, which restores callbacks before it builds the optimizers). With ``strict``,
        rule names must match this regularizer's (``ValueError`` otherwise).
        """
        from .schedules import load_strength_state

        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict() expects a dict, got {type(state).__name__}")
        rules_state = state.get("rules", {})
        strengths = state.get("strengths", {})
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
        if "optimizers" in state:
            entries = [dict(e) for e in state["optimizers"]]
        else:  # first format: a list of step counts
            entries = [{"steps": n} for n in state.get("steps", [])]
        attached = list(self._states.values())
        self._pending_opt_states = entries[len(attached) :]
        for st, e in zip(attached, entries):
            self._apply_opt_entry(st, e)
        self._manual.steps = int(state.get("manual_steps", 0))
        for b in self._bindings:
            if b.name in strengths and b.rule.mode != "constraint":
                load_strength_state(b.rule, strengths[b.name])
            if b.name in rules_state:
                b.rule.load_rule_state_dict(rules_state[b.name])

    @staticmethod
    def _apply_opt_entry(st: _OptState, e: dict[str, Any]) -> None:
        st.steps, st.skipped = int(e.get("steps", 0)), None
        for gi, v in e.get("initial_lr", {}).items():
            st.initial_lr[int(gi)] = v

    def _load_pending_opt_state(self, st: _OptState) -> None:
        pending = getattr(self, "_pending_opt_states", None)
        if pending:
            self._apply_opt_entry(st, pending.pop(0))

    # ------------------------------------------------------------------ config (issue 6)
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


def _format_summary(d: dict[str, Any], model_name: str) -> str:
    rows = []
    for p in d["params"]:
        name = p["name"] + (f" (= {', '.join(p['aliases'])})" if p["aliases"] else "")
        if not p["trainable"]:
            name += " [frozen]"
        rules = "; ".join(
            f"{r['rule']}:{r['mode']}"
            + (
                f" {'cap' if r['mode'] == 'constraint' else 'λ'}={_fmt_strength(r['strength'])}"
                if isinstance(r["strength"], float)
                else ""
            )
            for r in p["rules"]
        )
        lr = "-" if p["lr"] is None else _fmt_strength(float(p["lr"]))
        rows.append((name, "×".join(map(str, p["shape"])) or "scalar", f"{p['numel']:,}", rules, lr))
    head = ("parameter", "shape", "numel", "rules", "lr")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [f"Regularizer on {model_name}", line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out.append("")
    if d["unselected"]:
        out.append(f"not regularized ({len(d['unselected'])}): " + ", ".join(d["unselected"]))
    else:
        out.append("not regularized: (none)")
    out.append("")
    out.append("rules:")
    for name, r in d["rules"].items():
        out.append(f"  {name:<16} {r['kind']:<16} mode={r['mode']:<10} {r['params']:>5} tensors  {r['numel']:>12,} values")
    return "\n".join(out)
