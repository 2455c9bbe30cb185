"""DTensor placements beyond FSDP2's Shard(0): 4 gloo processes on CPU (DESIGN §6, docs/design.md §7).

Four worker processes (``_dist_worker_mesh.py``) run once (a module fixture) and save their
*local* shards; this process reassembles the full tensors from the global index of every
local element (no DTensor code involved) and compares them with the plain-torch references
of ``_dist_common.reference`` on the full tensor:

* every rule of ``_dist_worker.rule_cases`` × every mode × (both impls on the main layouts)
  on ``Shard(0)`` over 4 ranks (uneven, an empty local shard), and on a ``(dp=2, tp=2)``
  mesh: ``(Shard(0), Replicate())``, ``(Replicate(), Shard(1))``, ``(Shard(0), Shard(1))``
  (FSDP2 over a row-parallel weight) and ``(_StridedShard(0), Shard(0))`` (FSDP2 over a
  column-parallel weight): value, ``stats()``, the grad-mode gradient, the decoupled and
  prox steps, the projections, ``penalty()`` and what its backward adds to ``.grad``; elementwise and group rules
  must not all-gather;
* training: tensor parallel + FSDP2 on the 2-D mesh, and FSDP2 over 4 ranks with empty
  shards, each against one process on the full batch.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.distributed

import torch_regularizers as tr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_worker as W
import _dist_worker_mesh as M
from _dist_common import check_params, close, launch, reference, scenario, single_process

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
    pytest.mark.slow,
]

WORLD = 4
LR = W.LR


@pytest.fixture(scope="module")
def runs():
    """All four ranks, once; {rank: {scenario: results}}."""
    return launch("_dist_worker_mesh.py", WORLD, timeout=300)


def assemble(runs, layout: str, wname: str, pick, what: str) -> torch.Tensor:
    """The full float64 tensor of weight ``wname`` from every rank's local shard
    (``pick(rank) -> local tensor``), checking that every element is held by some rank and
    that replicas agree exactly."""
    w = M.weights()[wname]
    full = torch.full((w.numel(),), math.nan, dtype=torch.float64)
    seen = torch.zeros(w.numel(), dtype=torch.bool)
    for r in range(WORLD):
        idx = scenario(runs, "placements", r)["layouts"][layout]["index"][wname].reshape(-1)
        loc = pick(r).reshape(-1).to(torch.float64)
        assert loc.numel() == idx.numel(), f"{what}: rank {r} local shape differs from its index"
        again = seen[idx]
        if again.any():  # a replica: must be bit-identical to what another rank holds
            assert torch.equal(full[idx[again]], loc[again]), f"{what}: replicas differ (rank {r})"
        full[idx] = loc
        seen[idx] = True
    assert seen.all(), f"{what}: elements held by no rank"
    return full.reshape(w.shape)


def _run(runs, layout, impl, gathering, rank=0):
    key = f"{layout}/{impl}/{'gather' if gathering else 'local'}"
    res = scenario(runs, "placements", rank)["runs"][key]
    if isinstance(res, str):
        pytest.fail(f"rank {rank} {key}:\n{res}")
    return res


def check_keys():
    keys = []
    for lname in M.LAYOUT_NAMES:
        _, _, impls, wnames = M.layouts()[lname]
        for impl in impls:
            for pn, wn, label, _, mode in M.cases(tr):
                if wn in wnames:
                    keys.append((lname, impl, pn, wn, label, mode))
    return keys


CHECKS = check_keys()


# --------------------------------------------------------------------------- layouts
def test_layouts_are_what_fsdp2_over_tensor_parallel_makes(runs):
    """The worker's ``(_StridedShard(0), Shard(0))`` / ``(Shard(0), Shard(1))`` DTensors hold
    the same elements on each rank as ``fully_shard`` over ``ColwiseParallel`` /
    ``RowwiseParallel`` Linear weights (10×12)."""
    for r in range(WORLD):
        res = scenario(runs, "placements", r)
        real = res["real"]
        assert real["colwise"]["placements"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
        assert real["rowwise"]["placements"] == "(Shard(dim=0), Shard(dim=1))"
        assert torch.equal(real["colwise"]["index"], res["layouts"]["SS0_S0"]["index"]["Z10x12"])
        assert torch.equal(real["rowwise"]["index"], res["layouts"]["S0_S1"]["index"]["Z10x12"])


def test_uneven_layouts_leave_a_rank_empty(runs):
    sizes = {
        lname: [
            scenario(runs, "placements", r)["layouts"][lname]["index"]["E3x5"].numel()
            for r in range(WORLD)
        ]
        for lname in ("S0", "SS0_S0")
    }
    assert sizes["S0"] == [5, 5, 5, 0]  # 3 rows over 4 ranks
    assert 0 in sizes["SS0_S0"] and sum(sizes["SS0_S0"]) == 15
    rows = [
        scenario(runs, "placements", r)["layouts"]["S0"]["index"]["Z10x12"].shape[0]
        for r in range(WORLD)
    ]
    assert rows == [3, 3, 3, 1]


# --------------------------------------------------------------------------- every rule × layout
@pytest.mark.parametrize(
    "layout,impl,pname,wname,label,mode", CHECKS, ids=["/".join(k[:3]) for k in CHECKS]
)
def test_rule_on_layout_equals_unsharded(runs, layout, impl, pname, wname, label, mode):
    w32 = M.weights()[wname]
    w, g0, ref_w = w32.double(), W.grad_for(w32).double(), W.reference_for(w32).double()
    R = reference(label, w, ref_w)
    gathering = M.gathers_all(label)
    where = f"{layout}/{impl} {wname} {label} mode={mode}"
    res = _run(runs, layout, impl, gathering)
    for r in range(WORLD):  # every rank reports the same (global) stats
        stats = _run(runs, layout, impl, gathering, r)["stats"]
        for k, v in R["stats"](w).items():
            close(stats[f"{pname}/{k}"], v, msg=f"rank {r} {where} stats {k}")
    placements = scenario(runs, "placements")["layouts"][layout]["placements"]
    assert res["placements"][pname] == placements
    param = assemble(
        runs,
        layout,
        wname,
        lambda r: _run(runs, layout, impl, gathering, r)["params"][pname],
        where,
    )
    grad = assemble(
        runs, layout, wname, lambda r: _run(runs, layout, impl, gathering, r)["grads"][pname], where
    )
    assert res["grad_placements"][pname] == placements, (
        f"{where}: .grad is {res['grad_placements'][pname]}"
    )
    if mode in ("grad", "loss"):  # loss: penalty().backward() on top of the data gradient
        close(grad, g0 + R["grad"](w), msg=f"{where} grad")
        close(param, w, rtol=0, atol=0, msg=f"{where} param untouched")
    else:
        close(grad, g0, rtol=0, atol=0, msg=f"{where} grad untouched")
    if mode == "decoupled":
        close(param, w - LR * R["grad"](w), msg=f"{where} decoupled step")
    elif mode == "prox":
        close(param, R["prox"](w, LR), msg=f"{where} prox step")
    elif mode == "constraint":
        close(param, R["project"](w), msg=f"{where} projection")
    if label == "l2sp":
        pl, _ = res["refs"][pname]
        assert pl == placements, f"{where}: reference sharded as {pl}"
        ref = assemble(
            runs,
            layout,
            wname,
            lambda r: _run(runs, layout, impl, gathering, r)["refs"][pname][1],
            where,
        )
        close(ref, ref_w, rtol=0, atol=0, msg=f"{where} reference")


RUN_KEYS = [
    (lname, impl, gathering)
    for lname in M.LAYOUT_NAMES
    for impl in M.layouts()[lname][2]
    for gathering in (False, True)
]


@pytest.mark.parametrize(
    "layout,impl,gathering",
    RUN_KEYS,
    ids=[f"{a}/{b}/{'gather' if c else 'local'}" for a, b, c in RUN_KEYS],
)
def test_value_and_penalty_count_every_element_once(runs, layout, impl, gathering):
    """``value()`` = Σ of every penalty's unsharded value, ``penalty()`` = Σ of the loss-mode
    ones — on every rank, as plain tensors: replicated mesh dims are not summed twice."""
    wnames = M.layouts()[layout][3]
    total = loss = 0.0
    for _pn, wn, label, _, mode in M.cases(tr):
        if wn not in wnames or M.gathers_all(label) != gathering:
            continue
        w = M.weights()[wn]
        R = reference(label, w.double(), W.reference_for(w).double())
        if "value" in R:
            v = float(R["value"](w.double()))
            total += v
            loss += v if mode == "loss" else 0.0
    for r in range(WORLD):
        res = _run(runs, layout, impl, gathering, r)
        close(res["value"], total, msg=f"rank {r} value()")
        close(res["penalty"], loss, msg=f"rank {r} penalty()")
        assert not res["penalty_is_dtensor"]


@pytest.mark.parametrize("layout,impl", [(a, b) for a, b, c in RUN_KEYS if not c])
def test_elementwise_and_group_rules_never_all_gather(runs, layout, impl):
    """Values, stats, every mode's update and penalty() with its backward, of elementwise and
    group rules: reductions only (all-reduce), never a gather of the tensor."""
    for r in range(WORLD):
        assert _run(runs, layout, impl, False, r)["gathers"] == 0


# --------------------------------------------------------------------------- training
def test_tensor_parallel_fsdp2_training_equals_single_process(runs):
    r0 = scenario(runs, "tp_fsdp_train", 0)
    assert r0["placements"] == {
        "0.weight": "(_StridedShard(dim=0, sf=2), Shard(dim=0))",
        "0.bias": "(_StridedShard(dim=0, sf=2), Shard(dim=0))",
        "2.weight": "(Shard(dim=0), Shard(dim=1))",
        "2.bias": "(Shard(dim=0), Replicate())",
    }
    for r in range(1, WORLD):
        rr = scenario(runs, "tp_fsdp_train", r)
        for n in r0["params"]:
            assert torch.equal(r0["params"][n], rr["params"][n]), (r, n)
    model, reg = single_process(W.train_rules(tr))
    check_params(r0["params"], model, "TP + FSDP2 vs one process", atol=5e-6)
    assert r0["step"] == reg.step == 3
    close(r0["value"], reg.value(), rtol=1e-5, atol=1e-7, msg="value()")
    stats = reg.stats()
    assert set(r0["stats"]) == set(stats)
    for k, v in stats.items():
        close(r0["stats"][k], v, rtol=1e-5, atol=1e-6, msg=f"stats {k}")
    zero_cols = (model[2].weight == 0).all(dim=0)  # group prox zeroed the same columns
    assert torch.equal((r0["params"]["2.weight"] == 0).all(dim=0), zero_cols)


def test_uneven_fsdp2_training_with_empty_shards_equals_single_process(runs):
    """10 and 6 rows over 4 ranks: rank 3 holds no element of ``2.weight`` / ``2.bias`` and
    still joins every collective (the run would hang otherwise)."""
    r3 = scenario(runs, "uneven_train", 3)
    assert r3["local_numel"]["2.weight"] == 0 and r3["local_numel"]["2.bias"] == 0
    r0 = scenario(runs, "uneven_train", 0)
    for r in range(1, WORLD):
        rr = scenario(runs, "uneven_train", r)
        for n in r0["params"]:
            assert torch.equal(r0["params"][n], rr["params"][n]), (r, n)
    model, reg = single_process(W.train_rules(tr))
    check_params(r0["params"], model, "FSDP2 over 4 uneven ranks vs one process", atol=5e-6)
    close(r0["value"], reg.value(), rtol=1e-5, atol=1e-7, msg="value()")
    for k, v in reg.stats().items():
        close(r0["stats"][k], v, rtol=1e-5, atol=1e-6, msg=f"stats {k}")
