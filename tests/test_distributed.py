"""Distributed training (DESIGN §6): DDP, FSDP2 (DTensor parameters) and FSDP1, 2 ranks, gloo, CPU.

Two worker processes (``_dist_worker.py``) run every scenario once (a module fixture) and
save what they saw; the tests here compare it with independent references:

* rule checks on sharded weights: plain torch, float64, on the *full* tensor, written out
  from the formulas (DESIGN §1) — value, ``stats()``, the grad-mode gradient, the decoupled
  step, the prox step, the constraint projection, ``penalty()`` and its autograd gradient;
* training runs (DDP, FSDP2, FSDP1): the same model, rules and optimizer in this process on
  the full batch (each rank trains on half of it; both wrappers average gradients).
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
from _dist_common import (
    check_params,
    close,
    launch,
    reference,
    scenario,
    single_process,
)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

WORLD = 2
LR = W.LR


# --------------------------------------------------------------------------- the two ranks
@pytest.fixture(scope="module")
def runs():
    """Start both ranks once; {rank: {scenario: results}}."""
    return launch("_dist_worker.py", WORLD, timeout=180)



def rule_keys():
    """(weight name, label, mode, impl) of every rule check the worker runs."""
    keys = []
    for wname, w in W.weights().items():
        if wname == "W10x12":
            continue
        for label, _, modes in W.rule_cases(tr, wname, w):
            for mode in modes:
                for impl in ("foreach", "reference"):
                    keys.append((wname, label, mode, impl))
    return keys


RULE_KEYS = rule_keys()


# --------------------------------------------------------------------------- FSDP2: rule checks
def test_group_lasso_value_is_sum_of_column_norms_not_the_norm_partial_trap(runs):
    """DESIGN §6's example: a 10×12 weight sharded by rows, column groups (dim=0)."""
    res = scenario(runs, "fsdp2_rules")
    w = W.weights()["W10x12"].double()
    expected = torch.linalg.vector_norm(w, dim=0).sum().item()  # Σ of the 12 column norms
    assert expected == pytest.approx(37.7959, abs=1e-4)
    for r in range(WORLD):
        got = scenario(runs, "fsdp2_rules", r)["W10x12/colnorm_sum"]
        assert got == pytest.approx(expected, rel=1e-6)
    # for the record: the naive DTensor expression (torch 2.13 gives √Σ_rank(s²), 36.81)
    wrong = math.sqrt(sum(torch.linalg.vector_norm(c, dim=0).sum().item() ** 2 for c in w.chunk(2)))
    print(
        f"group lasso Σ column norms: {res['W10x12/colnorm_sum']:.4f} (correct {expected:.4f}; "
        f"naive DTensor {res['naive_colnorm_sum']:.4f}, √Σ_rank(s²) = {wrong:.4f})"
    )


def test_weights_are_sharded_by_rows(runs):
    res = scenario(runs, "fsdp2_rules")
    for wname in W.weights():
        assert res[f"{wname}/placements"] == "(Shard(dim=0),)"
    rows = [scenario(runs, "fsdp2_rules", r)["U7x12/local_rows"] for r in range(WORLD)]
    assert rows == [4, 3]  # uneven shards


@pytest.mark.parametrize("wname,label,mode,impl", RULE_KEYS, ids=["/".join(k) for k in RULE_KEYS])
def test_rule_on_sharded_weight_equals_unsharded(runs, wname, label, mode, impl):
    w32 = W.weights()[wname]
    w, g0, ref_w = w32.double(), W.grad_for(w32).double(), W.reference_for(w32).double()
    R = reference(label, w, ref_w)
    key = f"{wname}/{label}/{mode}/{impl}"
    for rank in range(WORLD):
        res = scenario(runs, "fsdp2_rules", rank)[key]
        if isinstance(res, str):
            pytest.fail(f"rank {rank}: {res}")
        assert res["param_is_dtensor"]
        where = f"rank {rank} {key}"
        if "value" in R:
            close(res["value"], R["value"](w), msg=f"{where} value()")
        stats = {k.split("/", 1)[1]: v for k, v in res["stats"].items()}
        exp_stats = R["stats"](w)
        assert set(exp_stats) <= set(stats), (where, stats)
        for k, v in exp_stats.items():
            close(stats[k], v, msg=f"{where} stats {k}")
        if mode == "grad":
            close(res["grad"], g0 + R["grad"](w), msg=f"{where} grad")
            close(res["param"], w, rtol=0, atol=0, msg=f"{where} param untouched")
        elif mode == "decoupled":
            close(res["param"], w - LR * R["grad"](w), msg=f"{where} decoupled step")
        elif mode == "prox":
            close(res["param"], R["prox"](w, LR), msg=f"{where} prox step")
        elif mode == "constraint":
            close(res["param"], R["project"](w), msg=f"{where} projection")
        elif mode == "loss":
            assert not res["penalty_is_dtensor"]
            close(res["penalty"], R["value"](w), msg=f"{where} penalty()")
            close(res["penalty_grad"], R["grad"](w), msg=f"{where} d penalty / dθ")
        if label == "l2sp":
            assert res["ref_is_dtensor"] and res["ref_placements"] == "(Shard(dim=0),)"
            close(res["ref_full"], ref_w, rtol=0, atol=0, msg=f"{where} reference")


def test_l2sp_explicit_full_reference_is_sharded_like_the_parameter(runs):
    w32 = W.weights()["U7x12"]
    ref_w, w = W.reference_for(w32).double(), w32.double()
    for rank in range(WORLD):
        res = scenario(runs, "fsdp2_rules", rank)["l2sp_explicit"]
        if isinstance(res, str):
            pytest.fail(res)
        assert res["ref_placements"] == "(Shard(dim=0),)"
        assert res["ref_local_rows"] == [4, 3][rank]
        close(res["ref_full"], ref_w, rtol=0, atol=0)
        after = ref_w + (w - ref_w) / (1 + LR * 0.2)
        close(res["param"], after)
        close(res["value"], 0.5 * 0.2 * ((after - ref_w) ** 2).sum())


# --------------------------------------------------------------------------- training runs
def test_ddp_equals_single_process_and_ranks_agree(runs):
    r0, r1 = scenario(runs, "ddp", 0), scenario(runs, "ddp", 1)
    for n in r0["params"]:  # DDP: the same reduced gradient, the same update on every rank
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    model, reg = single_process(W.train_rules(tr))
    check_params(r0["params"], model, "DDP vs one process")
    # the regularization did something: not the unregularized run
    plain, _ = single_process([tr.L2(0.0)])
    assert not torch.allclose(plain[0].weight, model[0].weight, atol=1e-4)
    close(r0["value"], reg.value(), rtol=1e-5, atol=1e-7, msg="value()")
    for k, v in reg.stats().items():
        close(r0["stats"][k], v, rtol=1e-5, atol=1e-7, msg=f"stats {k}")


def test_ddp_selectors_see_bare_names(runs):
    res = scenario(runs, "ddp")
    assert res["weights_names"] == ["0.weight", "2.weight"]
    assert res["biases_names"] == ["0.bias", "2.bias"]
    assert res["summary_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_fsdp2_training_equals_single_process(runs):
    r0, r1 = scenario(runs, "fsdp2_train", 0), scenario(runs, "fsdp2_train", 1)
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    model, reg = single_process(W.train_rules(tr))
    check_params(r0["params"], model, "FSDP2 vs one process", atol=5e-6)
    assert r0["step"] == reg.step == 3
    close(r0["value"], reg.value(), rtol=1e-5, atol=1e-7, msg="value()")
    stats = reg.stats()
    assert set(r0["stats"]) == set(stats)
    for k, v in stats.items():
        close(r0["stats"][k], v, rtol=1e-5, atol=1e-6, msg=f"stats {k}")
    # group prox zeroed whole columns of 2.weight in both runs, at the same places
    zero_cols = (model[2].weight == 0).all(dim=0)
    assert torch.equal((r0["params"]["2.weight"] == 0).all(dim=0), zero_cols)


def test_fsdp2_root_module_parameters_unsharded_mid_step_stay_bound(runs):
    """Only the root is ``fully_shard``-ed: between forward and backward its parameters are
    FSDP2's unsharded ones. ``reg.penalty()`` there must not rebind the rules to them, or
    ``optimizer.step()`` would regularize nothing (every non-loss rule lost, silently)."""
    r0 = scenario(runs, "fsdp2_root_train", 0)
    model, reg = single_process(W.train_rules(tr))
    check_params(r0["params"], model, "FSDP2 (root only) vs one process", atol=5e-6)
    assert r0["step"] == reg.step == 3
    close(r0["value"], reg.value(), rtol=1e-5, atol=1e-7, msg="value()")
    for k, v in reg.stats().items():
        close(r0["stats"][k], v, rtol=1e-5, atol=1e-6, msg=f"stats {k}")


def test_fsdp1_elementwise_rules_equal_single_process(runs):
    r0 = scenario(runs, "fsdp1", 0)
    r1 = scenario(runs, "fsdp1", 1)
    # use_orig_params=True: the original parameters are 1-D slices of the flat shard
    assert all(len(s) == 1 for s in r0["local_shapes"].values()), r0["local_shapes"]
    model, reg = single_process(W.elementwise_rules(tr), opt_cls=torch.optim.SGD)
    check_params(r0["params"], model, "FSDP1 vs one process")
    check_params(r1["params"], model, "FSDP1 vs one process (rank 1)")
    assert (model[2].bias >= 0).all()  # NonNeg acted
    assert (model[0].weight == 0).any()  # L1 prox made exact zeros
    # value() of FSDP1 flat parameters is each rank's own shards' (not reduced): their sum
    # is the unsharded value
    close(r0["value"] + r1["value"], reg.value(), rtol=1e-5, atol=1e-6, msg="Σ_rank value()")
    assert abs(r0["value"] - r1["value"]) > 1e-6


@pytest.mark.parametrize("label", ["grouplasso", "maxnorm", "orthogonal", "flat_grouplasso"])
def test_fsdp1_shape_rules_raise_clear_error(runs, label):
    msg = scenario(runs, "fsdp1")["errors"][label]
    assert msg is not None, f"{label}: no error"
    assert "FSDP1" in msg and "fully_shard" in msg and "elementwise" in msg, msg


def test_fsdp1_default_selector_explains_flat_shapes_and_flat_l1_works(runs):
    res = scenario(runs, "fsdp1")
    msg = res["errors"]["default_selector"]
    assert msg is not None and "selects no parameter" in msg and "FSDP1 flattens" in msg, msg
    assert res["flat_names"] == ["_flat_param"]
    assert res["errors"]["flat_l1"] is None
