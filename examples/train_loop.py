"""A plain training loop with declared regularization.

Instead of the hand-written

    loss = loss_fn(model(x), y) + 1e-4 * sum(p.pow(2).sum() for p in model.parameters())

(which also decays biases and LayerNorm, builds an autograd graph over every weight
and never gives exact zeros), declare the rules once and attach them to the optimizer:

    reg = tr.Regularizer(model, [tr.L2(1e-2, mode="decoupled"),
                                 tr.L1(3e-2, on=tr.select.name("encoder.weight"), mode="prox")])
    reg.attach(opt)     # every opt.step() now applies them; the loop is unchanged

Here only 5 of the 30 input features carry signal: the L1 prox rule on the first layer
sets most of its weights to exactly zero, and what is left mostly reads the 5 useful inputs.

    python examples/train_loop.py [--quick] [--epochs N] [--seed S]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import torch_regularizers as tr

N_FEATURES, N_INFORMATIVE, N_CLASSES = 30, 5, 3


def make_model() -> nn.Module:
    """Linear → ReLU → Linear → LayerNorm → ReLU → Linear, with named parts (used by ``inspect``)."""
    model = nn.Sequential()
    model.add_module("encoder", nn.Linear(N_FEATURES, 64))
    model.add_module("act1", nn.ReLU())
    model.add_module("hidden", nn.Linear(64, 64))
    model.add_module("norm", nn.LayerNorm(64))
    model.add_module("act2", nn.ReLU())
    model.add_module("head", nn.Linear(64, N_CLASSES))
    return model


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes decided by the first ``N_INFORMATIVE`` features only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    w = torch.randn(N_INFORMATIVE, N_CLASSES, generator=torch.Generator().manual_seed(1234))
    y = (x[:, :N_INFORMATIVE] @ w).argmax(1)
    return x, y


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few epochs (CI)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    epochs = args.epochs or (8 if args.quick else 40)

    torch.manual_seed(args.seed)
    x, y = make_data(2048, args.seed)
    xt, yt = make_data(1024, args.seed + 1)
    model = make_model()

    reg = tr.Regularizer(
        model,
        [
            tr.L2(1e-2, mode="decoupled"),  # weights only: biases and LayerNorm are left alone
            tr.L1(3e-2, on=tr.select.name("encoder.weight"), mode="prox"),
        ],
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reg.attach(opt)
    print(reg.summary())
    print()

    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            loss = loss_fn(model(x[idx]), y[idx])  # no penalty term here
            opt.zero_grad()
            loss.backward()
            opt.step()  # L2 decay before the update, L1 prox after it
        if epoch % max(1, epochs // 4) == 0 or epoch == epochs - 1:
            s = reg.stats()
            print(
                f"epoch {epoch:3d}  loss {loss.item():.3f}  "
                f"l2 {s['l2/value']:.4f}  l1 {s['l1/value']:.4f}  "
                f"encoder zeros {100 * s['l1/sparsity']:.1f}%"
            )

    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    w = model.encoder.weight.detach()
    zeros = (w == 0).float().mean().item()
    # Σ|w| of the weights reading the informative inputs, over all: 5/30 ≈ 17% by chance
    share = (w[:, :N_INFORMATIVE].abs().sum() / w.abs().sum()).item()
    print(f"\ntest accuracy {100 * acc:.1f}%")
    print(
        f"first layer: {100 * zeros:.1f}% of weights exactly zero; {100 * share:.0f}% of its "
        f"weight mass reads the {N_INFORMATIVE} informative inputs (by chance: "
        f"{100 * N_INFORMATIVE / N_FEATURES:.0f}%, without the L1 rule: about 37%)"
    )
    # the rules never touch what they do not select
    assert "encoder.bias" in reg.summary(as_dict=True)["unselected"]
    ok = acc > 0.8 and share > 0.5 and zeros > 0.5
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
