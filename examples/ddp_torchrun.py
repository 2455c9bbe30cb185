"""DistributedDataParallel: the regularizer works unchanged.

Gradients are already averaged across ranks when ``optimizer.step()`` runs and every
rank holds the same parameters, so each rank applies the same rules to the same
values and the replicas stay identical. Rules are written for the bare model: the
DDP wrapper's ``module.`` prefix is looked through (``fc1.weight``, not
``module.fc1.weight``).

    torchrun --nproc_per_node=2 examples/ddp_torchrun.py [--quick]    # 2 CPU processes (gloo)
    python examples/ddp_torchrun.py [--quick]                          # 1 process, still DDP

Checks: (1) parameters are bit-identical on every rank after training; (2) they equal
(to float tolerance) a plain single-process run on the full batches with the same rules,
an independent reference that involves no DDP at all; (3) the rules did act: the L1 prox
left exact zeros, and the run differs from one without rules beyond that tolerance.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torch_regularizers as tr

BATCH = 64  # global batch, split across ranks


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def rules() -> list:
    return [
        tr.L2(1e-2, mode="decoupled"),
        tr.L1(1e-2, on=tr.select.name("0.weight"), mode="prox"),  # bare-model name
    ]


def data(steps: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, BATCH, 20, generator=g)
    w = torch.randn(20, 5, generator=torch.Generator().manual_seed(2))
    return x, (x @ w).argmax(-1)


def train(model: nn.Module, reg: tr.Regularizer | None, xs, ys) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if reg is not None:
        reg.attach(opt)
    for x, y in zip(xs, ys):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if reg is not None:
        reg.detach()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few steps (CI)")
    args = ap.parse_args(argv)
    steps = 20 if args.quick else 300

    launched = "RANK" in os.environ  # by torchrun
    tmp = None
    if launched:
        dist.init_process_group("gloo")
    else:  # a 1-process group, so the same code path (DDP) runs without torchrun
        tmp = tempfile.NamedTemporaryFile(suffix=".ddpinit", delete=False)
        tmp.close()
        dist.init_process_group("gloo", init_method=f"file://{tmp.name}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if BATCH % world:
        raise SystemExit(f"the global batch {BATCH} must divide by the world size {world}")
    torch.set_num_threads(1)

    xs, ys = data(steps)
    base = make_model()
    model = DDP(copy.deepcopy(base))
    reg = tr.Regularizer(model, rules())  # selectors see bare names through DDP
    if rank == 0:
        print(f"world size {world}")
        print(reg.summary())
    # each rank takes its slice of every global batch; DDP averages the gradients
    part = BATCH // world
    train(model, reg, xs[:, rank * part : (rank + 1) * part], ys[:, rank * part : (rank + 1) * part])

    # (1) identical replicas
    flat = torch.cat([p.detach().flatten() for p in model.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], t) for t in gathered)

    ok = True
    if rank == 0:
        # (2) reference: no DDP, one process, full batches, same rules
        ref = copy.deepcopy(base)
        train(ref, tr.Regularizer(ref, rules()), xs, ys)
        ref_flat = torch.cat([p.detach().flatten() for p in ref.parameters()])
        diff = (ref_flat - flat).abs().max().item()
        zeros = (model.module[0].weight == 0).float().mean().item()
        # (3) the rules acted: without them the same training ends elsewhere
        plain = copy.deepcopy(base)
        train(plain, None, xs, ys)
        plain_flat = torch.cat([p.detach().flatten() for p in plain.parameters()])
        effect = (plain_flat - flat).abs().max().item()
        print(f"\nreplicas identical on {world} rank(s): {same}")
        print(f"max |DDP − single-process reference| = {diff:.2e}; first layer exact zeros {100 * zeros:.1f}%")
        print(f"max |DDP − run without the rules| = {effect:.2e}")
        ok = (
            same
            and torch.allclose(ref_flat, flat, rtol=1e-4, atol=1e-5)
            and zeros > 0
            and not torch.allclose(plain_flat, flat, rtol=1e-4, atol=1e-5)
        )
        print("ok" if ok else "FAILED")
    status = torch.tensor([0 if ok else 1])
    dist.all_reduce(status)
    # Tear down in order: the DDP wrapper (its reducer holds the process group) first,
    # then the group once every rank got here. Skipping this can abort a gloo rank at exit.
    del model, reg
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    if tmp is not None:
        os.unlink(tmp.name)
    return int(status.item() != 0)


if __name__ == "__main__":
    sys.exit(main())
