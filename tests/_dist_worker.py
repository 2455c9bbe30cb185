"""One rank of the distributed tests (``tests/test_distributed.py`` starts two).

``python _dist_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR`` joins a gloo process group
(file rendezvous: no port to pick), runs every scenario and saves what it saw to
``OUT_DIR/rank{RANK}.pt``: a dict scenario -> results (full tensors, floats, messages),
or ``"ERROR: <traceback>"`` for a scenario that raised. The test process compares these
with references it computes itself, from the full tensors, with plain torch.

The inputs are made here and in the test by the same functions (``weights``, ``batch``,
``mlp``), from fixed seeds.
"""

from __future__ import annotations

import math
import os
import sys
import traceback

import torch
from torch import nn

LR = 0.1


# --------------------------------------------------------------------------- shared inputs
def weights() -> dict[str, torch.Tensor]:
    """The tensors the rule checks run on (all sharded by rows over 2 ranks).

    ``W10x12``: DESIGN §6's example (Σ of column norms 37.80; the naive DTensor value is
    36.81). ``Z10x12``: with an all-zero row, an all-zero column and scattered zeros.
    ``U7x12``: 7 rows, sharded unevenly (4 + 3). ``C8x3x4``: a conv-like 3-D weight.
    """
    torch.manual_seed(0)
    w = torch.randn(10, 12)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(10, 12, generator=g)
    z[3] = 0
    z[:, 5] = 0
    z[z.abs() < 0.15] = 0
    u = torch.randn(7, 12, generator=g)
    u[:, 2] = 0
    u[6] = 0
    c = torch.randn(8, 3, 4, generator=g)
    c[1] = 0
    c[:, 2] = 0
    return {"W10x12": w, "Z10x12": z, "U7x12": u, "C8x3x4": c}


def grad_for(w: torch.Tensor) -> torch.Tensor:
    """A fixed 'data gradient' for a weight of this shape."""
    g = torch.Generator().manual_seed(7 + w.numel())
    return torch.randn(w.shape, generator=g)


def reference_for(w: torch.Tensor) -> torch.Tensor:
    """An L2-SP reference (the 'pre-trained' weights) for a weight of this shape."""
    g = torch.Generator().manual_seed(11 + w.numel())
    return w + 0.3 * torch.randn(w.shape, generator=g)


def mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 12, generator=g), torch.randn(8, 6, generator=g)


def train_rules(tr) -> list:
    """Rules of the end-to-end runs: every mode (the loss-mode ones through ``reg.penalty()``),
    elementwise and group rules, a constraint."""
    s = tr.select
    return [
        tr.L2(1e-2, on=s.name("0.weight"), mode="grad"),
        tr.L1(2e-2, on=s.name("0.weight"), mode="prox", metric="adaptive"),
        tr.GroupLasso(3e-2, dim=0, on=s.name("0.weight"), mode="loss"),
        tr.Orthogonal(1e-2, on=s.name("2.weight"), mode="loss"),
        tr.GroupLasso(5e-2, dim=0, on=s.name("2.weight"), mode="prox"),
        tr.SparseGroupLasso(2e-2, 0.3, on=s.name("2.weight"), mode="grad"),
        tr.ElasticNet(5e-2, 0.5, on=s.name("2.weight"), mode="decoupled"),
        tr.L2SP(0.5, on=s.biases, mode="decoupled"),
        tr.MaxNorm(0.9, dim=1, on=s.name("0.weight")),
        # the modern-decay options on DTensors: cautious (θ kept on the local shards), AdamC
        # coupling, an EMA reference sharded like its parameter
        tr.L2(1e-2, on=s.name("2.weight"), mode="decoupled", cautious=True, lr_coupling="corrected"),
        tr.L2SP(0.3, reference="ema", ema_decay=0.9, on=s.name("0.bias"), mode="grad"),
    ]


def elementwise_rules(tr) -> list:
    s = tr.select
    return [
        tr.L2(1e-2, on=s.name("*.weight"), mode="grad"),
        tr.L1(2e-2, on=s.name("0.weight"), mode="prox"),
        tr.ElasticNet(5e-2, 0.5, on=s.name("2.weight"), mode="decoupled"),
        tr.L2SP(0.5, on=s.biases, mode="decoupled"),
        tr.NonNeg(on=s.name("2.bias")),
    ]


def rule_cases(tr, name: str, w: torch.Tensor) -> list[tuple[str, object, tuple[str, ...]]]:
    """(label, factory(mode), modes) of the rules checked on weight ``name``.

    **The one list of every placement test**: FSDP2 ``Shard(0)`` on 2 ranks
    (``test_distributed.py``) and every layout of the 4-rank 2-D mesh, uneven and
    ``_StridedShard`` ones included (``test_distributed_mesh.py``). A new rule joins all of
    them with one entry here and its plain-torch math in ``_dist_common.reference`` (keyed
    by the label before ``[``). Labels ``orthogonal``/``fn`` may all-gather (see
    ``_dist_worker_mesh.gathers_all``); every other rule is checked to never all-gather.
    Not here yet: the norm-control constraints of the modern-decay issue (``FixedNorm``,
    ``SpectralNorm`` in constraints.py) — add them as above (``SpectralNorm`` needs the whole
    matrix: list it in ``gathers_all`` too).
    """
    cases: list[tuple[str, object, tuple[str, ...]]] = []
    dims = [None, 0] if w.dim() == 2 else [None, (0, 2)]
    for d in dims:
        cases += [
            (
                f"grouplasso[{d}]",
                lambda m, d=d: tr.GroupLasso(0.3, dim=d, mode=m),
                ("grad", "decoupled", "prox", "loss"),
            ),
            (
                f"sgl[{d}]",
                lambda m, d=d: tr.SparseGroupLasso(0.3, 0.4, dim=d, mode=m),
                ("grad", "decoupled", "prox", "loss"),
            ),
            (f"maxnorm[{d}]", lambda m, d=d: tr.MaxNorm(1.5, dim=d), ("constraint",)),
            (f"unitnorm[{d}]", lambda m, d=d: tr.UnitNorm(dim=d), ("constraint",)),
        ]
    if name == "C8x3x4":
        return cases
    cases += [
        ("l1", lambda m: tr.L1(0.05, mode=m), ("grad", "decoupled", "prox", "loss")),
        ("l2", lambda m: tr.L2(0.1, mode=m), ("grad", "decoupled", "prox", "loss")),
        (
            "elasticnet",
            lambda m: tr.ElasticNet(0.1, 0.3, mode=m),
            ("grad", "decoupled", "prox", "loss"),
        ),
        ("l2sp", lambda m: tr.L2SP(0.2, mode=m), ("grad", "decoupled", "prox", "loss")),
        ("orthogonal", lambda m: tr.Orthogonal(0.05, mode=m), ("grad", "decoupled", "loss")),
        ("fn", lambda m: tr.Penalty.from_fn(row_sum_sq, 0.1, mode=m), ("grad", "loss")),
        ("nonneg", lambda m: tr.NonNeg(), ("constraint",)),
    ]
    return cases


def row_sum_sq(w: torch.Tensor) -> torch.Tensor:
    """A penalty that is not elementwise: Σ_i (Σ_j w_ij)²."""
    return (w.sum(dim=1) ** 2).sum()


class Holder(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(w.clone())


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------- scenarios
def fsdp2_rules(tr, rank: int) -> dict:
    """Every rule, mode and impl on DTensor weights (``fully_shard``, Shard(0))."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    out: dict = {}

    def dt(x):  # this rank's shard, no communication
        return distribute_tensor(x, mesh, [Shard(0)], src_data_rank=None)

    for wname, w in weights().items():
        mod = Holder(reference_for(w))  # L2-SP's default reference: the weights at construction
        fully_shard(mod, mesh=mesh)
        p = mod.weight
        out[f"{wname}/placements"] = str(p.placements)
        out[f"{wname}/local_rows"] = p.to_local().shape[0]
        g0 = grad_for(w)
        if wname == "W10x12":  # the DESIGN §6 trap: what the naive DTensor expression gives
            with torch.no_grad():
                p.copy_(dt(w))
                naive = torch.linalg.vector_norm(p, dim=0).sum()
            out["naive_norm_placement"] = str(naive.placements)
            out["naive_colnorm_sum"] = float(naive.full_tensor())
            reg = tr.Regularizer(mod, [tr.GroupLasso(1 / math.sqrt(10), dim=0)])
            out["W10x12/colnorm_sum"] = float(reg.value())
            continue
        for label, make, modes in rule_cases(tr, wname, w):
            for mode in modes:
                for impl in ("foreach", "reference"):
                    key = f"{wname}/{label}/{mode}/{impl}"
                    try:
                        with torch.no_grad():
                            p.copy_(dt(reference_for(w)))
                        rule = make(mode)
                        reg = tr.Regularizer(mod, [rule], impl=impl)
                        with torch.no_grad():
                            p.copy_(dt(w))
                        p.grad = dt(g0)
                        res: dict = {"value": float(reg.value()), "stats": reg.stats()}
                        if label == "l2sp":
                            ref = rule.references["weight"]
                            res["ref_is_dtensor"] = isinstance(ref, DTensor)
                            res["ref_placements"] = str(ref.placements)
                            res["ref_full"] = full(ref)
                        if mode == "grad":
                            reg.apply_grad()
                            res["grad"] = p.grad.full_tensor()
                        elif mode == "decoupled":
                            lr = torch.tensor(LR) if impl == "reference" else LR  # tensor lr too
                            reg.apply_decoupled(lr=lr)
                        elif mode in ("prox", "constraint"):
                            reg.apply_prox(lr=LR)
                        elif mode == "loss":
                            pen = reg.penalty()
                            (gp,) = torch.autograd.grad(pen, p)
                            res["penalty"] = float(pen)
                            res["penalty_is_dtensor"] = isinstance(pen, DTensor)
                            res["penalty_grad"] = gp.full_tensor()
                        res["param"] = p.full_tensor()
                        res["param_is_dtensor"] = isinstance(p, DTensor)
                        out[key] = res
                    except Exception:
                        out[key] = "ERROR: " + traceback.format_exc()
    # an explicit, full-size L2-SP reference (a pre-trained state_dict) is sliced like the param
    try:
        w = weights()["U7x12"]
        mod = Holder(w)
        fully_shard(mod, mesh=mesh)
        rule = tr.L2SP(0.2, reference={"weight": reference_for(w)}, mode="prox")
        reg = tr.Regularizer(mod, [rule])
        ref = rule.references["weight"]
        mod.weight.grad = dt(grad_for(w))
        reg.apply_prox(lr=LR)
        sd = reg.state_dict()
        reg.load_state_dict(sd)  # DTensor references round-trip
        out["l2sp_explicit"] = {
            "ref_placements": str(ref.placements),
            "ref_local_rows": ref.to_local().shape[0],
            "ref_full": ref.full_tensor(),
            "param": mod.weight.full_tensor(),
            "value": float(reg.value()),
        }
    except Exception:
        out["l2sp_explicit"] = "ERROR: " + traceback.format_exc()
    return out


def _train(tr, model, reg_rules, rank: int, steps: int = 3, opt_cls=torch.optim.Adam) -> dict:
    x, y = batch()
    xs, ys = x.chunk(2)[rank], y.chunk(2)[rank]
    reg = tr.Regularizer(model, reg_rules)
    opt = opt_cls(model.parameters(), lr=LR)
    reg.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        (nn.functional.mse_loss(model(xs), ys) + reg.penalty()).backward()
        opt.step()
    return {"reg": reg, "opt": opt}


def fsdp2_train(tr, rank: int) -> dict:
    """An MLP under fully_shard, Adam, every mode: compared with one process on the full batch."""
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    r = _train(tr, model, train_rules(tr), rank)
    reg = r["reg"]
    return {
        "params": {n: p.full_tensor() for n, p in model.named_parameters()},
        "value": float(reg.value()),
        "stats": reg.stats(),
        "step": reg.step,
    }


def fsdp2_root_train(tr, rank: int) -> dict:
    """``fully_shard(model)`` alone: the root keeps its parameters unsharded from forward to
    backward (``reshard_after_forward=False``), right where ``reg.penalty()`` is called; the
    rules must stay bound to the sharded parameters the optimizer steps."""
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    fully_shard(model)
    r = _train(tr, model, train_rules(tr), rank)
    reg = r["reg"]
    return {
        "params": {n: p.full_tensor() for n, p in model.named_parameters()},
        "value": float(reg.value()),
        "stats": reg.stats(),
        "step": reg.step,
    }


def ddp_train(tr, rank: int) -> dict:
    """The same under DDP; selectors must see bare names through the wrapper."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(mlp())
    out = {
        "weights_names": [n for n, _ in tr.select.weights.resolve(model)],
        "biases_names": [n for n, _ in tr.select.biases.resolve(model)],
    }
    r = _train(tr, model, train_rules(tr), rank)
    reg = r["reg"]
    out.update(
        params={n: p.detach().clone() for n, p in model.module.named_parameters()},
        value=float(reg.value()),
        stats=reg.stats(),
        summary_names=[d["name"] for d in reg.summary(as_dict=True)["params"]],
    )
    return out


def fsdp1(tr, rank: int) -> dict:
    """FSDP1 flat parameters: elementwise rules with use_orig_params=True; the rest raise."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    cpu = torch.device("cpu")
    out: dict = {}
    model = FSDP(mlp(), use_orig_params=True, device_id=cpu)
    out["local_shapes"] = {n: tuple(p.shape) for n, p in model.named_parameters()}
    r = _train(tr, model, elementwise_rules(tr), rank, opt_cls=torch.optim.SGD)
    out["value"] = float(r["reg"].value())  # of this rank's flat shards only (not reduced)
    with FSDP.summon_full_params(model):
        out["params"] = {
            n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
            for n, p in model.named_parameters()
        }
    errors = {}
    for label, make in [
        ("grouplasso", lambda: tr.GroupLasso(0.1, on=tr.select.name("0.weight"))),
        ("maxnorm", lambda: tr.MaxNorm(1.0, on=tr.select.name("*.weight"))),
        ("orthogonal", lambda: tr.Orthogonal(0.1, on=tr.select.name("0.weight"))),
        ("default_selector", lambda: tr.L2(1e-4)),
    ]:
        try:
            tr.Regularizer(model, [make()])
            errors[label] = None
        except ValueError as e:
            errors[label] = str(e)
    flat = FSDP(mlp(), use_orig_params=False, device_id=cpu)
    out["flat_names"] = [n for n, _ in tr.select.all.resolve(flat)]
    try:
        tr.Regularizer(flat, [tr.GroupLasso(0.1, on=tr.select.all)])
        errors["flat_grouplasso"] = None
    except ValueError as e:
        errors["flat_grouplasso"] = str(e)
    try:  # an elementwise rule on the FlatParameter itself is fine
        tr.Regularizer(flat, [tr.L1(0.1, on=tr.select.all)])
        errors["flat_l1"] = None
    except ValueError as e:
        errors["flat_l1"] = str(e)
    out["errors"] = errors
    return out


SCENARIOS = {
    "fsdp2_rules": fsdp2_rules,
    "fsdp2_train": fsdp2_train,
    "fsdp2_root_train": fsdp2_root_train,
    "ddp": ddp_train,
    "fsdp1": fsdp1,
}


def run_scenarios(tr, rank: int, scenarios: dict, out_dir: str, *, only=None, times: bool = False) -> None:
    """Run every scenario on this rank (a failure is saved as its traceback, so one broken
    scenario does not hang the others), with a barrier after each; save the results as
    ``rank<r>.pt`` and leave the process group. Shared by every multi-process worker."""
    import time

    import torch.distributed as dist

    results: dict = {"_times": {}} if times else {}
    try:
        for name, fn in scenarios.items():
            if only and name not in only:
                continue
            t = time.perf_counter()
            try:
                results[name] = fn(tr, rank)
            except Exception:
                results[name] = "ERROR: " + traceback.format_exc()
            dist.barrier()
            if times:
                results["_times"][name] = time.perf_counter() - t
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_regularizers as tr

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    run_scenarios(tr, rank, SCENARIOS, out_dir)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
