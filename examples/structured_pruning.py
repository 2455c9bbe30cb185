"""Structured pruning: group lasso (prox) zeroes whole hidden units, then cut them out.

``tr.GroupLasso(λ, mode="prox")`` on a Linear weight makes one group per output unit
(a row: the unit's incoming weights) and applies the block soft-threshold after every
step, so whole rows become *exactly* zero. A hidden unit with zero incoming weights
outputs the constant relu(bias): fold that constant into the next layer's bias and the
unit can be removed — the smaller network computes the same function (up to float
rounding). This script trains, prunes, and checks the outputs.

    python examples/structured_pruning.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
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


@torch.no_grad()
def prune(model: nn.Sequential) -> nn.Sequential:
    """A smaller copy without the hidden units whose incoming weights are all zero.

    A removed unit j of layer k outputs the constant c_j = relu(b_j); its contribution
    W_{k+1}[:, j]·c_j moves into the next layer's bias.
    """
    fc1, fc2, out = model.fc1, model.fc2, model.out
    keep1 = (fc1.weight != 0).any(1)
    keep2 = (fc2.weight != 0).any(1)
    c1 = torch.relu(fc1.bias[~keep1])  # constants of the removed fc1 units
    b2 = fc2.bias + fc2.weight[:, ~keep1] @ c1
    c2 = torch.relu(b2[~keep2])
    b3 = out.bias + out.weight[:, ~keep2] @ c2
    small = make_model(int(keep1.sum()), int(keep2.sum()))
    small.fc1.weight.copy_(fc1.weight[keep1])
    small.fc1.bias.copy_(fc1.bias[keep1])
    small.fc2.weight.copy_(fc2.weight[keep2][:, keep1])
    small.fc2.bias.copy_(b2[keep2])
    small.out.weight.copy_(out.weight[:, keep2])
    small.out.bias.copy_(b3)
    return small


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (CI)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strength", type=float, default=3e-3, help="group lasso λ")
    args = ap.parse_args(argv)
    epochs = 15 if args.quick else 60

    torch.manual_seed(args.seed)
    x, y = make_data(4096, args.seed)
    xt, yt = make_data(2048, args.seed + 1)
    model = make_model()
    reg = tr.Regularizer(
        model,
        # one group per hidden unit: the rows of fc1 and fc2 (not the output layer)
        [tr.GroupLasso(args.strength, on=tr.select.name("fc1.weight", "fc2.weight"), mode="prox")],
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reg.attach(opt)
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
            alive = [int((m.weight != 0).any(1).sum()) for m in (model.fc1, model.fc2)]
            print(f"epoch {epoch:3d}  loss {loss.item():.4f}  hidden units alive {alive[0]}+{alive[1]}")
    reg.detach()

    model.eval()
    small = prune(model)
    with torch.no_grad():
        full_out, small_out = model(xt), small(xt)
        test_mse = nn.functional.mse_loss(full_out, yt).item()
    diff = (full_out - small_out).abs().max().item()
    print(
        f"\ntest MSE {test_mse:.4f}; pruned {HIDDEN}+{HIDDEN} → {small.fc1.out_features}+"
        f"{small.fc2.out_features} hidden units, parameters {n_params(model):,} → {n_params(small):,}"
    )
    print(f"max |full − pruned| on {len(xt)} test inputs: {diff:.2e}")
    removed = 2 * HIDDEN - small.fc1.out_features - small.fc2.out_features
    # counted independently of prune(): rows of exactly zero incoming weights
    zero_rows = sum(int((m.weight == 0).all(1).sum()) for m in (model.fc1, model.fc2))
    print(f"hidden units removed: {removed} (rows of exactly zero weights: {zero_rows})")
    ok = (
        torch.allclose(full_out, small_out, rtol=1e-5, atol=1e-5)  # the same function
        and removed == zero_rows
        and removed > (HIDDEN // 4 if args.quick else HIDDEN)  # and whole units did go
        and n_params(small) < n_params(model)
    )
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
