"""DeepSpeed ZeRO stage 1/2/3: the rules act on the fp32 master partitions (docs/design.md §7).

ZeRO's optimizer (``DeepSpeedZeroOptimizer`` for stage 1/2, ``BF16_Optimizer`` for bf16 +
stage 1, ``DeepSpeedZeroOptimizer_Stage3``) keeps, per param group (stage 3: sub-group),
one flat fp32 partition per rank — the only tensor the wrapped torch optimizer steps — cut
through the model's parameters; after the step it copies the partition into the model
weights. So the hooks go on the wrapped torch optimizer, and every phase works on
*fragments*: the piece of each selected parameter inside this rank's partition (stage 1/2:
``p._hp_mapping``; stage 3: ``grad_position``, an equal slice of every parameter per rank)
— possibly none.

* elementwise rules (L1, L2, ElasticNet, NonNeg, L2-SP with its reference sliced alike) run
  their kernels on the fragment views of the master weights and of their gradients;
* group rules (GroupLasso, SparseGroupLasso, MaxNorm, UnitNorm) compute the squared norm of
  every group from the fragments (a group may be cut between ranks), all-reduce them over
  the data-parallel group (one collective per rule and group, every rank joins — also one
  holding no fragment), and scale each fragment element by its group's factor;
* rules that need the whole tensor (Orthogonal, ``Penalty.from_fn``, …) are refused in the
  step modes (``mode="loss"`` works under stage 1/2, which keep full weights on every rank;
  stage 3 refuses ``mode="loss"``: use ``mode="grad"``).

The torch optimizer is stepped once per group; the step is counted after the last group.
``grad``-mode terms are added to the fp32 gradient partition *after* DeepSpeed's unscaling
and clipping (as torch's own ``weight_decay``); a step DeepSpeed skips (fp16 overflow) runs
no hook and is not counted.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from torch import Tensor

from . import distributed as _dist
from ._attachment import Attachment, Bucket, Plan
from ._binding import Binding

__all__ = ["ZeroAttachment"]


def _kind(rule: Any) -> str:
    """How a rule runs on fragments: "elementwise", "l2sp", "group", or "whole"."""
    from .constraints import MaxNorm, UnitNorm
    from .structured import L2SP, GroupLasso

    if isinstance(rule, L2SP):
        return "l2sp"
    if getattr(rule, "fragment_group_rule", False) or isinstance(
        rule, (GroupLasso, MaxNorm, UnitNorm)
    ):
        return "group"
    if _dist.runs_on_local_shards(rule):
        return "elementwise"
    return "whole"


def _check_full_binding(b: Binding, p: Tensor, kind: str) -> None:
    """ZeRO-3: the rule must have seen ``p`` whole (Regularizer built before
    ``deepspeed.initialize``), or its L2-SP reference / default groups are of the empty slice."""
    bad = False
    if kind == "l2sp":
        bad = b.rule._ref(p).numel() != p.ds_numel
    elif kind == "group" and getattr(b.rule, "dim", None) is None and len(p.ds_shape) != 1:
        table = b.rule.__dict__.get("_default_dims")  # default groups recorded at bind, by shape
        bad = table is not None and any(r() is p for r, _ in table._by_shape.get((0,), ()))
    if bad:
        name = next((i.name for i in b.infos if i.param is p), "?")
        raise ValueError(
            f"rule {b.name!r}: parameter {name} was bound while DeepSpeed ZeRO-3 had "
            "partitioned it away (an empty slice); build the Regularizer before "
            "deepspeed.initialize()"
        )


class _FragBucket(Bucket):
    """A rule's parameters in one ZeRO group, with this rank's fragment of each."""

    def __init__(self, binding: Binding, group: dict, gi: int, params: list, frags: list) -> None:
        super().__init__(binding, group, gi, params)
        self.frags: list[_dist.Fragment] = frags


class ZeroAttachment(Attachment):
    """An :class:`Attachment` whose hooks sit on the torch optimizer inside a DeepSpeed ZeRO
    optimizer, and whose phases act on the fp32 partition fragments."""

    def __init__(
        self,
        bindings: Callable[[], list[Binding]],
        opt: torch.optim.Optimizer,
        zero: Any,
        **kw: Any,
    ) -> None:
        _dist.check_deepspeed(zero)
        self.zero = zero
        self.stage3 = type(zero).__name__ == _dist.ZERO3
        self._left: set[int] = set()  # groups not stepped yet in the current ZeRO step
        self._stepping: set[int] | None = None  # groups of the inner step running now
        super().__init__(bindings, opt, **kw)

    # ------------------------------------------------------------------ structure
    def rebuild(self) -> None:
        zero, opt = self.zero, self.opt
        groups = _dist.zero_groups(zero)
        self.flats = _dist.zero_flats(zero)
        self._flat_index = {id(f): i for i, f in enumerate(self.flats)}
        # the torch optimizer's group dict of each ZeRO group (stage 1/2 swap param_groups
        # around each inner step: keep the dicts of the full list, matched by their flat;
        # stage 3 fills a group's params with its sub-group's flat only during its step)
        self._group_dicts: dict[int, dict] = {}
        if self.stage3:
            for sg, gid in zero.sub_group_to_group_id.items():
                self._group_dicts[sg] = opt.param_groups[gid]
        for g in opt.param_groups:
            for t in g["params"]:
                if id(t) in self._flat_index:
                    self._group_dicts[self._flat_index[id(t)]] = g
        where: dict[int, tuple[int, int]] = {}  # id(param) -> (ZeRO group, index)
        for gi, ps in enumerate(groups):
            for k, p in enumerate(ps):
                where.setdefault(id(p), (gi, k))
        buckets: dict[str, list[Bucket]] = defaultdict(list)
        for b in self._bindings():
            mode = b.rule.mode
            if mode == "loss" and self.stage3 and b.infos:
                raise ValueError(
                    f"rule {b.name!r} (mode='loss'): under DeepSpeed ZeRO-3 the parameters are "
                    "partitioned outside forward, so reg.penalty() cannot reach them; use "
                    "mode='grad' (the same gradient, added in engine.step())"
                )
            if mode == "loss" or not b.infos:
                continue
            kind = _kind(b.rule)
            if kind == "whole":
                raise ValueError(
                    f"rule {b.name!r} ({type(b.rule).__name__}, mode={mode!r}) needs each "
                    "parameter whole, but DeepSpeed ZeRO steps flat partitions cut through "
                    "them; use mode='loss' for it (ZeRO 1/2 keep full weights on every rank), "
                    "or elementwise / group rules"
                )
            for flag in ("cautious", "ema_decay"):  # need per-parameter state ZeRO does not keep
                if getattr(b.rule, flag, None) not in (None, False):
                    raise ValueError(
                        f"rule {b.name!r}: {flag}= is not supported under DeepSpeed ZeRO yet"
                    )
            if getattr(b.rule, "metric", "euclidean") == "adaptive":
                raise ValueError(
                    f"rule {b.name!r}: metric='adaptive' is not supported under DeepSpeed ZeRO "
                    "(the optimizer state lives in flat partitions); use the default metric"
                )
            split: dict[int, list] = {}
            for p in b.params:
                if id(p) not in where:
                    continue
                gi, _ = where[id(p)]
                split.setdefault(gi, []).append(p)
            for gi, ps in split.items():
                if gi not in self._group_dicts:
                    continue
                if self.stage3:
                    for p in ps:
                        _check_full_binding(b, p, kind)
                frags = [self._fragment(p, gi) for p in ps]
                buckets[mode].append(_FragBucket(b, self._group_dicts[gi], gi, ps, frags))
        self.buckets = buckets  # type: ignore[assignment]
        self.groups_sig = self._sig()
        self.note_lrs()

    def _fragment(self, p: Tensor, gi: int) -> _dist.Fragment:
        group = _dist.zero_process_group(self.zero, gi)
        if self.stage3:  # each parameter cut into equal slices, one per rank (padded)
            import torch.distributed as dist

            _, offset, size = self.zero.grad_position[self.zero.get_param_id(p)]
            start = dist.get_rank(group) * size
            numel = max(0, min(size, p.ds_numel - start))
            return _dist.Fragment(p, tuple(p.ds_shape), start, offset, numel, group)
        hp = getattr(p, "_hp_mapping", None)
        if hp is None:  # this rank's partition holds nothing of p
            return _dist.Fragment(p, tuple(p.shape), 0, 0, 0, group)
        return _dist.Fragment(
            p,
            tuple(p.shape),
            hp.lp_fragment_address.start,
            hp.hp_fragment_address.start,
            hp.hp_fragment_address.numel,
            group,
        )

    def _sig(self) -> tuple:
        return tuple(id(f) for f in self.flats)

    def refresh(self) -> None:  # ZeRO swaps param_groups around each inner step: by partitions
        if tuple(id(f) for f in _dist.zero_flats(self.zero)) != self.groups_sig:
            self.rebuild()

    def params(self) -> set[int]:
        return {id(p) for bks in self.buckets.values() for bk in bks for p in bk.params}

    # ------------------------------------------------------------------ hooks
    def _stepped(self, opt: Any) -> set[int]:
        return {
            self._flat_index[id(t)]
            for g in opt.param_groups
            for t in g["params"]
            if id(t) in self._flat_index
        }

    def _pre_hook(self, opt, args, kwargs):
        self.refresh()
        stepped = self._stepped(opt)
        if not self._left:  # the first inner step of a ZeRO step
            self.plan = self.validate()
            self._left = set(range(len(self.flats)))
        self._stepping = stepped
        try:
            self.before_update(self.plan)
        finally:
            self._stepping = None
        return None

    def _post_hook(self, opt, args, kwargs):
        plan = self.plan
        if plan is None:
            return
        stepped = self._stepped(opt)
        self._stepping = stepped
        try:
            self.after_update(plan)
        finally:
            self._stepping = None
        self._left -= stepped
        if not self._left:
            self.count(None)
            self.plan = None
            self.on_step_end()

    def remove(self) -> None:
        super().remove()
        self._left = set()

    # ------------------------------------------------------------------ phases
    def before_update(self, plan: Plan, *, retry: bool = False) -> None:
        self.grad_phase(plan)
        self.decoupled_phase(plan)

    def after_update(self, plan: Plan) -> None:
        self.prox_phase(plan)
        self.constraint_phase(plan)

    def _mine(self, mode: str) -> list[_FragBucket]:
        if self._stepping is None:
            raise ValueError(
                "with DeepSpeed ZeRO the rules act on the fp32 master partitions inside "
                "engine.step(); reg.apply_grad()/apply_decoupled()/apply_prox() are not "
                "available (the model weights would not be refreshed)"
            )
        return [bk for bk in self.buckets[mode] if bk.group_index in self._stepping]  # type: ignore[misc]

    def _views(self, bk: _FragBucket, grads: bool = False) -> list[Tensor] | None:
        flat = self.flats[bk.group_index]
        src = flat.grad if grads else flat.data
        if src is None:
            return None
        return [src.narrow(0, f.offset, f.numel) for f in bk.frags]

    def grad_phase(self, plan: Plan, *, retry: bool = False) -> None:
        with torch.no_grad():
            for bk in self._mine("grad"):
                lam = plan.lam[bk.binding.name]
                gs = self._views(bk, grads=True)
                if lam == 0 or gs is None:
                    continue
                ps = self._views(bk)
                scale = -1.0 if bk.group.get("maximize", False) else 1.0
                self._apply(bk, "grad", ps, lam, scale, gs)

    def decoupled_phase(self, plan: Plan, *, retry: bool = False, live: bool = True) -> None:
        with torch.no_grad():
            for bk in self._mine("decoupled"):
                lam = plan.lam[bk.binding.name]
                if lam != 0:
                    self._apply(bk, "decay", self._views(bk), lam, plan.eta[id(bk)])

    def prox_phase(self, plan: Plan, *, live: bool = True) -> None:
        with torch.no_grad():
            for bk in self._mine("prox"):
                lam = plan.lam[bk.binding.name]
                if lam != 0:
                    self._apply(bk, "prox", self._views(bk), lam, plan.eta[id(bk)])

    def constraint_phase(self, plan: Plan, *, live: bool = True) -> None:
        with torch.no_grad():
            for bk in self._mine("constraint"):
                ps = self._views(bk)
                with _dist.fragment_views(ps, bk.frags):
                    bk.binding.rule.project_(ps, impl="foreach")

    def _apply(
        self, bk: _FragBucket, op: str, ps: list, lam: float, coef: Any, gs: list | None = None
    ) -> None:
        """One rule on the fragment views: its multi-tensor kernels (always the foreach path:
        the per-tensor reference math would need whole tensors)."""
        rule = bk.binding.rule
        coef = float(coef)
        if _kind(rule) == "l2sp":
            refs = [
                rule._ref(f.param).reshape(-1).narrow(0, f.start, f.numel).to(p.dtype)
                for p, f in zip(ps, bk.frags)
            ]
            for p, r, i in zip(ps, refs, range(len(ps))):
                if op == "grad":
                    gs[i].add_(p - r, alpha=lam * coef)  # type: ignore[index]
                elif op == "decay":
                    p.sub_(p - r, alpha=coef * lam)
                else:
                    p.sub_(r).div_(1 + coef * lam).add_(r)
            return
        with _dist.fragment_views(ps, bk.frags):
            if op == "grad":
                rule.grad_(ps, gs, lam, coef, impl="foreach")
            elif op == "decay":
                rule.decay_(ps, lam, coef, impl="foreach")
            else:
                rule.prox_(ps, lam, coef, impl="foreach")
