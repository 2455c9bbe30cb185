"""Muon for the matrices, AdamW for the rest, one Regularizer for both.

The modded-nanogpt recipe trains hidden weight matrices with Muon and everything else
(embeddings, norms, biases, the head) with AdamW. Each optimizer's own ``weight_decay``
would decay whatever it was given; here the decay is declared once, per rule, on exactly
the tensors meant, and attached to both optimizers in one call:

    reg = tr.Regularizer(model, [
        tr.L2(0.1, mode="decoupled", on=tr.select.within(model.hidden), name="muon_wd"),
        tr.L2(0.01, mode="decoupled", on=tr.select.name("head.weight"), name="head_wd"),
    ])
    reg.attach(muon, adamw, names=("muon", "adamw"))   # state_dict keys them by name

Add ``cautious=True`` to the Muon rule for cautious weight decay (decay only where Muon's
update agrees in sign with the weight). Checks (also under --quick): the run is
bit-identical to ``Muon(weight_decay=λ)`` + AdamW decaying only the head weight, a
cautious run decays less than the plain one, and nothing else is decayed.

    python examples/muon_adamw.py [--quick] [--steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn

import torch_regularizers as tr


class Net(nn.Module):
    def __init__(self, d_in: int = 16, d: int = 32, n_out: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.norm = nn.LayerNorm(d)
        self.hidden = nn.Sequential(nn.Linear(d, d, bias=False), nn.GELU(), nn.Linear(d, d, bias=False))
        self.head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.inp(x))
        return self.head(h + self.hidden(h))


def split(model: Net) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Muon takes the 2-D hidden matrices; AdamW everything else."""
    matrices = [p for p in model.hidden.parameters() if p.ndim == 2]
    ids = {id(p) for p in matrices}
    return matrices, [p for p in model.parameters() if id(p) not in ids]


def train(model: Net, rules: list | None, steps: int, x: torch.Tensor, y: torch.Tensor, wd: tuple[float, float]):
    matrices, rest = split(model)
    muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=wd[0])
    adamw = torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.0)
    if wd[1]:  # AdamW's own decay on the head weight only (the twin's reference)
        adamw = torch.optim.AdamW(
            [{"params": [model.head.weight], "weight_decay": wd[1]},
             {"params": [p for p in rest if p is not model.head.weight], "weight_decay": 0.0}],
            lr=3e-3,
        )
    reg = None
    if rules is not None:
        reg = tr.Regularizer(model, rules).attach(muon, adamw, names=("muon", "adamw"))
    for _ in range(steps):
        for o in (muon, adamw):
            o.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        muon.step()
        adamw.step()
    return reg, float(loss)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    steps = a.steps or (10 if a.quick else 200)
    torch.manual_seed(a.seed)
    x = torch.randn(64, 16)
    y = torch.randint(0, 4, (64,))
    base = Net()

    ours = copy.deepcopy(base)
    rules = [
        tr.L2(0.1, mode="decoupled", on=tr.select.within(ours.hidden), name="muon_wd"),
        tr.L2(0.01, mode="decoupled", on=tr.select.name("head.weight"), name="head_wd"),
    ]
    reg, loss = train(ours, rules, steps, x, y, wd=(0.0, 0.0))
    twin = copy.deepcopy(base)
    train(twin, None, steps, x, y, wd=(0.1, 0.01))  # the optimizers' own decay on the same tensors
    cautious = copy.deepcopy(base)
    cautious_rule = tr.L2(0.1, mode="decoupled", cautious=True, on=tr.select.within(cautious.hidden))
    train(cautious, [cautious_rule], steps, x, y, wd=(0.0, 0.0))
    plain = copy.deepcopy(base)
    train(plain, None, steps, x, y, wd=(0.0, 0.0))

    print(reg.summary())
    same = all(torch.equal(p, q) for p, q in zip(ours.parameters(), twin.parameters()))
    norm = lambda m: sum(float(p.norm()) for p in m.hidden.parameters())  # noqa: E731
    checks = {
        "bit-identical to Muon(weight_decay) + AdamW(weight_decay on head)": same,
        "decay shrinks the hidden matrices": norm(ours) < norm(plain),
        "cautious decays less than plain decay": norm(ours) < norm(cautious) < norm(plain),
        "rules target exactly the hidden matrices and the head weight": [
            p["name"] for p in reg.summary(as_dict=True)["params"]
        ] == ["hidden.0.weight", "hidden.2.weight", "head.weight"],
    }
    print(f"final loss {loss:.4f}")
    for k, v in checks.items():
        print(f"{'ok ' if v else 'BAD'} {k}")
    if all(checks.values()):
        print("ok")
        return 0
    print("FAILED")
    return 1


if __name__ == "__main__":
    sys.exit(main())
