"""Gradient accumulation + mixed precision (``torch.amp``) + ``GradScaler``, unchanged.

The rules live in ``optimizer.step()``, so they are applied once per *real* step:

* accumulating 4 micro-batches does not apply the penalty 4 times (a loss term added to
  every micro-batch loss would, unless you remember to divide it);
* a step that ``GradScaler`` skips (inf/NaN gradients) applies nothing and is not counted;
* grad-mode terms are added after the scaler unscaled the gradients (inside ``step()``).

On CUDA the forward runs in float16 (where the scaler matters); on CPU in bfloat16.
One step is poisoned on purpose with an infinite loss to show a skipped step.

    python examples/grad_accum_amp.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import torch_regularizers as tr

ACCUM = 4  # micro-batches per optimizer step


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
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    reg = tr.Regularizer(
        model,
        [
            tr.L2(1e-2, mode="decoupled"),  # AdamW's decay, here on weights only (not biases)
            tr.L1(1e-4, on=tr.select.name("0.weight"), mode="grad"),  # added to g inside step()
        ],
    )
    reg.attach(opt)
    scaler = torch.amp.GradScaler(dev.type)

    g = torch.Generator(device="cpu").manual_seed(args.seed)
    w_true = torch.randn(32, 1, generator=g)
    poisoned = steps // 2  # this step gets an infinite loss: GradScaler skips it
    skipped_ok = False
    for step in range(steps):
        for micro in range(ACCUM):
            x = torch.randn(16, 32, generator=g).to(dev)
            y = (x.cpu() @ w_true).to(dev)
            with torch.autocast(dev.type, dtype=amp_dtype):
                loss = nn.functional.mse_loss(model(x).float(), y) / ACCUM
            if step == poisoned and micro == 0:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)  # the rules run inside, once — or not at all if the step is skipped
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if step == poisoned:
            skipped_ok = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
            print(f"step {step:3d}  poisoned: skipped by GradScaler, parameters unchanged: {skipped_ok}")
        elif step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {ACCUM * loss.item():.4f}  R(θ) {reg.value().item():.4f}")

    applied = reg.step  # steps the rules were applied on
    print(f"\noptimizer steps {steps}, micro-batches {steps * ACCUM}, regularizer applied {applied} times")
    ok = skipped_ok and applied == steps - 1
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
