"""Seeing what a Regularizer does: ``summary()``, ``stats()`` (docs/design.md §5).

Reporting only reads: nothing here changes a parameter, a gradient or a step count.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed as _dist
from . import schedules as _sched
from ._binding import Binding
from .penalties import Penalty

__all__ = ["format_summary", "stats", "summary_dict"]


def _fmt_strength(v: float) -> str:
    return f"{v:.4g}"


def _describe_schedule(s: Any) -> str:
    """A schedule as a reader wants it: where it starts and ends, over how many steps."""
    f = _fmt_strength
    if isinstance(s, _sched.Constant):
        return f(s.value)
    if isinstance(s, _sched.LinearWarmup):
        v = _describe_schedule(s.value) if callable(s.value) else f(s.value)
        return f"linear_warmup({f(s.start)}→{v}, {s.warmup_steps} steps)"
    if isinstance(s, _sched.Cosine):
        return f"cosine({f(s.value)}→{f(s.final)}, {s.total_steps} steps)"
    if isinstance(s, _sched.Step):
        return f"step({f(s.value)}, ×{f(s.gamma)} every {s.step_size} steps)"
    if isinstance(s, _sched.MultiStep):
        ms = ", ".join(map(str, s.milestones[:4])) + (", …" if len(s.milestones) > 4 else "")
        return f"multistep({f(s.value)}, ×{f(s.gamma)} at steps {ms})"
    if isinstance(s, _sched.Schedule):
        return repr(s)
    return f"{getattr(s, '__name__', type(s).__name__)}(step)"  # any f(step) -> float


def _strength_text(strength: Any, value: Any, step: int) -> str | None:
    """What ``summary()`` prints after ``λ=``: the number, or for a schedule the schedule
    itself (a warm-up is 0 before training, which would read as "off") and, once training
    has started or when the schedule is opaque code, its value now."""
    if not callable(strength):
        return _fmt_strength(value) if isinstance(value, float) else None
    text = _describe_schedule(strength)
    if isinstance(strength, _sched.Constant) or (step == 0 and isinstance(strength, _sched.Schedule)):
        return text
    return f"{text} = {_fmt_strength(value)} at step {step}"


def _group_of(optimizers: list[torch.optim.Optimizer], p: nn.Parameter) -> dict | None:
    for opt in optimizers:
        for g in opt.param_groups:
            if any(q is p for q in g["params"]):
                return g
    return None


def _num(v: Any) -> Any:
    return float(v) if isinstance(v, Tensor) else v


def _group_lr(optimizers: list[torch.optim.Optimizer], p: nn.Parameter) -> Any:
    g = _group_of(optimizers, p)
    return None if g is None else _num(g.get("lr"))


def _timescale(rule: Any, step: int, group: dict | None) -> float | None:
    """τ (optimizer steps) of a decoupled L2-type rule for a parameter of ``group``."""
    fn = getattr(rule, "timescale_at", None)
    if fn is None:
        return None
    peak = None
    if group is not None:
        peak = _num(group.get("initial_lr") or group.get("lr"))
    return fn(step, peak)


def summary_dict(
    bindings: list[Binding], index: Any, step: int, optimizers: list[torch.optim.Optimizer]
) -> dict[str, Any]:
    """``{"params": [...], "unselected": [...], "rules": {...}}`` (see ``Regularizer.summary``)."""
    per_param: dict[int, list[dict[str, Any]]] = defaultdict(list)
    rules: dict[str, dict[str, Any]] = {}
    for b in bindings:
        strength = b.rule.strength_at(step, b.name) if isinstance(b.rule, Penalty) else b.rule.summary_strength()
        rules[b.name] = {
            "params": len(b.infos),
            "numel": sum(i.param.numel() for i in b.infos),
            "mode": b.rule.mode,
            "kind": type(b.rule).__name__,
        }
        text = _strength_text(b.rule.strength, strength, step) if isinstance(b.rule, Penalty) else None
        if text is None and isinstance(strength, float):
            text = _fmt_strength(strength)
        for info in b.infos:
            entry = {"rule": b.name, "mode": b.rule.mode, "strength": strength}
            if text is not None:
                entry["strength_text"] = text  # `strength` stays the float in effect now
            tau = _timescale(b.rule, step, _group_of(optimizers, info.param))
            if tau is not None:
                entry["timescale"] = tau
            per_param[id(info.param)].append(entry)
    params, unselected = [], []
    for info in index.params:
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
                "lr": _group_lr(optimizers, info.param),
            }
        )
    return {"params": params, "unselected": unselected, "rules": rules}


def format_summary(d: dict[str, Any], model_name: str) -> str:
    """The text table of :func:`summary_dict`."""
    rows = []
    for p in d["params"]:
        name = p["name"] + (f" (= {', '.join(p['aliases'])})" if p["aliases"] else "")
        if not p["trainable"]:
            name += " [frozen]"
        rules = "; ".join(
            f"{r['rule']}:{r['mode']}"
            + (
                f" {'cap' if r['mode'] == 'constraint' else 'λ'}="
                + (r.get("strength_text") or _fmt_strength(r["strength"]))
                if isinstance(r["strength"], float)
                else ""
            )
            + (f" τ={r['timescale']:.4g} steps" if "timescale" in r else "")
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


def stats(bindings: list[Binding], step: int, activity: list[Any]) -> dict[str, float]:
    """``<rule>/value``, ``<rule>/sparsity``, ``<rule>/zero_groups`` as floats, one host sync."""
    keys: list[str] = []
    vals: list[Tensor] = []
    with torch.no_grad():
        for b in bindings:
            if not b.infos:
                continue
            lam = b.rule.strength_at(step, b.name) if isinstance(b.rule, Penalty) else 0.0
            for k, v in b.rule.stats_tensors(b.params, lam).items():
                keys.append(f"{b.name}/{k}")
                vals.append(v.detach().to(torch.float64))
        for h in activity:
            if h.last:
                keys.append(f"{h.name}/value")
                total = None
                for v in h.last.values():
                    total = v if total is None else total + v.to(total.device)
                vals.append(total.detach().to(torch.float64))
    if not vals:
        return {}
    vals = _dist.full_values(vals)  # DTensor stats of custom rules: reduced across shards
    dev = vals[0].device
    out = torch.stack([v.to(dev) for v in vals]).tolist()  # the one host sync
    return dict(zip(keys, out))
