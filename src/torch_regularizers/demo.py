"""``python -m torch_regularizers demo``: compare regularizers on a small MLP.

Trains the same 64→256→256→10 MLP (same initial weights, same batches) on
scikit-learn's handwritten digits — a data set that ships inside scikit-learn, so
nothing is downloaded — once per method:

========================  ==========================================================
``none``                  no regularization
``l2 (loss term)``        the hand-written way: ``loss + lam * Σ p.pow(2).sum()`` over
                          *every* parameter (biases included), through autograd
``l2 decoupled``          ``tr.L2(λ, mode="decoupled")`` on the weights (AdamW-style)
``l1 prox``               ``tr.L1(λ, mode="prox")``: soft-thresholding, exact zeros
``group lasso prox``      ``tr.GroupLasso(λ, mode="prox")`` on the two hidden layers,
                          one group per hidden unit: whole units become exactly 0
``group lasso → pruned``  ``tr.GroupLasso(λ, groups=tr.prune.channel_groups(...))``: a
                          unit's row, bias and next-layer column as one group, then
                          ``tr.prune.shrink`` removes the zero units (needs ``[prune]``)
``elastic net prox``      ``tr.ElasticNet(α, l1_ratio=0.5, mode="prox")``
========================  ==========================================================

and prints test accuracy, the fraction of weights that are exactly zero, the
hidden units whose incoming weights are all zero (removable, see
``examples/structured_pruning.py``), the training wall time and its overhead
over no regularization. A PNG (accuracy vs sparsity, weight-magnitude histograms
per method) is written to ``--out`` (default ``./demo_out``).

The optimizer is SGD with momentum for every method, so the prox rules are plain
proximal gradient steps. Runs are deterministic for a given ``--seed`` on a
given machine (one intra-op thread by default).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import torch_regularizers as tr

__all__ = ["METHODS", "Method", "add_arguments", "main", "make_model", "run"]

HIDDEN = 256
LR = 0.05
MOMENTUM = 0.9
BATCH = 32


def make_model(hidden: int = HIDDEN) -> nn.Sequential:
    """The demo's MLP: ``fc1`` 64→hidden, ReLU, ``fc2`` hidden→hidden, ReLU, ``out`` hidden→10."""
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(64, hidden),
            act1=nn.ReLU(),
            fc2=nn.Linear(hidden, hidden),
            act2=nn.ReLU(),
            out=nn.Linear(hidden, 10),
        )
    )


@dataclass
class Method:
    """One row of the comparison.

    ``build(model)`` returns a :class:`~torch_regularizers.Regularizer` (or ``None``);
    ``loss_term(model)`` returns a differentiable term added to the loss (or ``None``).
    ``needs`` names ``tr`` attributes the method requires (missing → the row is skipped).
    """

    name: str
    what: str
    build: Callable[[nn.Module], Any] = lambda model: None
    loss_term: Callable[[nn.Module], torch.Tensor] | None = None
    needs: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()  # importable modules it requires (missing → skipped)
    shrink: bool = False  # after training: tr.prune.shrink a copy and report it
    result: dict[str, Any] = field(default_factory=dict)


# Strengths: chosen so that on the digits the sparse methods remove most weights (L1,
# elastic net) or most hidden units (group lasso) while staying within about a point of
# the unregularized accuracy (200 epochs, seed 0).
# L2: the loss term lam·Σ‖p‖² is torch's λ = 2·lam = 1e-3, coupled: with momentum β = 0.9 it
# shrinks weights by about lr·λ/(1 − β) = 5e-4 per step; the decoupled rule shrinks by lr·λ,
# so λ = 1e-2 gives the same 5e-4.
L2_LOSS_LAM = 5e-4
L2_LAMBDA = 1e-2
L1_LAMBDA = 1e-3
GL_LAMBDA = 1e-3
EN_ALPHA = 1e-3
#: coupled groups also hold the bias entry and the next layer's column: √size is larger than
#: a row's, and 1e-3 zeroes about as many units as the row-wise GL_LAMBDA within a point
GLC_LAMBDA = 1e-3
#: forwards timed for the latency columns (median)
LATENCY_REPS = 200


def _coupled_group_lasso(model: nn.Module):
    p = next(model.parameters())
    groups = tr.prune.channel_groups(model, torch.zeros(1, 64, device=p.device, dtype=p.dtype))
    return tr.Regularizer(model, [tr.GroupLasso(GLC_LAMBDA, groups=groups, mode="prox")])
DEFAULT_EPOCHS = 200
QUICK_EPOCHS = 3


def _seed_l2(model: nn.Module) -> torch.Tensor:
    # The "seed" approach, verbatim: every parameter, biases included, through autograd.
    return L2_LOSS_LAM * sum(p.pow(2).sum() for p in model.parameters())


def _hidden_layers():
    return tr.select.name("fc1.weight", "fc2.weight")


METHODS: list[Method] = [
    Method("none", "no regularization"),
    Method(
        "l2 (loss term)",
        f"loss + {L2_LOSS_LAM:g}·Σ‖p‖² over every parameter (hand-written)",
        loss_term=_seed_l2,
    ),
    Method(
        "l2 decoupled",
        f"tr.L2({L2_LAMBDA:g}, mode='decoupled') on weights",
        build=lambda m: tr.Regularizer(m, [tr.L2(L2_LAMBDA, mode="decoupled")]),
    ),
    Method(
        "l1 prox",
        f"tr.L1({L1_LAMBDA:g}, mode='prox') on weights",
        build=lambda m: tr.Regularizer(m, [tr.L1(L1_LAMBDA, mode="prox")]),
    ),
    Method(
        "group lasso prox",
        f"tr.GroupLasso({GL_LAMBDA:g}, mode='prox') on fc1/fc2, one group per hidden unit",
        build=lambda m: tr.Regularizer(
            m, [tr.GroupLasso(GL_LAMBDA, on=_hidden_layers(), mode="prox")]
        ),
        needs=("GroupLasso",),
    ),
    Method(
        "group lasso → pruned",
        f"tr.GroupLasso({GLC_LAMBDA:g}, groups=tr.prune.channel_groups(...), mode='prox'), "
        "then tr.prune.shrink",
        build=_coupled_group_lasso,
        needs=("prune",),
        modules=("torch_pruning",),
        shrink=True,
    ),
    Method(
        "elastic net prox",
        f"tr.ElasticNet({EN_ALPHA:g}, l1_ratio=0.5, mode='prox') on weights",
        build=lambda m: tr.Regularizer(m, [tr.ElasticNet(EN_ALPHA, l1_ratio=0.5, mode="prox")]),
    ),
]


# --------------------------------------------------------------------------- data


def load_digits_split(seed: int, device: torch.device):
    """Digits (1797 8×8 images), standardized with train statistics; 75/25 split by ``seed``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = len(y) // 4
    test, train = perm[:n_test], perm[n_test:]
    mean = x[train].mean(0)
    std = x[train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return (x[train].to(device), y[train].to(device)), (x[test].to(device), y[test].to(device))


# --------------------------------------------------------------------------- measures


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The matrices of the MLP (biases excluded)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.dim() >= 2}


def zero_fraction(model: nn.Module) -> float:
    """Fraction of weight-matrix entries that are exactly 0."""
    ws = list(weight_tensors(model).values())
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def zero_units(model: nn.Module) -> int:
    """Hidden units whose incoming weights are all exactly 0 (fc1 and fc2 rows)."""
    n = 0
    for name, w in weight_tensors(model).items():
        if not name.startswith("out."):
            n += int((w == 0).all(dim=1).sum())
    return n


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y`` (eval mode, no grad)."""
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, reps: int = LATENCY_REPS) -> float:
    """Median wall time of one forward of ``x`` (eval mode), in milliseconds."""
    model.eval()
    for _ in range(5):
        model(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    model.train()
    return 1e3 * statistics.median(times)


def shrink_result(model: nn.Module, xte: torch.Tensor, yte: torch.Tensor) -> dict[str, Any]:
    """Shrink a CPU copy of ``model`` with tr.prune.shrink and measure both on CPU."""
    dense = copy.deepcopy(model).cpu().eval()
    x, y = xte.cpu(), yte.cpu()
    pruned = copy.deepcopy(dense)
    report = tr.prune.shrink(pruned, x[:1])  # checks the outputs before it changes anything
    with torch.no_grad():
        same = bool(torch.equal(dense(x).argmax(1), pruned(x).argmax(1)))
    return {
        "params": report.params_before,
        "params_pruned": report.params_after,
        "macs": report.macs_before,
        "macs_pruned": report.macs_after,
        "hidden_units_pruned": pruned.fc1.out_features + pruned.fc2.out_features,
        "test_accuracy_pruned": accuracy(pruned, x, y),
        "same_predictions": same,
        "latency_ms": latency_ms(dense, x),
        "latency_pruned_ms": latency_ms(pruned, x),
        "latency_batch": len(x),
    }


# --------------------------------------------------------------------------- training


class _Run:
    """One method's training run: its own model (same init), optimizer and batch order."""

    def __init__(self, method: Method, data, *, seed: int, device: torch.device, position: int,
                 epochs: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        self.method = method
        (self.xtr, self.ytr), _ = data
        self.device = device
        torch.manual_seed(seed)
        self.model = make_model().to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        self.reg = method.build(self.model)
        if self.reg is not None:
            self.reg.attach(self.opt)
        self.loss_fn = nn.CrossEntropyLoss()
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.steps_per_epoch = math.ceil(len(self.ytr) / BATCH)
        self.elapsed = 0.0
        self.bar = tqdm(
            total=epochs * self.steps_per_epoch,
            desc=f"{method.name:<17}",
            unit="step",
            position=position,
            leave=True,
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
        )

    def epoch(self) -> None:
        model, opt, xtr, ytr = self.model, self.opt, self.xtr, self.ytr
        n = len(ytr)
        perm = torch.randperm(n, generator=self.gen).to(self.device)
        loss = None
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            idx = perm[i : i + BATCH]
            loss = self.loss_fn(model(xtr[idx]), ytr[idx])
            if self.method.loss_term is not None:
                loss = loss + self.method.loss_term(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.elapsed += time.perf_counter() - t0
        self.bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        self.bar.update(self.steps_per_epoch)

    def finish(self, data) -> dict[str, Any]:
        self.bar.close()
        if self.reg is not None:
            self.reg.detach()
        (xtr, ytr), (xte, yte) = data
        m = self.model
        out = {
            "method": self.method.name,
            "what": self.method.what,
            "test_accuracy": accuracy(m, xte, yte),
            "train_accuracy": accuracy(m, xtr, ytr),
            "zero_fraction": zero_fraction(m),
            "zero_units": zero_units(m),
            "hidden_units": 2 * HIDDEN,
            "time_s": self.elapsed,
        }
        if self.method.shrink:
            out.update(shrink_result(m, xte, yte))
        return out


def run(
    *,
    epochs: int | None = None,
    seed: int = 0,
    quick: bool = False,
    out: str | Path = "demo_out",
    device: str = "cpu",
    threads: int | None = 1,
    plot: bool = True,
    progress: bool = True,
    methods: list[Method] | None = None,
) -> dict[str, Any]:
    """Run the comparison; returns ``{"results": [...], "skipped": [...], "png": path, "models": {...}}``."""
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    if epochs is None:
        epochs = QUICK_EPOCHS if quick else DEFAULT_EPOCHS
    methods = METHODS if methods is None else methods
    data = load_digits_split(seed, dev)
    results, skipped, models = [], [], {}
    runnable = []
    for m in methods:
        missing = [n for n in m.needs if not hasattr(tr, n)]
        absent = [mod for mod in m.modules if importlib.util.find_spec(mod) is None]
        if missing:
            skipped.append((m.name, f"tr.{', tr.'.join(missing)} is not available in this version"))
        elif absent:
            skipped.append(
                (m.name, f"needs {', '.join(absent)}: pip install 'torch-regularizers[prune]'")
            )
        else:
            runnable.append(m)
    runs = [
        _Run(m, data, seed=seed, device=dev, position=i, epochs=epochs, progress=progress)
        for i, m in enumerate(runnable)
    ]
    # Epochs are interleaved across methods so that machine noise hits every method alike
    # (each run keeps its own generator: results are those of separate runs).
    for _ in range(epochs):
        for r in runs:
            r.epoch()
    for r in runs:
        results.append(r.finish(data))
        models[r.method.name] = r.model
    base = next((r["time_s"] for r in results if r["method"] == "none"), None)
    for r in results:
        r["overhead"] = (r["time_s"] / base - 1.0) if base else float("nan")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    png = None
    if plot:
        png = outdir / "demo.png"
        make_figure(results, models, png, epochs=epochs, seed=seed)
    summary = {
        "epochs": epochs,
        "seed": seed,
        "device": str(dev),
        "results": results,
        "skipped": [{"method": n, "reason": why} for n, why in skipped],
        "png": str(png) if png else None,
    }
    (outdir / "results.json").write_text(json.dumps(summary, indent=2))
    summary["models"] = models
    return summary


# --------------------------------------------------------------------------- output


def format_table(results: list[dict[str, Any]]) -> str:
    """The results table as text."""
    head = ("method", "test acc", "zero weights", "zero units", "time", "overhead")
    rows = []
    for r in results:
        ov = r.get("overhead", float("nan"))
        rows.append(
            (
                r["method"],
                f"{100 * r['test_accuracy']:.1f}%",
                f"{100 * r['zero_fraction']:.1f}%",
                f"{r['zero_units']}/{r['hidden_units']}",
                f"{r['time_s']:.2f}s",
                "-" if r["method"] == "none" or math.isnan(ov) else f"{100 * ov:+.0f}%",
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_pruned(results: list[dict[str, Any]]) -> str:
    """The pruned-model table ('' when no row was shrunk)."""
    rows = [r for r in results if "params_pruned" in r]
    if not rows:
        return ""
    head = ("method", "params", "MACs", "hidden units", "test acc", "CPU forward")
    lines = []
    for r in rows:
        lines.append(
            (
                r["method"],
                f"{r['params']:,} → {r['params_pruned']:,}",
                f"{r['macs']:,} → {r['macs_pruned']:,}" if r["macs"] is not None else "-",
                f"{r['hidden_units']} → {r['hidden_units_pruned']}",
                f"{100 * r['test_accuracy']:.1f}% → {100 * r['test_accuracy_pruned']:.1f}%",
                (
                    f"{r['latency_ms']:.3f} → {r['latency_pruned_ms']:.3f} ms "
                    f"({r['latency_ms'] / r['latency_pruned_ms']:.1f}×, batch {r['latency_batch']})"
                ),
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join(
        [
            "after tr.prune.shrink (dense → pruned; same predictions on the test set):",
            line(head),
            line(["-" * w for w in widths]),
            *(line(r) for r in lines),
        ]
    )


#: |w| axis of the histograms: 10**HIST_LO .. 10**HIST_HI; magnitudes outside it get their own bars
HIST_LO, HIST_HI = -6.0, 1.0


def magnitude_counts(w: torch.Tensor, lo: float = HIST_LO, hi: float = HIST_HI) -> dict[str, Any]:
    """|w| sorted into: exact zeros, ``0 < |w| < 10**lo``, in range (``values``), ``> 10**hi``.

    Nothing is clamped: every entry of ``w`` is in exactly one of the four.
    """
    a = w.detach().flatten().abs().float().cpu()
    zero = a == 0
    under = (a > 0) & (a < 10**lo)
    over = a > 10**hi
    inside = ~(zero | under | over)
    return {"zeros": int(zero.sum()), "under": int(under.sum()), "over": int(over.sum()),
            "values": a[inside], "total": a.numel()}


def _box_distance(bb, q) -> float:
    """Display distance from a point to a box (0 inside)."""
    dx = max(bb.x0 - q[0], 0.0, q[0] - bb.x1)
    dy = max(bb.y0 - q[1], 0.0, q[1] - bb.y1)
    return math.hypot(dx, dy)


def place_labels(ax, points, labels, *, fontsize: float = 8) -> list:
    """Annotate each point with its label: the first of a few candidate spots (right, left,
    above, below, then farther out with a leader line) whose text box stays inside the axes,
    overlaps no other label and no marker, and — without a leader line — is nearer its own
    point than any other, so that no label can be read as another point's. Returns the
    annotations."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    disp = [tuple(ax.transData.transform(p)) for p in points]
    r_px = 6.0 * fig.dpi / 72  # a marker's radius (s=70 is ~8.4 pt across), in pixels
    near = [(10, 0, "left"), (-10, 0, "right"), (0, 11, "center"), (0, -11, "center"),
            (8, 9, "left"), (-8, 9, "right"), (8, -9, "left"), (-8, -9, "right")]
    far = [(dx * k, dy * k, ha) for k in (2.2, 3.4) for dx, dy, ha in near[4:] + near[:4]]
    placed: list = []
    out = []
    for i, ((x, y), label) in enumerate(zip(points, labels)):
        px, py = disp[i]
        order = near if px < box.x0 + 0.6 * box.width else [near[1], near[0], *near[2:]]
        for dx, dy, ha in order + far:
            kw = dict(textcoords="offset points", xytext=(dx, dy), ha=ha, va="center", fontsize=fontsize)
            t = ax.annotate(label, (x, y), **kw)  # measured without its leader line
            bb = t.get_window_extent(renderer).expanded(1.04, 1.1)
            others = [_box_distance(bb, q) for j, q in enumerate(disp) if j != i]
            clash = (
                bb.x0 < box.x0 or bb.x1 > box.x1 or bb.y0 < box.y0 or bb.y1 > box.y1
                or any(bb.overlaps(o) for o in placed)
                or any(d < r_px for d in others)
                or ((dx, dy, ha) in near and others and min(others) <= 1.5 * _box_distance(bb, (px, py)))
            )
            if not clash:
                if (dx, dy, ha) not in near:
                    t.remove()
                    line = dict(arrowstyle="-", lw=0.6, color="0.4", shrinkA=1, shrinkB=5)
                    t = ax.annotate(label, (x, y), arrowprops=line, **kw)
                break
            t.remove()
        else:  # no free spot: the first one, overlapping, rather than no label
            dx, dy, ha = order[0]
            t = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha,
                            va="center", fontsize=fontsize)
            bb = t.get_window_extent(renderer)
        placed.append(bb)
        out.append(t)
    return out


def make_figure(results, models, path: Path, *, epochs: int, seed: int) -> None:
    """Accuracy vs exact-zero fraction (left) and |w| histograms per method (right)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    n = len(results)
    cols = max(1, math.ceil(n / 2))
    fig = plt.figure(figsize=(4.2 + 2.9 * cols, 6.6), dpi=110)
    gs = fig.add_gridspec(2, 2 + cols, width_ratios=[1.1, 1.1] + [1.0] * cols)
    ax = fig.add_subplot(gs[:, :2])
    colors = plt.get_cmap("tab10").colors
    accs = [100 * r["test_accuracy"] for r in results] or [0.0]
    y_lo, y_hi = max(0.0, min(accs) - 1.0), min(100.0, max(accs) + 0.6)
    points = []
    for i, r in enumerate(results):
        points.append((100 * r["zero_fraction"], 100 * r["test_accuracy"]))
        ax.scatter(*points[-1], s=70, color=colors[i % 10], zorder=3)
    ax.set_xlabel("weights exactly zero (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(y_lo, y_hi)
    ax.grid(alpha=0.3)
    ax.set_title(f"digits, MLP 64-256-256-10, {epochs} epochs, seed {seed}", fontsize=9)

    lo, hi = HIST_LO, HIST_HI
    bins = torch.logspace(lo, hi, 50).tolist()
    # magnitudes outside [10**lo, 10**hi] get a bar of their own beyond a dashed line, never
    # the edge bin: an under-range bar drawn in the first bin would read as many weights near 1e-6
    under_bin = [10 ** (lo - 1.4), 10 ** (lo - 0.6)]
    over_bin = [10 ** (hi + 0.6), 10 ** (hi + 1.4)]
    hists = []
    for i, r in enumerate(results):
        sub = fig.add_subplot(gs[i // cols, 2 + i % cols])
        w = torch.cat([t.flatten() for t in weight_tensors(models[r["method"]]).values()])
        c = magnitude_counts(w, lo, hi)
        sub.hist(c["values"].numpy(), bins=bins, color=colors[i % 10], alpha=0.85)
        for key, edges in (("under", under_bin), ("over", over_bin)):
            if c[key]:
                sub.bar(edges[0], c[key], width=edges[1] - edges[0], align="edge",
                        color="none", edgecolor=colors[i % 10], hatch="////", lw=0.8)
        sub.set_xscale("log")
        sub.set_xlim(10 ** (lo - 1.6), 10 ** (hi + (1.6 if c["over"] else 0.3)))
        for edge in (10**lo,) + ((10**hi,) if c["over"] else ()):
            sub.axvline(edge, color="0.5", lw=0.6, ls="--")
        ticks = [10.0**k for k in range(int(lo) + 2, int(hi) + 1, 2)]  # 1e-6: the dashed line
        sub.set_xticks(
            [10 ** (lo - 1.0), *ticks],
            [f"<1e{int(lo)}", *(f"1e{int(math.log10(t))}" for t in ticks)],
        )
        sub.minorticks_off()
        sub.set_ylim(0, sub.get_ylim()[1] * 1.45)  # room for the text
        sub.set_title(r["method"], fontsize=9)
        text = (
            f"exact zeros (not drawn): {100 * r['zero_fraction']:.1f}%\n"
            f"zero units: {r['zero_units']}/{r['hidden_units']}\n"
            f"0 < |w| < 1e{int(lo)} (hatched): {c['under']}"
        )
        if c["over"]:
            text += f"\n|w| > 1e{int(hi)} (hatched): {c['over']}"
        sub.text(0.03, 0.96, text, transform=sub.transAxes, fontsize=6.5, va="top")
        sub.tick_params(labelsize=6.5)
        if i % cols == 0:
            sub.set_ylabel("number of weights", fontsize=8)
        if i // cols == 1 or i + cols >= n:
            sub.set_xlabel("|w| of the non-zero weights", fontsize=8)
        hists.append(sub)
    fig.suptitle("torch-regularizers demo: accuracy vs sparsity, weight magnitudes", fontsize=11)
    fig.tight_layout()
    place_labels(ax, points, [r["method"] for r in results])  # after the layout: final positions
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI glue


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    p.add_argument("--seed", type=int, default=0, help="seed for init, split and batches (default 0)")
    p.add_argument("--quick", action="store_true", help="a few epochs only (CI: a few seconds)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per method (default {DEFAULT_EPOCHS}; {QUICK_EPOCHS} with --quick)")
    p.add_argument("--out", default="demo_out", help="folder for demo.png and results.json (default ./demo_out)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: steadier timings, deterministic); 0 = torch's default",
    )
    bars = p.add_mutually_exclusive_group()
    bars.add_argument(
        "--progress", dest="progress", action="store_true", default=None,
        help="show the progress bars even when stderr is not a terminal",
    )
    bars.add_argument(
        "--no-progress", dest="progress", action="store_false",
        help="hide the progress bars (default: shown only when stderr is a terminal)",
    )


def _show_progress(asked: bool | None, stream: Any = None) -> bool:
    """Progress bars: as asked (``--progress``/``--no-progress``), else only on a terminal —
    redirected to a file, tqdm's carriage returns would fill it with redrawn bars."""
    if asked is not None:
        return bool(asked)
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class DemoError(Exception):
    """A user error (bad device, missing extra): reported in one line, exit code 2."""


def main(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args``; print the table and the PNG path."""
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        raise DemoError(f"--device {args.device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {args.device!r}: CUDA is not available on this machine")
    if args.epochs is not None and args.epochs < 1:
        raise DemoError(f"--epochs must be >= 1, got {args.epochs}")
    for mod in ("sklearn", "tqdm", "matplotlib"):
        try:
            __import__(mod)
        except ImportError:
            raise DemoError(
                f"the demo needs {mod}: pip install 'torch-regularizers[demo]'"
            ) from None
    print(
        f"torch-regularizers demo: same MLP, same init and batches, SGD(lr={LR:g}, "
        f"momentum={MOMENTUM:g}), scikit-learn digits"
    )
    for m in METHODS:
        print(f"  {m.name:<17} {m.what}")
    print(flush=True)
    s = run(
        epochs=args.epochs,
        seed=args.seed,
        quick=args.quick,
        out=args.out,
        device=args.device,
        threads=args.threads or None,
        progress=_show_progress(getattr(args, "progress", None)),
    )
    print()
    print(format_table(s["results"]))
    pruned = format_pruned(s["results"])
    if pruned:
        print()
        print(pruned)
    for sk in s["skipped"]:
        print(f"skipped {sk['method']}: {sk['reason']}")
    print()
    print(
        "zero units = hidden units (of 2×256) whose incoming weights are all exactly 0; "
        "overhead = training time vs none."
    )
    print(f"figure: {Path(s['png']).resolve()}")
    print(f"numbers: {(Path(args.out) / 'results.json').resolve()}")
    return 0
