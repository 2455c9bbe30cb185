"""Gradient accumulation + mixed precision (``torch.amp``) + ``GradScaler``, unchanged.

The rules live in ``optimizer.step()``, so they are applied once per *real* step:

* accumulating 4 micro-batches does not apply the penalty 4 times (a loss term added to
  every micro-batch loss would, unless you remember to divide it);
* a step that ``GradScaler`` skips (inf/NaN gradients) applies nothing and is not counted;
* grad-mode terms are added after the scaler unscaled the gradients (inside ``step()``).

On CUDA the forward runs in float16 (where the scaler matters); on CPU in bfloat16.
One step is poisoned on purpose with an infinite loss to show a skipped step.

Check: a twin model trained on the same micro-batches with no regularizer — torch's own
AdamW decay on the weights, and the L1 subgradient added by hand to the unscaled gradient
once before each real step — must have bit-identical parameters after every step. A
penalty applied per micro-batch, twice, or on the skipped step would make them differ.

    python examples/grad_accum_amp.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn

import torch_regularizers as tr

ACCUM = 4  # micro-batches per optimizer step
LR, L2, L1 = 1e-2, 1e-2, 1e-4  # lr: the loss falls visibly within the 12 steps of --quick


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few steps (CI)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    steps = args.steps or (12 if args.quick else 200)
    dev = torch.device(args.device)
    amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16

    torch.manual_seed(args.seed)
    model = make_model().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    reg = tr.Regularizer(
        model,
        [
            tr.L2(L2, mode="decoupled"),  # AdamW's decay, here on weights only (not biases)
            tr.L1(L1, on=tr.select.name("0.weight"), mode="grad"),  # added to g inside step()
        ],
    )
    reg.attach(opt)
    scaler = torch.amp.GradScaler(dev.type)

    # the independent reference: no regularizer; AdamW's weight_decay on the weights only,
    # and λ·sign(θ) added by hand to the unscaled gradient of 0.weight, once per real step
    twin = copy.deepcopy(model)
    named = dict(twin.named_parameters())
    decayed = [n for n in named if n.endswith("weight")]
    assert decayed == [n for n, _ in tr.select.weights.resolve(model)], decayed
    opt_twin = torch.optim.AdamW(
        [
            {"params": [named[n] for n in decayed], "weight_decay": L2},
            {"params": [p for n, p in named.items() if n not in decayed], "weight_decay": 0.0},
        ],
        lr=LR,
    )
    scaler_twin = torch.amp.GradScaler(dev.type)
    steps_matching = 0

    g = torch.Generator(device="cpu").manual_seed(args.seed)
    w_true = torch.randn(32, 1, generator=g)
    poisoned = steps // 2  # this step gets an infinite loss: GradScaler skips it
    skipped_ok = False
    for step in range(steps):
        step_loss = 0.0  # the mean loss over this step's micro-batches, of `model`
        for micro in range(ACCUM):
            x = torch.randn(16, 32, generator=g).to(dev)
            y = (x.cpu() @ w_true).to(dev)
            for m, sc in ((model, scaler), (twin, scaler_twin)):
                with torch.autocast(dev.type, dtype=amp_dtype):
                    loss = nn.functional.mse_loss(m(x).float(), y) / ACCUM
                if step == poisoned and micro == 0:
                    loss = loss * float("inf")
                sc.scale(loss).backward()
                if m is model:
                    step_loss += loss.item()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)  # the rules run inside, once — or not at all if the step is skipped
        scaler.update()
        opt.zero_grad(set_to_none=True)
        scaler_twin.unscale_(opt_twin)
        with torch.no_grad():
            named["0.weight"].grad.add_(torch.sign(named["0.weight"]), alpha=L1)
        scaler_twin.step(opt_twin)  # AdamW: θ ← θ·(1 − lr·λ), then its update; skipped if inf
        scaler_twin.update()
        opt_twin.zero_grad(set_to_none=True)
        steps_matching += all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
        if step == poisoned:
            skipped_ok = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
            print(f"step {step:3d}  poisoned: skipped by GradScaler, parameters unchanged: {skipped_ok}")
        elif step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {step_loss:.4f}  R(θ) {reg.value().item():.4f}")

    applied = reg.step  # steps the rules were applied on
    print(f"\noptimizer steps {steps}, micro-batches {steps * ACCUM}, regularizer applied {applied} times")
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), twin.parameters()))
    print(
        f"bit-identical to the hand-regularized twin after {steps_matching} of {steps} steps "
        f"(max |difference| at the end {diff:.2e})"
    )
    ok = skipped_ok and steps_matching == steps and applied == steps - 1
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
