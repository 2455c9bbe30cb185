"""Speed benchmark (docs/design.md §8): ``python -m torch_regularizers bench`` calls :func:`main`.

Micro benchmarks: every penalty × mode on three parameter sets

* ``large``: a few large tensors (4 × 1024×4096, 16.8 M values);
* ``transformer``: a transformer-shaped set, 12 layers × {qkv 256×768, proj 256×256,
  fc1 256×1024, fc2 1024×256, their biases, 2 LayerNorms} = 144 tensors, 9.5 M values;
* ``tiny``: 2000 tensors of 1024 values;

each timed against the *floor* — one multi-tensor pass reading θ and g and writing g,
``torch._foreach_add_(grads, params, alpha=0)`` — measured in the same rounds,
interleaved (every round times each method once, in rotating order), and reported as
the median over rounds of the per-round ratio method / floor. Every method (but the loss
term, on leaf copies) works on the same tensors — the parameters (``nn.Parameter``) of one model and their gradients, the
ones the ``Regularizer`` column regularizes — under ``torch.no_grad()`` as in an
optimizer step, and every timed call is preceded by an untimed floor pass over them, so
each starts from the same cache state. Beside the library
(per kernel backend, and through the full ``Regularizer`` path) it times, in the same
rounds: the naive ``torch._foreach_*`` sequence, a per-parameter hook loop, the
hand-written loss term + ``backward()`` (grad mode) and torch's own ``weight_decay`` ops
(L2: Adam's ``_foreach_add``, AdamW's ``_foreach_mul_``).

End to end: a training step (forward, backward, ``optimizer.step()``, ``zero_grad``) on
an optimizer-bound wide MLP (3 × Linear(4096, 4096), batch 8, AdamW foreach) and a
compute-bound small transformer (4 × TransformerEncoderLayer d=256, batch 16 × 64),
without regularization and with each variant, variants interleaved round-robin on one
model and optimizer; overhead % = median over rounds of step(variant)/step(none) − 1.

On CUDA (``--device cuda``) the same micro benchmarks run on the GPU, every rule with each
kernel backend — ``library[aten]`` (the ``torch._foreach_*`` sequences) and
``library[triton]`` (one multi-tensor Triton launch per call) — against the CUDA floor in
the same rounds (synchronized around every call), and the end-to-end steps run on the GPU
with each Regularizer variant once per backend (``L1 prox [triton]``, ...).
``--backends`` picks the backends timed (default: aten, plus native when built on CPU,
plus triton when it imports on CUDA); ``--device cpu --backends aten,triton`` with
``TRITON_INTERPRET=1`` runs the CUDA code path on the CPU through Triton's interpreter (a
dry run: slow, its numbers mean nothing).

``--quick`` shrinks everything to run in seconds; ``--json`` prints machine-readable
results (the same numbers) instead of tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import kernels

__all__ = ["end_to_end", "machine_info", "main", "micro"]

SETS = ("large", "transformer", "tiny")
PENALTIES = ("l2", "l1", "elasticnet", "grouplasso", "maxnorm")
MODES = ("grad", "decoupled", "prox")
MODELS = ("mlp", "transformer")

LAM = 1e-4  # strength in the micro benchmarks (tiny: the values barely drift over rounds)
ETA = 1e-3  # step size (lr) for decoupled / prox


# --------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, core count, torch version, threads and kernel backend of this run."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": device,
        "kernels_backend": kernels.get_backend(),
        "native_kernels": kernels.native_available(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    device: str = "cpu",
    setup: dict[str, Callable[[], Any]] | None = None,
    prelude: Callable[[], Any] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``reps`` rounds; each round calls every function
    once, starting one position later than the previous round (rotation), after the
    function's ``setup`` and the common ``prelude`` (neither timed). The prelude puts every
    timed call in the same state: without it, a method that allocates and frees a lot
    (the loss-term backward) slows down whichever method follows it."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    setup = setup or {}
    for r in range(warmup + reps):
        k0 = r % len(names)
        for name in names[k0:] + names[:k0]:
            if name in setup:
                setup[name]()
            if prelude is not None:
                prelude()
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def summarize(times: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """Per method: median ms, median of per-round ratios to ``base``, and the ratio of the
    minimum times (the least disturbed rounds)."""
    b = times[base]
    out = {}
    for name, ts in times.items():
        ratios = [t / max(u, 1e-12) for t, u in zip(ts, b)]
        out[name] = {
            "ms": statistics.median(ts) * 1e3,
            "min_ms": min(ts) * 1e3,
            "ratio": statistics.median(ratios),
            "ratio_min": min(ts) / max(min(b), 1e-12),
        }
    return out


@contextlib.contextmanager
def _backend(name: str) -> Iterator[None]:
    old = kernels.get_backend()
    kernels.set_backend(name)
    try:
        yield
    finally:
        kernels.set_backend(old)


def default_backends(device: str = "cpu") -> list[str]:
    """The kernel backends worth timing on ``device``: aten always; native on CPU when it is
    built; triton on CUDA when it imports."""
    out = ["aten"]
    if device == "cpu" and kernels.native_available():
        out.append("native")
    if device.startswith("cuda") and kernels.triton_available():
        out.append("triton")
    return out


# --------------------------------------------------------------------------- parameter sets
def make_set(name: str, quick: bool = False, device: str = "cpu", dtype=torch.float32) -> list[Tensor]:
    """The tensors of a benchmark set (``SETS``), N(0, 1) values."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    if name == "large":
        n, (r, c) = (2, (512, 2048)) if quick else (4, (1024, 4096))
        return [randn(r, c) for _ in range(n)]
    if name == "transformer":
        d = 64 if quick else 256
        out: list[Tensor] = []
        for _ in range(12):
            out += [randn(d, 3 * d), randn(3 * d), randn(d, d), randn(d)]
            out += [randn(d, 4 * d), randn(4 * d), randn(4 * d, d), randn(d)]
            out += [randn(d), randn(d), randn(d), randn(d)]  # two LayerNorms
        return out
    if name == "tiny":
        return [randn(1024) for _ in range(500 if quick else 2000)]
    raise ValueError(f"unknown set {name!r}; one of {SETS}")


def _penalty(kind: str, mode: str):
    import torch_regularizers as tr

    if kind == "l2":
        return tr.L2(LAM, mode=mode)
    if kind == "l1":
        return tr.L1(LAM, mode=mode)
    if kind == "elasticnet":
        return tr.ElasticNet(LAM, 0.5, mode=mode)
    if kind == "grouplasso":
        return tr.GroupLasso(LAM, mode=mode)
    if kind == "maxnorm":
        return tr.MaxNorm(3.0)
    raise ValueError(kind)


def _applies(kind: str, mode: str) -> bool:
    if kind == "maxnorm":
        return mode == "prox"  # a constraint: reported in the prox column (a projection)
    if kind == "grouplasso":
        return mode == "prox"
    return True


class _Holder(nn.Module):
    def __init__(self, params: list[Tensor]) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(p.clone()) for p in params])


def _alternatives(kind: str, mode: str, ps: list[Tensor], gs: list[Tensor]) -> dict[str, Callable[[], Any]]:
    """The seed-style ways, on the same tensors."""
    lam, c = LAM, ETA * LAM
    a, b = LAM * 0.5, LAM * 0.5  # elastic net, l1_ratio 0.5
    fns: dict[str, Callable[[], Any]] = {}
    sign = torch.sign
    if kind == "l2":
        if mode == "grad":
            fns["naive foreach"] = lambda: torch._foreach_add_(gs, ps, alpha=lam)
            fns["hook loop"] = lambda: [g.add_(p, alpha=lam) for p, g in zip(ps, gs)]
            fns["torch weight_decay"] = lambda: torch._foreach_add(gs, ps, alpha=lam)  # Adam foreach
        elif mode == "decoupled":
            fns["naive foreach"] = lambda: torch._foreach_mul_(ps, 1 - c)
            fns["hook loop"] = lambda: [p.mul_(1 - c) for p in ps]
            fns["torch weight_decay"] = lambda: torch._foreach_mul_(ps, 1 - c)  # AdamW foreach
        else:
            fns["naive foreach"] = lambda: torch._foreach_div_(ps, 1 + c)
            fns["hook loop"] = lambda: [p.div_(1 + c) for p in ps]
    elif kind in ("l1", "elasticnet"):
        l1 = lam if kind == "l1" else a
        l2 = None if kind == "l1" else b
        if mode == "grad":

            def naive() -> None:
                torch._foreach_add_(gs, torch._foreach_sign(ps), alpha=l1)
                if l2 is not None:
                    torch._foreach_add_(gs, ps, alpha=l2)

            def hook() -> None:
                for p, g in zip(ps, gs):
                    g.add_(sign(p), alpha=l1)
                    if l2 is not None:
                        g.add_(p, alpha=l2)

        elif mode == "decoupled":

            def naive() -> None:
                s = torch._foreach_sign(ps)
                if l2 is not None:
                    torch._foreach_mul_(ps, 1 - ETA * l2)
                torch._foreach_add_(ps, s, alpha=-ETA * l1)

            def hook() -> None:
                for p in ps:
                    s = sign(p)
                    if l2 is not None:
                        p.mul_(1 - ETA * l2)
                    p.add_(s, alpha=-ETA * l1)

        else:
            t = ETA * l1
            d = 1.0 if l2 is None else 1 + ETA * l2

            def naive() -> None:
                clipped = torch._foreach_clamp_max(ps, t)
                torch._foreach_clamp_min_(clipped, -t)
                torch._foreach_sub_(ps, clipped)
                if l2 is not None:
                    torch._foreach_div_(ps, d)

            def hook() -> None:  # the textbook soft-threshold
                for p in ps:
                    z = sign(p) * torch.clamp(p.abs() - t, min=0)
                    p.copy_(z if l2 is None else z / d)

        fns["naive foreach"] = naive
        fns["hook loop"] = hook
    elif kind == "grouplasso":

        def hook() -> None:  # block soft-threshold per output unit
            for p in ps:
                if p.ndim < 2:
                    n = torch.linalg.vector_norm(p)
                    size = p.numel()
                else:
                    n = torch.linalg.vector_norm(p, dim=tuple(range(1, p.ndim)), keepdim=True)
                    size = p[0].numel()
                p.mul_(torch.clamp(1 - c * math.sqrt(size) / n, min=0))

        fns["hook loop"] = hook
    elif kind == "maxnorm":

        def hook() -> None:
            for p in ps:
                dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
                n = torch.linalg.vector_norm(p, dim=dims, keepdim=True)
                p.mul_(torch.clamp(3.0 / n, max=1.0))

        fns["hook loop"] = hook
    return fns


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


def _loss_backward(kind: str, params: list[Tensor]) -> Callable[[], Any]:
    """The hand-written loss term on leaf copies of the parameters, plus ``backward()``
    (which accumulates into their existing ``.grad``)."""
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    for p in leaves:
        p.grad = torch.randn_like(p)
    lam = LAM

    def run() -> None:
        if kind == "l2":
            loss = 0.5 * lam * sum(p.pow(2).sum() for p in leaves)
        elif kind == "l1":
            loss = lam * sum(p.abs().sum() for p in leaves)
        else:
            loss = 0.5 * lam * sum(p.abs().sum() for p in leaves) + 0.25 * lam * sum(
                p.pow(2).sum() for p in leaves
            )
        loss.backward()

    return run


def micro(
    sets: Sequence[str] = SETS,
    penalties: Sequence[str] = PENALTIES,
    modes: Sequence[str] = MODES,
    reps: int = 30,
    quick: bool = False,
    device: str = "cpu",
    backends: Sequence[str] | None = None,
    alternatives: bool = True,
    backend: str = "auto",
    log: Callable[[str], Any] | None = None,
) -> list[dict[str, Any]]:
    """Time every penalty × mode on each set against the floor; one dict per case.

    ``backends``: the kernel backends timed as ``library[<backend>]`` (default:
    :func:`default_backends`); ``backend``: the one the ``Regularizer`` column uses.
    """
    import torch_regularizers as tr

    if backends is None:
        backends = default_backends(device)
    results = []
    for set_name in sets:
        base = make_set(set_name, quick, device)
        numel = sum(p.numel() for p in base)
        for kind in penalties:
            if kind in ("grouplasso", "maxnorm") and not hasattr(tr, "GroupLasso" if kind == "grouplasso" else "MaxNorm"):
                continue
            for mode in modes:
                if not _applies(kind, mode):
                    continue
                # every method on the same tensors, the ones the Regularizer regularizes: a
                # model's parameters (nn.Parameter) and their gradients (so the floor, the
                # kernels and the Regularizer meet the same caches)
                holder = _Holder(base).to(device)
                for p in holder.ps:
                    p.grad = torch.randn_like(p)
                ps = list(holder.ps)
                gs = [p.grad for p in ps]
                pen = _penalty(kind, mode)
                fns: dict[str, Callable[[], Any]] = {"floor": lambda ps=ps, gs=gs: torch._foreach_add_(gs, ps, alpha=0)}
                setup: dict[str, Callable[[], Any]] = {}

                def lib(pen=pen, kind=kind, mode=mode, ps=ps, gs=gs) -> Callable[[], Any]:
                    if kind == "maxnorm":
                        return lambda: pen.project_(ps)
                    if mode == "grad":
                        return lambda: pen.grad_(ps, gs, LAM, 1.0)
                    if mode == "decoupled":
                        return lambda: pen.decay_(ps, LAM, ETA)
                    return lambda: pen.prox_(ps, LAM, ETA)

                for be in backends:
                    fns[f"library[{be}]"] = lib()
                    setup[f"library[{be}]"] = lambda be=be: kernels.set_backend(be)
                # the whole Regularizer path (bucket filtering + dispatch), default backend
                rule = tr.MaxNorm(3.0, on=tr.select.all) if kind == "maxnorm" else type(pen)(
                    *( (LAM, 0.5) if kind == "elasticnet" else (LAM,) ), on=tr.select.all, mode=mode
                )
                reg = tr.Regularizer(holder, [rule])
                if kind == "maxnorm" or mode == "prox":
                    apply = lambda reg=reg: reg.apply_prox(lr=ETA)  # noqa: E731
                elif mode == "decoupled":
                    apply = lambda reg=reg: reg.apply_decoupled(lr=ETA)  # noqa: E731
                else:
                    apply = reg.apply_grad
                # "Regularizer": with ``backend``; "Regularizer[aten]": the same path with the
                # stock kernels (what a user gets without the native build / without triton)
                for col, be in [("Regularizer", backend)] + (
                    [("Regularizer[aten]", "aten")] if backend != "aten" and "aten" in backends and len(backends) > 1 else []
                ):
                    fns[col] = apply
                    setup[col] = lambda be=be: kernels.set_backend(be)
                if alternatives:
                    fns.update(_alternatives(kind, mode, ps, gs))
                    if mode == "grad" and kind in ("l2", "l1", "elasticnet"):
                        fns["loss+backward"] = _loss_backward(kind, base)
                # under no_grad, as in an optimizer step (ops on parameters that require grad
                # take autograd's slow path otherwise); the loss term needs autograd
                fns = {k: f if k == "loss+backward" else _no_grad(f) for k, f in fns.items()}
                old = kernels.get_backend()
                try:
                    times = interleaved(fns, reps, warmup=1, device=device, setup=setup, prelude=fns["floor"])
                finally:
                    kernels.set_backend(old)
                summ = summarize(times, "floor")
                row = {
                    "set": set_name,
                    "tensors": len(base),
                    "numel": numel,
                    "penalty": kind,
                    "mode": "constraint" if kind == "maxnorm" else mode,
                    "floor_ms": summ["floor"]["ms"],
                    "methods": {k: v for k, v in summ.items() if k != "floor"},
                }
                results.append(row)
                if log is not None:
                    best = min(v["ratio"] for k, v in row["methods"].items() if k.startswith("library"))
                    log(f"  {set_name:<11} {kind:<10} {row['mode']:<10} floor {row['floor_ms']:8.3f} ms  library {best:5.2f}x")
                del holder, reg, ps, gs
    return results


# --------------------------------------------------------------------------- end to end
def _mlp(quick: bool, device: str = "cpu") -> tuple[nn.Module, Callable[[], Tensor]]:
    width = 1024 if quick else 4096
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    model.to(device)
    x = torch.randn(8, width, generator=g).to(device)
    y = torch.randn(8, width, generator=g).to(device)

    def loss() -> Tensor:
        return nn.functional.mse_loss(model(x), y)

    return model, loss


def _transformer(quick: bool, device: str = "cpu") -> tuple[nn.Module, Callable[[], Tensor]]:
    d, layers, batch, seq = (128, 2, 8, 32) if quick else (256, 4, 16, 64)
    g = torch.Generator().manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).to(device)
    x = torch.randn(batch, seq, d, generator=g).to(device)
    y = torch.randn(batch, seq, d, generator=g).to(device)

    def loss() -> Tensor:
        return nn.functional.mse_loss(model(x), y)

    return model, loss


def _e2e_variants(
    model: nn.Module, opt: torch.optim.Optimizer, backends: Sequence[str] = ("auto",)
) -> dict[str, dict[str, Any]]:
    """name -> {"reg": Regularizer | None, "loss": extra loss term fn | None, "wd": float,
    "backend": kernels backend}; with several ``backends`` each Regularizer variant is
    repeated per backend as ``"<name> [<backend>]"``."""
    import torch_regularizers as tr

    weights = [p for _, p in tr.select.weights.resolve(model)]
    v: dict[str, dict[str, Any]] = {"none": {}}
    v["torch AdamW weight_decay"] = {"wd": 1e-4}
    rules = {
        "L2 decoupled": lambda: tr.L2(1e-4, mode="decoupled"),
        "L2 grad": lambda: tr.L2(1e-4, mode="grad"),
        "L1 grad": lambda: tr.L1(1e-5, mode="grad"),
        "L1 prox": lambda: tr.L1(1e-5, mode="prox"),
        "ElasticNet prox": lambda: tr.ElasticNet(1e-5, 0.5, mode="prox"),
    }
    if hasattr(tr, "GroupLasso"):
        rules["GroupLasso prox"] = lambda: tr.GroupLasso(1e-5, mode="prox")
    for name, make in rules.items():
        for be in backends:
            key = name if len(backends) == 1 else f"{name} [{be}]"
            v[key] = {"reg": tr.Regularizer(model, [make()]), "backend": be}
    v["loss L2 (hand-written)"] = {"loss": lambda: 0.5e-4 * sum(p.pow(2).sum() for p in weights)}
    v["loss L1 (hand-written)"] = {"loss": lambda: 1e-5 * sum(p.abs().sum() for p in weights)}
    return v


def _e2e_model(
    name: str, rounds: int, quick: bool, device: str = "cpu", backends: Sequence[str] = ("auto",)
) -> dict[str, Any]:
    torch.manual_seed(0)
    model, loss_fn = _mlp(quick, device) if name == "mlp" else _transformer(quick, device)
    weights = {id(p) for p in model.parameters() if p.ndim >= 2}
    groups = [
        {"params": [p for p in model.parameters() if id(p) in weights], "weight_decay": 0.0},
        {"params": [p for p in model.parameters() if id(p) not in weights], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-4, foreach=True)
    variants = _e2e_variants(model, opt, backends)
    current: dict[str, Any] = {}
    default = kernels.get_backend()

    def configure(v: dict[str, Any]) -> None:
        if current.get("reg") is not None:
            current["reg"].detach()
        opt.param_groups[0]["weight_decay"] = v.get("wd", 0.0)
        kernels.set_backend(v.get("backend", default) if v.get("backend") != "auto" else default)
        if v.get("reg") is not None:
            with warnings.catch_warnings():  # advice about the rule set (metric=...): not timed
                warnings.simplefilter("ignore", UserWarning)
                v["reg"].attach(opt)
        current.clear()
        current.update(v)

    def step(v: dict[str, Any]) -> None:
        loss = loss_fn()
        if v.get("loss") is not None:
            loss = loss + v["loss"]()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns = {k: (lambda v=v: step(v)) for k, v in variants.items()}
    setup = {k: (lambda v=v: configure(v)) for k, v in variants.items()}
    try:
        times = interleaved(fns, rounds, warmup=1 if quick else 2, device=device, setup=setup)
    finally:
        configure({})
    summ = summarize(times, "none")
    return {
        "model": name,
        "device": device,
        "params": sum(p.numel() for p in model.parameters()),
        "step_ms": summ["none"]["ms"],
        "variants": {
            k: {
                "ms": v["ms"],
                "overhead_pct": (v["ratio"] - 1) * 100,
                "overhead_pct_min": (v["ratio_min"] - 1) * 100,
            }
            for k, v in summ.items()
        },
    }


def end_to_end(
    models: Sequence[str] = MODELS,
    rounds: int = 15,
    quick: bool = False,
    log: Callable[[str], Any] | None = None,
    device: str = "cpu",
    backends: Sequence[str] = ("auto",),
) -> list[dict[str, Any]]:
    """Training-step time per variant, interleaved round-robin; overhead vs no regularization.

    ``backends``: the kernel backend(s) of the Regularizer variants (``"auto"``: the current
    setting); with several, every variant is timed once per backend.
    """
    out = []
    for name in models:
        row = _e2e_model(name, rounds, quick, device, backends)
        out.append(row)
        if log is not None:
            log(f"  {name}: {row['params'] / 1e6:.1f} M params, step {row['step_ms']:.1f} ms")
    return out


# --------------------------------------------------------------------------- output
_COLS = (
    "library[aten]",
    "library[native]",
    "library[triton]",
    "Regularizer",
    "Regularizer[aten]",
    "naive foreach",
    "hook loop",
    "loss+backward",
    "torch weight_decay",
)


def format_micro(rows: list[dict[str, Any]], stat: str = "ratio") -> str:
    return _table(*_micro_rows(rows, stat))


def format_e2e(rows: list[dict[str, Any]], stat: str = "overhead_pct") -> str:
    out = []
    for r in rows:
        out.append(f"{r['model']}: {r['params'] / 1e6:.1f} M parameters, step {r['step_ms']:.1f} ms (no regularization)")
        lines = [[k, f"{v['ms']:.1f}", "-" if k == "none" else f"{v[stat]:+.1f}%"] for k, v in r["variants"].items()]
        out.append(_table(["variant", "step ms", "overhead"], lines, right=1))
        out.append("")
    return "\n".join(out).rstrip()


def _micro_rows(rows: list[dict[str, Any]], stat: str) -> tuple[list[str], list[list[str]]]:
    cols = [c for c in _COLS if any(c in r["methods"] for r in rows)]
    head = ["set", "penalty", "mode", "floor ms", *cols]
    lines = []
    for r in rows:
        cells = [r["set"], r["penalty"], r["mode"], f"{r['floor_ms']:.3f}"]
        for c in cols:
            m = r["methods"].get(c)
            cells.append("-" if m is None else f"{m[stat]:.2f}x")
        lines.append(cells)
    return head, lines


def format_markdown(result: dict[str, Any], stat: str = "ratio") -> str:
    """The results as Markdown tables (for RESULTS.md / the README)."""
    m = result["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    out = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads "
        f"(device {m['device']}{gpu}); kernels backend `{result['settings'].get('backend', 'auto')}`, native kernels "
        f"{'built' if m['native_kernels'] else 'not built'}.",
        "",
        f"Command: `{result['command']}`",
    ]
    if result["micro"]:
        head, lines = _micro_rows(result["micro"], stat)
        out += ["", _md_table(head, lines)]
    for r in result["e2e"]:
        key = "overhead_pct" if stat == "ratio" else "overhead_pct_min"
        out += [
            "",
            f"**{r['model']}** ({r['params'] / 1e6:.1f} M parameters), step {r['step_ms']:.1f} ms without regularization:",
            "",
            _md_table(
                ["variant", "step ms", "overhead"],
                [[k, f"{v['ms']:.1f}", "-" if k == "none" else f"{v[key]:+.1f}%"] for k, v in r["variants"].items()],
            ),
        ]
    return "\n".join(out)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[str]], right: int = 3) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w[i]) if i >= right else c.ljust(w[i]) for i, c in enumerate(cells)).rstrip()

    return "\n".join([fmt(head), fmt(["-" * x for x in w]), *(fmt(r) for r in rows)])


# --------------------------------------------------------------------------- CLI
def _csv(choices: Sequence[str]):
    def parse(s: str) -> list[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torch-regularizers bench",
        description="Penalty kernels against the floor (one _foreach_add_ pass), and training-step overhead.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (seconds)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--sets", type=_csv(SETS), default=list(SETS), help=f"comma list of {','.join(SETS)}")
    p.add_argument("--penalties", type=_csv(PENALTIES), default=list(PENALTIES), help=f"comma list of {','.join(PENALTIES)}")
    p.add_argument("--modes", type=_csv(MODES), default=list(MODES), help=f"comma list of {','.join(MODES)}")
    p.add_argument("--models", type=_csv(MODELS), default=list(MODELS), help=f"end-to-end models: {','.join(MODELS)}")
    p.add_argument("--reps", type=int, default=None, help="micro rounds (default 30, quick 5)")
    p.add_argument("--rounds", type=int, default=None, help="end-to-end rounds (default 20, quick 3)")
    p.add_argument("--no-micro", action="store_true", help="skip the micro benchmarks")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end benchmarks")
    p.add_argument("--no-alternatives", action="store_true", help="time only the floor and the library")
    p.add_argument("--native", action="store_true", help="build the fused C++ kernels first (~30 s once) and time them too")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="device of the micro and end-to-end benchmarks (cpu, cuda)")
    p.add_argument(
        "--backends",
        type=_csv(kernels.BACKENDS[1:]),
        default=None,
        help="kernel backends timed as library[...] columns (default: aten, + native on CPU when built, "
        "+ triton on CUDA when it imports); given, or on CUDA, the end-to-end variants also run once per backend",
    )
    p.add_argument(
        "--backend",
        choices=kernels.BACKENDS,
        default="auto",
        help="kernels for the Regularizer column and the end-to-end runs (default auto)",
    )
    p.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="tables: median of per-round ratios (default) or ratio of minimum times",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; ``argv`` as on the command line (``None``: ``sys.argv[1:]``)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench: CUDA is not available", file=sys.stderr)
        return 2
    if args.backends and "triton" in args.backends and not kernels.triton_available():
        print("bench: the triton backend needs the triton package (pip install triton)", file=sys.stderr)
        return 2
    reps = args.reps or (3 if args.quick else 30)
    rounds = args.rounds or (3 if args.quick else 20)
    log = None if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.native:
        if log:
            log("building / loading the native kernels ...")
        try:
            kernels.build_native()
        except RuntimeError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 2
    backends = args.backends or default_backends(args.device)
    # end to end: each Regularizer variant once per backend when --backends is given or on
    # CUDA (foreach vs triton); on CPU by default once, with --backend
    e2e_backends = backends if args.backends or args.device != "cpu" else [args.backend]
    result: dict[str, Any] = {
        "machine": machine_info(args.device),
        "command": "python -m torch_regularizers bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "quick": args.quick,
            "reps": reps,
            "rounds": rounds,
            "strength": LAM,
            "lr": ETA,
            "backend": args.backend,
            "backends": backends,
            "e2e_backends": e2e_backends,
        },
        "micro": [],
        "e2e": [],
    }
    t0 = time.perf_counter()
    if not args.no_micro:
        if log:
            log("micro benchmarks (ratio to the floor, same rounds):")
        result["micro"] = micro(
            args.sets,
            args.penalties,
            args.modes,
            reps=reps,
            quick=args.quick,
            device=args.device,
            backends=backends,
            alternatives=not args.no_alternatives,
            backend=args.backend,
            log=log,
        )
    if not args.no_e2e:
        if log:
            log("end-to-end training steps:")
        with _backend(args.backend):
            result["e2e"] = end_to_end(
                args.models, rounds=rounds, quick=args.quick, log=log, device=args.device, backends=e2e_backends
            )
    result["seconds"] = time.perf_counter() - t0
    result["machine"]["load_avg_end"] = machine_info()["load_avg"] if hasattr(os, "getloadavg") else None
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    stat = "ratio" if args.stat == "median" else "ratio_min"
    if args.markdown:
        print(format_markdown(result, stat))
        return 0
    m = result["machine"]
    print(f"# {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, device {m['device']}")
    print(f"# {result['command']}")
    if result["micro"]:
        print()
        print(f"Micro: time / floor ({'median of per-round ratios' if stat == 'ratio' else 'ratio of minimum times'}); floor = torch._foreach_add_(grads, params, alpha=0)")
        print(format_micro(result["micro"], stat))
    if result["e2e"]:
        print()
        print("End to end: training-step overhead vs no regularization")
        print(format_e2e(result["e2e"], "overhead_pct" if stat == "ratio" else "overhead_pct_min"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
