"""One rank of the FSDP2 tests of ``FixedNorm`` and ``SpectralNorm``
(``tests/test_norm_constraints_dist.py`` starts two).

``python _dist_worker_norms.py RANK WORLD_SIZE INIT_FILE OUT_DIR`` joins a gloo process
group (file rendezvous), runs every scenario and saves what it saw to
``OUT_DIR/rank{RANK}.pt``: scenario -> results (full tensors, floats, counts), or
``"ERROR: <traceback>"`` for a scenario that raised. The test process computes the references
itself, in one process, from the same inputs (``weights``, ``mlp``, ``batch`` here).
"""

from __future__ import annotations

import os
import sys
import traceback

import _dist_worker as W  # the shared scenario runner (this folder is on sys.path when run)
import torch
from torch import nn

N_ITER = 2  # power iterations per step in the rule checks
CAP = 0.8


def weights() -> dict[str, torch.Tensor]:
    """``U7x12``: 7 rows, sharded unevenly (4 + 3), an all-zero row and column.
    ``C8x3x4``: a conv-like 3-D weight (matrix view 8 × 12)."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(7, 12, generator=g) * 2
    u[:, 2] = 0
    u[6] = 0
    c = torch.randn(8, 3, 4, generator=g) * 2
    c[1] = 0
    return {"U7x12": u, "C8x3x4": c}


def fixed_cases(tr) -> dict:
    return {
        "rows_r1.3": lambda: tr.FixedNorm(1.3),
        "cols_r1.3": lambda: tr.FixedNorm(1.3, dim=0),  # the reduced dim is the sharded one
        "all_r0.8": lambda: tr.FixedNorm(0.8, dim="all"),
        "rows_init": lambda: tr.FixedNorm(),
        "cols_init": lambda: tr.FixedNorm(dim=0),
    }


def mlp() -> nn.Module:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 6))
    with torch.no_grad():
        for i in (0, 2, 4):
            m[i].weight.mul_(3)  # σ well over the caps: they bind
    return m


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, 12, generator=g), torch.randn(16, 6, generator=g)


def train_rules(tr) -> list:
    s = tr.select
    return [
        tr.FixedNorm(on=s.name("0.weight")),
        tr.SpectralNorm(CAP, exact=True, on=s.name("2.weight"), name="sn_exact"),
        tr.SpectralNorm(CAP, n_power_iterations=3, on=s.name("4.weight"), name="sn_power"),
    ]


class Holder(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(w.clone())


def _counts(cm) -> dict[str, int]:
    """Collective name (``all_reduce``, ``all_gather_into_tensor``, ...) -> count."""
    return {str(k).split(".")[-1].split("'")[0]: v for k, v in cm.get_comm_counts().items()}


# --------------------------------------------------------------------------- scenarios
def rules(tr, rank: int) -> dict:
    """Each rule on a sharded weight (``fully_shard``: Shard(0)), both impls."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (2,))
    out: dict = {}
    for wname, w in weights().items():
        for impl in ("foreach", "reference"):
            for label, make in fixed_cases(tr).items():
                key = f"{wname}/{label}/{impl}"
                try:
                    mod = Holder(w)
                    fully_shard(mod, mesh=mesh)
                    rule = make()
                    reg = tr.Regularizer(mod, [rule], impl=impl)
                    reg.apply_prox(lr=0.1)
                    res = {"param": mod.weight.full_tensor().detach(), "stats": reg.stats()}
                    if rule.radius is None:
                        r = rule.radii["weight"]
                        res["radius_is_dtensor"] = isinstance(r, DTensor)
                        sd = reg.state_dict()
                        res["saved_radius"] = sd["rules"]["fixednorm"]["radius"]["weight"].full_tensor()
                        with torch.no_grad():
                            r.mul_(2)  # change it, then restore it from the state dict
                        reg.load_state_dict(sd)
                        res["radius_after_load"] = rule.radii["weight"].full_tensor()
                    out[key] = res
                except Exception:
                    out[key] = "ERROR: " + traceback.format_exc()
            for label, make in [
                ("power", lambda: tr.SpectralNorm(CAP, n_power_iterations=N_ITER)),
                ("exact", lambda: tr.SpectralNorm(CAP, exact=True)),
            ]:
                key = f"{wname}/{label}/{impl}"
                try:
                    mod = Holder(w)
                    fully_shard(mod, mesh=mesh)
                    rule = make()
                    reg = tr.Regularizer(mod, [rule], impl=impl)
                    res = {}
                    if label == "power":
                        res["u0"], res["v0"] = (x.clone() for x in rule.vectors["weight"])
                    with CommDebugMode() as cm:
                        reg.apply_prox(lr=0.1)  # the first projection: warm-up + N_ITER
                    res["comm_first"] = _counts(cm)
                    res["param1"] = mod.weight.full_tensor().detach()
                    with torch.no_grad():
                        mod.weight.mul_(1.5)
                    with CommDebugMode() as cm:
                        reg.apply_prox(lr=0.1)  # warm: N_ITER
                    res["comm_warm"] = _counts(cm)
                    res["param2"] = mod.weight.full_tensor().detach()
                    if label == "power":
                        u, v = rule.vectors["weight"]
                        res["u"], res["v"] = u.clone(), v.clone()
                        res["vectors_are_dtensors"] = isinstance(u, DTensor) or isinstance(v, DTensor)
                    res["stats"] = reg.stats()
                    out[key] = res
                except Exception:
                    out[key] = "ERROR: " + traceback.format_exc()
    return out


def train(tr, rank: int) -> dict:
    """An MLP under fully_shard, Adam, 6 steps on this rank's half of the batch; then the
    regularizer's state is saved, the model trained 3 more steps, and a second run that
    loads the saved state repeats those 3 steps."""
    from torch.distributed.fsdp import fully_shard

    def build(other_weights=False):
        model = mlp()
        if other_weights:  # other construction norms: the loaded state must restore them
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.7).add_(0.01)
        for i in (0, 2, 4):
            fully_shard(model[i])
        fully_shard(model)
        reg = tr.Regularizer(model, train_rules(tr))
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        reg.attach(opt)
        return model, reg, opt

    x, y = batch()
    xs, ys = x.chunk(2)[rank], y.chunk(2)[rank]

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()

    model, reg, opt = build()
    steps(model, opt, 6)
    out = {
        "params": {n: p.full_tensor().detach() for n, p in model.named_parameters()},
        "stats": reg.stats(),
        "vectors": {k: tuple(x.clone() for x in v) for k, v in reg._bindings[2].rule.vectors.items()},
    }
    saved = {"reg": reg.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}
    import copy

    saved = copy.deepcopy(saved)
    steps(model, opt, 3)
    out["continued"] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    model2, reg2, opt2 = build(other_weights=True)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    reg2.load_state_dict(saved["reg"])
    steps(model2, opt2, 3)
    out["resumed"] = {n: p.full_tensor().detach() for n, p in model2.named_parameters()}
    return out


SCENARIOS = {"rules": rules, "train": train}


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import torch_regularizers as tr

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    W.run_scenarios(tr, rank, SCENARIOS, out_dir)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
