"""One rank of the 4-process DTensor tests (``tests/test_distributed_mesh.py`` starts four).

``python _dist_worker_mesh.py RANK 4 INIT_FILE OUT_DIR`` joins a gloo group and runs:

* ``placements``: every rule of ``_dist_worker.rule_cases`` (elementwise, group, Orthogonal,
  ``Penalty.from_fn``, constraints — and any rule added there later) in every mode and both
  impls, on DTensor weights of every layout of :data:`LAYOUTS`: ``Shard(0)`` / ``Shard(1)``
  over 4 ranks (uneven, with empty local shards), ``Replicate`` and the mixed placements of a
  ``(dp=2, tp=2)`` mesh, ``_StridedShard`` (FSDP2 over a column-parallel weight) included.
  One Regularizer per (layout, mode, impl) holds one parameter per (weight, rule), so the
  collectives of many rules are batched as in real use (4 gloo ranks on 2 cores make each
  collective slow). Each rank saves its *local* shards and, per layout, the global flat index
  of every local element: the test reassembles the full tensors itself, without trusting any
  DTensor code. The number of all-gathers of the elementwise and group rules is counted
  (``CommDebugMode``): it must be 0.
* ``tp_fsdp_train``: an MLP with ``ColwiseParallel``/``RowwiseParallel`` on the tp dim and
  ``fully_shard`` over the dp dim, every mode, Adam, 3 steps, each dp rank on its half of the
  batch; compared with one process on the full batch.
* ``uneven_train``: ``fully_shard`` over 4 ranks of an MLP whose dims do not divide by 4
  (a rank holds empty shards): the same comparison; it must not hang.
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_worker as W

LR = W.LR


# --------------------------------------------------------------------------- shared inputs
def weights() -> dict[str, torch.Tensor]:
    """``Z10x12`` (an all-zero row and column, scattered zeros), ``C8x3x4`` (3-D, an all-zero
    output channel and kernel column) and ``E3x5`` (3 rows: Shard(0) over 4 ranks leaves
    rank 3 empty; an all-zero column)."""
    base = W.weights()
    g = torch.Generator().manual_seed(2)
    e = torch.randn(3, 5, generator=g)
    e[:, 1] = 0
    return {"Z10x12": base["Z10x12"], "C8x3x4": base["C8x3x4"], "E3x5": e}


def layouts():
    """name -> (mesh shape, placements, impls checked, weights checked).

    ``"SS0_S0"`` is what ``fully_shard`` over dp makes of a ``ColwiseParallel`` weight
    (Shard(0) on tp), ``"S0_S1"`` of a ``RowwiseParallel`` one (Shard(1) on tp), ``"S0_R"`` of
    a parameter that tensor parallelism leaves replicated (a norm, a row-parallel bias),
    ``"R_S1"`` is tensor parallelism alone. ``"S0"`` shards 4 ways: 10 rows are 3/3/3/1 and
    ``E3x5``'s 3 rows leave rank 3 empty. Both impls on the layouts whose collectives differ
    most; the default impl on the others (4 gloo ranks on 2 cores are slow).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    every = ("Z10x12", "C8x3x4", "E3x5")
    both = ("foreach", "reference")
    return {
        "S0": ((4,), (Shard(0),), both, every),
        "S0_R": ((2, 2), (Shard(0), Replicate()), ("foreach",), ("Z10x12",)),
        "R_S1": ((2, 2), (Replicate(), Shard(1)), ("foreach",), ("Z10x12", "C8x3x4")),
        "S0_S1": ((2, 2), (Shard(0), Shard(1)), both, ("Z10x12", "C8x3x4")),
        "SS0_S0": ((2, 2), (_StridedShard(0, split_factor=2), Shard(0)), both, every),
    }


LAYOUT_NAMES = ("S0", "S0_R", "R_S1", "S0_S1", "SS0_S0")


def cases(tr) -> list[tuple[str, str, str, object, str]]:
    """(param name, weight name, rule label, factory(mode), mode) of every check of one layout."""
    out = []
    for wname, w in weights().items():
        for label, make, modes in W.rule_cases(tr, wname, w):
            for mode in modes:
                pname = re.sub(r"\W+", "_", f"{wname}_{label}_{mode}").strip("_")
                out.append((pname, wname, label, make, mode))
    return out


def gathers_all(label: str) -> bool:
    """Rules allowed to all-gather: they need the whole tensor."""
    return label.split("[")[0] in ("orthogonal", "fn")


class Bag(nn.Module):
    """Parameters by name (one per rule check)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for n, t in tensors.items():
            self.register_parameter(n, nn.Parameter(t))


# --------------------------------------------------------------------------- scenarios
def _dt(x: torch.Tensor, mesh, placements):
    """The DTensor with these placements whose full value is ``x`` (local slicing, no comm)."""
    from torch.distributed.tensor import DTensor, Replicate

    rep = DTensor.from_local(x, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return rep.redistribute(mesh, placements)


def placements(tr, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    meshes = {
        (4,): init_device_mesh("cpu", (4,)),
        (2, 2): init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")),
    }
    ws = weights()
    out: dict = {"layouts": {}, "runs": {}, "real": {}}
    # what FSDP2 over TP really makes of a 10x12 Linear weight: its placements and which
    # global elements each rank holds (the index layout of "SS0_S0" / "S0_S1" must match)
    mesh2 = meshes[(2, 2)]
    for style, cls in (("colwise", ColwiseParallel), ("rowwise", RowwiseParallel)):
        lin = nn.Linear(12, 10, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.arange(120, dtype=torch.float32).reshape(10, 12))
        m = nn.Sequential(lin)
        parallelize_module(m, mesh2["tp"], {"0": cls()})
        fully_shard(m, mesh=mesh2["dp"])
        p = m[0].weight
        out["real"][style] = {
            "placements": str(tuple(p.placements)),
            "index": p.to_local().detach().to(torch.int64).clone(),
        }
    all_cases = cases(tr)
    only = os.environ.get("TR_MESH_LAYOUTS")  # for debugging: a comma-separated subset
    for lname in LAYOUT_NAMES:
        if only and lname not in only.split(","):
            continue
        shape, pls, impls, wnames = layouts()[lname]
        mesh = meshes[shape]
        info = {"placements": str(tuple(pls)), "index": {}}
        for wname in wnames:
            w = ws[wname]
            idx = torch.arange(w.numel(), dtype=torch.int64).reshape(w.shape)
            info["index"][wname] = _dt(idx, mesh, pls).to_local().clone()
        out["layouts"][lname] = info
        for impl in impls:
            for gathering in (False, True):
                key = f"{lname}/{impl}/{'gather' if gathering else 'local'}"
                sel = [c for c in all_cases if gathers_all(c[2]) == gathering and c[1] in wnames]
                t = time.perf_counter()
                try:
                    out["runs"][key] = _run(tr, mesh, pls, sel, impl, ws, CommDebugMode, DTensor)
                except Exception:
                    out["runs"][key] = "ERROR: " + traceback.format_exc()
                out.setdefault("times", {})[key] = time.perf_counter() - t
    return out


def _run(tr, mesh, pls, sel, impl, ws, CommDebugMode, DTensor) -> dict:
    """One Regularizer with every rule of ``sel`` (every mode), each on its own parameter:
    values and stats first, then each mode's operation, then the local shards."""
    model = Bag({pn: _dt(W.reference_for(ws[wn]), mesh, pls) for pn, wn, *_ in sel})
    rules = []
    for pn, _, _, make, mode in sel:
        r = make(mode)
        r.on, r.name = tr.select.name(pn), pn
        rules.append(r)
    reg = tr.Regularizer(model, rules, impl=impl)  # L2-SP references: the weights now
    params = dict(model.named_parameters())
    with torch.no_grad():
        for pn, wn, *_ in sel:
            params[pn].copy_(_dt(ws[wn], mesh, pls))
            params[pn].grad = _dt(W.grad_for(ws[wn]), mesh, pls)
    res: dict = {}
    with CommDebugMode() as comm:
        res["value"] = float(reg.value())
        res["stats"] = reg.stats()
        reg.apply_grad()
        reg.apply_decoupled(lr=torch.tensor(LR) if impl == "reference" else LR)  # a tensor lr too
        reg.apply_prox(lr=LR)  # prox rules, then constraints
        pen = reg.penalty()
        res["penalty_is_dtensor"] = isinstance(pen, DTensor)
        res["penalty"] = float(pen)
        pen.backward()  # accumulates into .grad (= the data gradient) as in training
    res["gathers"] = _count_gathers(comm)
    res["params"] = {pn: params[pn].to_local().detach().clone() for pn, *_ in sel}
    res["grads"] = {pn: params[pn].grad.to_local().clone() for pn, *_ in sel}
    res["grad_placements"] = {pn: str(tuple(params[pn].grad.placements)) for pn, *_ in sel}
    res["placements"] = {pn: str(tuple(params[pn].placements)) for pn, *_ in sel}
    res["refs"] = {}
    for pn, _, label, *_ in sel:
        if label == "l2sp":
            ref = reg.rules[pn].references[pn]
            res["refs"][pn] = (str(tuple(ref.placements)), ref.to_local().clone())
    return res


def _count_gathers(comm) -> int:
    counts = comm.get_comm_counts()
    return sum(n for op, n in counts.items() if "gather" in str(op).lower())


def _train(tr, model, rules, x, y, steps: int = 3) -> dict:
    reg = tr.Regularizer(model, rules)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    reg.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        (nn.functional.mse_loss(model(x), y) + reg.penalty()).backward()
        opt.step()
    return {
        "params": {n: p.full_tensor() for n, p in model.named_parameters()},
        "placements": {n: str(tuple(p.placements)) for n, p in model.named_parameters()},
        "local_numel": {n: p.to_local().numel() for n, p in model.named_parameters()},
        "value": float(reg.value()),
        "stats": reg.stats(),
        "step": reg.step,
    }


def tp_fsdp_train(tr, rank: int) -> dict:
    """(dp=2, tp=2): tensor parallel inside, FSDP2 over dp; each dp rank its half of the batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = W.mlp()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    x, y = W.batch()
    dp = mesh["dp"].get_local_rank()
    return _train(tr, model, W.train_rules(tr), x.chunk(2)[dp], y.chunk(2)[dp])


def uneven_train(tr, rank: int) -> dict:
    """fully_shard over 4 ranks: 10 rows shard 3/3/3/1, 6 rows 2/2/2/0 (rank 3 holds nothing
    of ``2.weight`` and ``2.bias``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (4,))
    model = W.mlp()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = W.batch()
    return _train(tr, model, W.train_rules(tr), x.chunk(4)[rank], y.chunk(4)[rank])


SCENARIOS = {
    "placements": placements,
    "tp_fsdp_train": tp_fsdp_train,
    "uneven_train": uneven_train,
}


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import torch_regularizers as tr

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    only = os.environ.get("TR_MESH_SCENARIOS")
    W.run_scenarios(tr, rank, SCENARIOS, out_dir, only=only.split(",") if only else None, times=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
