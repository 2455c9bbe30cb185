"""Fine-tuning with L2-SP: pull the backbone toward its *pretrained* weights, not toward 0.

L2-SP (Li, Grandvalet & Davoine, 2018) penalizes R(θ) = ½·λ·‖θ − θ₀‖², θ₀ being the
pretrained weights (by default the values when the ``Regularizer`` is built); the new
head gets ordinary L2. With few labelled examples for the new task, plain fine-tuning
drifts far from the pretrained representation; L2-SP keeps it close.

    python examples/finetune_l2sp.py [--quick]

The "pretrained" backbone is trained here on a large synthetic task A (regress 8 hidden
features z = tanh(x·A) from x, 4000 examples); the fine-tuning task B is a 3-class problem
read out from the same features, with only 60 labelled examples.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn

import torch_regularizers as tr

N_IN, N_LATENT = 20, 8


class Net(nn.Module):
    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(N_IN, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, n_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def make_model() -> nn.Module:
    """The fine-tuning model (backbone + 3-class head); also used by ``inspect``."""
    return Net(3)


def latent(n: int, seed: int):
    """Inputs x and the shared hidden features z = tanh(x·A)."""
    a = torch.randn(N_IN, N_LATENT, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, N_IN, generator=torch.Generator().manual_seed(seed))
    return x, torch.tanh(x @ a)


def task_b(n: int, seed: int):
    """3 classes read out from z."""
    x, z = latent(n, seed)
    w = torch.randn(N_LATENT, 3, generator=torch.Generator().manual_seed(20))
    return x, (z @ w).argmax(1)


def train(model, x, y, epochs, opt, seed, loss_fn, batch):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def drift(model, ref) -> float:
    """‖θ − θ₀‖ over the backbone."""
    sq = sum(((p - q) ** 2).sum() for p, q in zip(model.backbone.parameters(), ref.backbone.parameters()))
    return float(sq.detach()) ** 0.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs (CI)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    pre_epochs, ft_epochs = (10, 60) if args.quick else (20, 150)

    # 1. "pretrained" backbone: regress the 8 hidden features on a large task A
    torch.manual_seed(args.seed)
    pre = Net(N_LATENT)
    xa, za = latent(4000, seed=1)
    opt = torch.optim.Adam(pre.parameters(), lr=3e-3)
    train(pre, xa, za, pre_epochs, opt, args.seed, nn.functional.mse_loss, batch=64)
    with torch.no_grad():
        mse = nn.functional.mse_loss(pre(latent(2000, 2)[0]), latent(2000, 2)[1]).item()
    print(f"pretrained on task A: test MSE {mse:.4f}")

    # 2. fine-tune on task B (3 classes, 60 examples), with and without L2-SP
    xb, yb = task_b(60, seed=3)
    xt, yt = task_b(2000, seed=4)
    results = {}
    for name in ("plain fine-tuning", "L2-SP"):
        torch.manual_seed(args.seed + 1)
        model = Net(3)
        model.backbone.load_state_dict(pre.backbone.state_dict())  # new head, pretrained backbone
        start = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        if name == "L2-SP":
            reg = tr.Regularizer(
                model,
                [
                    # θ₀ = the backbone as it is now (the pretrained weights), biases included
                    tr.L2SP(0.3, on=tr.select.within(model.backbone)),
                    tr.L2(1e-3, on=tr.select.name("head.weight")),
                ],
            )
            reg.attach(opt)
            print(reg.summary())
        train(model, xb, yb, ft_epochs, opt, args.seed, nn.functional.cross_entropy, batch=20)
        results[name] = (accuracy(model, xt, yt), drift(model, start))
    print()
    for name, (acc, d) in results.items():
        print(f"{name:<18} test accuracy {100 * acc:5.1f}%   backbone drift ‖θ − θ₀‖ = {d:.3f}")
    (acc_plain, d_plain), (acc_sp, d_sp) = results["plain fine-tuning"], results["L2-SP"]
    ok = d_sp < d_plain and acc_sp > acc_plain
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
