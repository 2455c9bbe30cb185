"""DeepSpeed ZeRO (docs/design.md §7): 2 gloo processes on CPU, DeepSpeed's CPU accelerator.

Skipped where deepspeed is not installed (``pip install deepspeed==0.19.8``; it runs on the
CPU with gloo). The workers (``_ds_worker.py``) train the MLP of the other distributed tests
under ZeRO stage 1, 2 and 3 with every mode and two param groups; the results must equal one
process on the full batch: the rules act on ZeRO's fp32 master partitions, fragment by
fragment, with the group norms of parameters cut between ranks all-reduced.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
import torch.distributed

import torch_regularizers as tr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_worker as W
import _ds_worker as D
from _dist_common import check_params, close, launch, scenario, single_process

pytestmark = [
    pytest.mark.filterwarnings("ignore:prox rules"),
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
    ),
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
    pytest.mark.slow,
]

WORLD = 2


@pytest.fixture(scope="module")
def runs():
    return launch("_ds_worker.py", WORLD, timeout=300)


def _reference():
    model = W.mlp()
    return single_process(
        D.zero_rules(tr),
        opt_cls=lambda ps, lr: torch.optim.Adam(D.param_groups(model), lr=lr),
        model=model,
    )


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_training_equals_single_process(runs, stage):
    r0, r1 = scenario(runs, f"zero{stage}", 0), scenario(runs, f"zero{stage}", 1)
    assert r0["optimizer"] == "DeepSpeedZeroOptimizer"
    # the flat partition of the weights group cuts 0.weight (120 elements) between the ranks
    assert r0["frag_0weight"] is not None and r1["frag_0weight"] is not None
    assert r0["frag_0weight"][1] < 120 and r1["frag_0weight"][1] < 120
    for n in r0["params"]:  # ZeRO all-gathers the updated partitions: identical replicas
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    model, reg = _reference()
    check_params(r0["params"], model, f"ZeRO-{stage} vs one process", atol=5e-6)
    assert r0["step"] == reg.step == 3
    close(r0["value"], reg.value(), rtol=1e-5, atol=1e-7, msg="value()")
    stats = reg.stats()
    assert set(r0["stats"]) == set(stats)
    for k, v in stats.items():
        close(r0["stats"][k], v, rtol=1e-5, atol=1e-6, msg=f"stats {k}")
    # the regularization did something: not the unregularized run
    plain, _ = single_process([tr.L2(0.0)])
    assert not torch.allclose(plain[0].weight, model[0].weight, atol=1e-4)


def test_zero_bf16_rules_act_on_fp32_masters_and_reach_the_weights(runs):
    for r in range(WORLD):
        res = scenario(runs, "zero1_bf16", r)
        assert res["dtype"] == "torch.bfloat16"
        assert torch.equal(res["w0"], torch.zeros_like(res["w0"]))  # L1 prox on the masters
        assert (res["w2_row_norms"] <= 0.5 * 1.01).all(), res[
            "w2_row_norms"
        ]  # MaxNorm (bf16 rounding)
        assert res["step"] == 2


def test_whole_tensor_rule_in_a_step_mode_is_refused(runs):
    msg = scenario(runs, "zero2")["orthogonal_grad"]
    assert msg is not None and "needs each parameter whole" in msg and "mode='loss'" in msg, msg


def test_zero3_training_equals_single_process(runs):
    r0, r1 = scenario(runs, "zero3", 0), scenario(runs, "zero3", 1)
    assert r0["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    assert r0["local_numel"] == 0  # partitioned away outside forward
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    model, reg = _reference3()
    check_params(r0["params"], model, "ZeRO-3 vs one process", atol=5e-6)
    assert r0["step"] == reg.step == 3
    for r in (r0, r1):
        close(r["value"], reg.value(), rtol=1e-5, atol=1e-7, msg="value()")
        stats = reg.stats()
        assert set(r["stats"]) == set(stats)
        for k, v in stats.items():
            close(r["stats"][k], v, rtol=1e-5, atol=1e-6, msg=f"stats {k}")


def _reference3():
    model = W.mlp()
    return single_process(
        D.zero3_rules(tr),
        opt_cls=lambda ps, lr: torch.optim.Adam(D.param_groups(model), lr=lr),
        model=model,
    )


def test_zero3_loss_mode_is_refused_with_a_clear_error(runs):
    msg = scenario(runs, "zero3")["loss_mode"]
    assert msg is not None and "ZeRO-3" in msg and "mode='grad'" in msg, msg
