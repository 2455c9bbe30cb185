"""Structured pruning: group lasso (prox) zeroes whole coupled channels, ``tr.prune.shrink``
removes them, and the smaller network computes the same function.

``tr.prune.channel_groups(model, x)`` asks Torch-Pruning's dependency graph which slices
belong to each hidden unit — its row of ``fc1``/``fc2``, its bias entry and the column of
the next layer that reads it — and ``tr.GroupLasso(λ, groups=..., mode="prox")`` applies
the block soft-threshold to that whole slice set after every step, so whole units become
*exactly* zero, bias and consumer column included. ``tr.prune.shrink`` then removes every
unit whose slices are all zero (Torch-Pruning does the surgery), checks on the example
input that the outputs did not change, and reports parameters and MACs before and after.
This script trains, shrinks, and checks the outputs on held-out inputs.

Needs Torch-Pruning: ``pip install 'torch-regularizers[prune]'``.

    python examples/structured_pruning.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict

import torch
from torch import nn

import torch_regularizers as tr

N_IN, HIDDEN, N_OUT = 16, 128, 4


def make_model(hidden: int = HIDDEN, hidden2: int | None = None) -> nn.Sequential:
    """``fc1`` → ReLU → ``fc2`` → ReLU → ``out`` (also used by ``inspect``)."""
    hidden2 = hidden if hidden2 is None else hidden2
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(N_IN, hidden),
            act1=nn.ReLU(),
            fc2=nn.Linear(hidden, hidden2),
            act2=nn.ReLU(),
            out=nn.Linear(hidden2, N_OUT),
        )
    )


def make_data(n: int, seed: int):
    """A smooth nonlinear regression target that a few hidden units can fit."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_IN, generator=g)
    w = torch.randn(N_IN, N_OUT, generator=torch.Generator().manual_seed(7))
    return x, torch.sin(x @ w / 2) + 0.1 * (x[:, :N_OUT] ** 2)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, reps: int = 50) -> float:
    """Median wall time of one forward of ``x`` (eval mode), in milliseconds."""
    model.eval()
    model(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (CI)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--strength", type=float, default=None, help="group lasso λ (default 1e-3; 2e-3 with --quick)"
    )
    args = ap.parse_args(argv)
    epochs = 15 if args.quick else 60
    if args.strength is None:  # a short run needs a stronger λ to zero units in 15 epochs
        args.strength = 2e-3 if args.quick else 1e-3
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        print("this example needs Torch-Pruning: pip install 'torch-regularizers[prune]'")
        print("FAILED")
        return 1

    torch.manual_seed(args.seed)
    x, y = make_data(4096, args.seed)
    xt, yt = make_data(2048, args.seed + 1)
    model = make_model()
    example = x[:1]
    # one group per hidden unit of fc1 and fc2: row + bias entry + the next layer's column
    # (the output layer's units are outputs of the model: left out, see groups.skipped)
    groups = tr.prune.channel_groups(model, example)
    reg = tr.Regularizer(model, [tr.GroupLasso(args.strength, groups=groups, mode="prox")])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reg.attach(opt)
    print(groups)
    print(reg.summary())
    print()

    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % max(1, epochs // 5) == 0 or epoch == epochs - 1:
            zg = int(reg.stats()["grouplasso/zero_groups"])
            print(f"epoch {epoch:3d}  loss {loss.item():.4f}  zero hidden units {zg}/{groups.n_groups}")
    reg.detach()

    model.eval()
    # counted independently of shrink: units whose row and bias are exactly zero
    dead = [
        int(((m.weight == 0).all(1) & (m.bias == 0)).sum()) for m in (model.fc1, model.fc2)
    ]
    with torch.no_grad():
        full_out = model(xt)
        test_mse = nn.functional.mse_loss(full_out, yt).item()
    dense_ms = latency_ms(model, xt)

    report = tr.prune.shrink(model, example, groups)  # in place; checks the outputs first
    print()
    print(report)
    with torch.no_grad():
        small_out = model(xt)
    small_ms = latency_ms(model, xt)
    diff = (full_out - small_out).abs().max().item()
    h1, h2 = model.fc1.out_features, model.fc2.out_features
    print(
        f"\ntest MSE {test_mse:.4f}; hidden units {HIDDEN}+{HIDDEN} → {h1}+{h2}, parameters "
        f"{report.params_before:,} → {report.params_after:,}, MACs {report.macs_before:,} → "
        f"{report.macs_after:,}"
    )
    print(f"max |full − pruned| on {len(xt)} test inputs: {diff:.2e}")
    print(f"one forward of {len(xt)} inputs on CPU: {dense_ms:.3f} ms dense, {small_ms:.3f} ms pruned")
    removed = 2 * HIDDEN - h1 - h2
    print(f"hidden units removed: {removed} (units with exactly zero row and bias: {sum(dead)})")
    expect = N_IN * h1 + h1 + h1 * h2 + h2 + h2 * N_OUT + N_OUT  # the smaller MLP, by hand
    ok = (
        torch.allclose(full_out, small_out, rtol=1e-5, atol=1e-5)  # the same function
        and [HIDDEN - h1, HIDDEN - h2] == dead
        and report.params_after == n_params(model) == expect
        and removed > (HIDDEN // 4 if args.quick else HIDDEN)  # and whole units did go
        and report.macs_after < report.macs_before
    )
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
