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
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed
from torch import nn

import torch_regularizers as tr

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _dist_worker as W  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

WORLD = 2
LR = W.LR


# --------------------------------------------------------------------------- the two ranks
@pytest.fixture(scope="module")
def runs():
    """Start both ranks once; {rank: {scenario: results}}."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        src = os.path.join(os.path.dirname(HERE), "src")
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["OMP_NUM_THREADS"] = "1"
        init = os.path.join(tmp, "rendezvous")  # file rendezvous: no port to race for
        logs = [open(os.path.join(tmp, f"log{r}"), "w+") for r in range(WORLD)]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(HERE, "_dist_worker.py"),
                    str(r),
                    str(WORLD),
                    init,
                    tmp,
                ],
                env=env,
                stdout=logs[r],
                stderr=subprocess.STDOUT,
            )
            for r in range(WORLD)
        ]
        try:
            for p in procs:
                p.wait(timeout=180)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        out = {}
        for r in range(WORLD):
            path = os.path.join(tmp, f"rank{r}.pt")
            logs[r].seek(0)
            log = logs[r].read()
            logs[r].close()
            assert os.path.exists(path), (
                f"rank {r} saved nothing (exit {procs[r].returncode}):\n{log[-4000:]}"
            )
            out[r] = torch.load(path, weights_only=False)
        return out


def scenario(runs, name: str, rank: int = 0):
    res = runs[rank][name]
    if isinstance(res, str) and res.startswith("ERROR"):
        pytest.fail(f"rank {rank}, scenario {name}:\n{res}")
    return res


def close(got, exp, rtol=2e-5, atol=2e-6, msg=""):
    torch.testing.assert_close(
        torch.as_tensor(got, dtype=torch.float64),
        torch.as_tensor(exp, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{msg}: {m}",
    )


# --------------------------------------------------------------------------- plain-torch references
def red_dims(w: torch.Tensor, dim) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(1, w.dim())) if w.dim() >= 2 else tuple(range(w.dim()))
    return (dim,) if isinstance(dim, int) else tuple(dim)


def gnorm(w, dim):
    return torch.linalg.vector_norm(w, dim=red_dims(w, dim), keepdim=True)


def gsize(w, dim):
    return math.prod(w.shape[d] for d in red_dims(w, dim))


def unit(w, n):
    """w / n per group, 0 for an all-zero group."""
    return torch.where(n > 0, w / n.clamp_min(1e-300), torch.zeros_like(w))


def soft(w, t):
    return torch.sign(w) * (w.abs() - t).clamp_min(0)


def gl_prox(w, dim, t):
    n = gnorm(w, dim)
    return w * (1 - t / n.clamp_min(1e-300)).clamp_min(0)


def _autograd(fn, w):
    x = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), x)
    return g


def orth_value(x, lam):
    m = x.reshape(x.shape[0], -1)
    out = m.shape[0]
    d = m @ m.T - torch.eye(out, dtype=x.dtype)
    return lam * (d * d).sum()


def reference(label: str, w: torch.Tensor, ref_w: torch.Tensor) -> dict:
    """value(w), grad(w) = ∇R(w), prox(w, t), project(w), stats(w) of a rule label of the
    worker (float64 in, float64 out)."""
    dim = None
    if "[" in label:
        inner = label[label.index("[") + 1 : -1]
        dim = None if inner == "None" else eval(inner)  # "0" or "(0, 2)"
    kind = label.split("[")[0]
    r: dict = {}
    if kind == "grouplasso":
        lam, rs = 0.3, math.sqrt(gsize(w, dim))
        r["value"] = lambda x: lam * rs * gnorm(x, dim).sum()
        r["grad"] = lambda x: lam * rs * unit(x, gnorm(x, dim))
        r["prox"] = lambda x, t: gl_prox(x, dim, t * lam * rs)
        r["stats"] = lambda x: {
            "value": r["value"](x),
            "sparsity": (x == 0).double().mean(),
            "zero_groups": (gnorm(x, dim) == 0).sum(),
            "zero_group_fraction": (gnorm(x, dim) == 0).double().mean(),
        }
    elif kind == "sgl":
        lam, rho, rs = 0.3, 0.4, math.sqrt(gsize(w, dim))
        r["value"] = lambda x: (
            lam * rho * x.abs().sum() + lam * (1 - rho) * rs * gnorm(x, dim).sum()
        )
        r["grad"] = lambda x: (
            lam * rho * torch.sign(x) + lam * (1 - rho) * rs * unit(x, gnorm(x, dim))
        )
        r["prox"] = lambda x, t: gl_prox(soft(x, t * lam * rho), dim, t * lam * (1 - rho) * rs)
        r["stats"] = lambda x: {
            "value": r["value"](x),
            "sparsity": (x == 0).double().mean(),
            "zero_groups": (gnorm(x, dim) == 0).sum(),
            "zero_group_fraction": (gnorm(x, dim) == 0).double().mean(),
        }
    elif kind == "maxnorm":

        def mx(x):
            n = gnorm(x, dim)
            return x * torch.where(n > 1.5, 1.5 / (n + 1e-7), torch.ones_like(n))

        r["project"] = mx
        r["stats"] = lambda x: {"max_norm": gnorm(x, dim).max()}
    elif kind == "unitnorm":
        r["project"] = lambda x: x / (gnorm(x, dim) + 1e-7)
        r["stats"] = lambda x: {"max_norm": gnorm(x, dim).max()}
    elif kind == "nonneg":
        r["project"] = lambda x: x.clamp_min(0)
        r["stats"] = lambda x: {"min": x.min()}
    elif kind == "l1":
        lam = 0.05
        r["value"] = lambda x: lam * x.abs().sum()
        r["grad"] = lambda x: lam * torch.sign(x)
        r["prox"] = lambda x, t: soft(x, t * lam)
        r["stats"] = lambda x: {"value": r["value"](x), "sparsity": (x == 0).double().mean()}
    elif kind == "l2":
        lam = 0.1
        r["value"] = lambda x: 0.5 * lam * (x * x).sum()
        r["grad"] = lambda x: lam * x
        r["prox"] = lambda x, t: x / (1 + t * lam)
        r["stats"] = lambda x: {"value": r["value"](x)}
    elif kind == "elasticnet":
        a, rho = 0.1, 0.3
        r["value"] = lambda x: a * rho * x.abs().sum() + 0.5 * a * (1 - rho) * (x * x).sum()
        r["grad"] = lambda x: a * rho * torch.sign(x) + a * (1 - rho) * x
        r["prox"] = lambda x, t: soft(x, t * a * rho) / (1 + t * a * (1 - rho))
        r["stats"] = lambda x: {"value": r["value"](x), "sparsity": (x == 0).double().mean()}
    elif kind == "l2sp":
        lam = 0.2
        r["value"] = lambda x: 0.5 * lam * ((x - ref_w) ** 2).sum()
        r["grad"] = lambda x: lam * (x - ref_w)
        r["prox"] = lambda x, t: ref_w + (x - ref_w) / (1 + t * lam)
        r["stats"] = lambda x: {"value": r["value"](x)}
    elif kind == "orthogonal":
        r["value"] = lambda x: orth_value(x, 0.05)
        r["grad"] = lambda x: _autograd(lambda y: orth_value(y, 0.05), x)
        r["stats"] = lambda x: {"value": r["value"](x)}
    elif kind == "fn":
        r["value"] = lambda x: 0.1 * W.row_sum_sq(x)
        r["grad"] = lambda x: _autograd(lambda y: 0.1 * W.row_sum_sq(y), x)
        r["stats"] = lambda x: {"value": r["value"](x)}
    else:
        raise AssertionError(label)
    return r


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
def single_process(rules, opt_cls=torch.optim.Adam, steps: int = 3):
    torch.manual_seed(0)
    model = W.mlp()
    x, y = W.batch()
    reg = tr.Regularizer(model, rules)
    opt = opt_cls(model.parameters(), lr=LR)
    reg.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        (nn.functional.mse_loss(model(x), y) + reg.penalty()).backward()
        opt.step()
    return model, reg


def _check_params(got: dict, model: nn.Module, what: str, atol=2e-6):
    exp = dict(model.named_parameters())
    assert set(got) == set(exp), what
    for n, p in exp.items():
        close(got[n], p.detach(), rtol=1e-5, atol=atol, msg=f"{what} {n}")


def test_ddp_equals_single_process_and_ranks_agree(runs):
    r0, r1 = scenario(runs, "ddp", 0), scenario(runs, "ddp", 1)
    for n in r0["params"]:  # DDP: the same reduced gradient, the same update on every rank
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    model, reg = single_process(W.train_rules(tr))
    _check_params(r0["params"], model, "DDP vs one process")
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
    _check_params(r0["params"], model, "FSDP2 vs one process", atol=5e-6)
    assert r0["step"] == reg.step == 3
    close(r0["value"], reg.value(), rtol=1e-5, atol=1e-7, msg="value()")
    stats = reg.stats()
    assert set(r0["stats"]) == set(stats)
    for k, v in stats.items():
        close(r0["stats"][k], v, rtol=1e-5, atol=1e-6, msg=f"stats {k}")
    # group prox zeroed whole columns of 2.weight in both runs, at the same places
    zero_cols = (model[2].weight == 0).all(dim=0)
    assert torch.equal((r0["params"]["2.weight"] == 0).all(dim=0), zero_cols)


def test_fsdp1_elementwise_rules_equal_single_process(runs):
    r0 = scenario(runs, "fsdp1", 0)
    r1 = scenario(runs, "fsdp1", 1)
    # use_orig_params=True: the original parameters are 1-D slices of the flat shard
    assert all(len(s) == 1 for s in r0["local_shapes"].values()), r0["local_shapes"]
    model, _ = single_process(W.elementwise_rules(tr), opt_cls=torch.optim.SGD)
    _check_params(r0["params"], model, "FSDP1 vs one process")
    _check_params(r1["params"], model, "FSDP1 vs one process (rank 1)")
    assert (model[2].bias >= 0).all()  # NonNeg acted
    assert (model[0].weight == 0).any()  # L1 prox made exact zeros


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
