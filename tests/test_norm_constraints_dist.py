"""``FixedNorm`` and ``SpectralNorm`` under FSDP2 (DTensor parameters), 2 ranks, gloo, CPU.

Two worker processes (``_dist_worker_norms.py``) run every scenario once (a module fixture)
and save what they saw; the tests compare it with references computed here, in one process,
on the full tensors: the formulas written out (w·r/‖w‖ per group; power iteration as the
textbook recurrence, float64; σ from ``torch.linalg.svdvals``), and the same training run on
the full batch.

SpectralNorm under FSDP2 is *sharded* power iteration: the matrix is never gathered — each
iteration all-reduces Wᵀu (a partial sum over the row shards) and all-gathers Wv (sharded
like the rows), two vector collectives per iteration, and nothing else. ``exact=True``
gathers the matrix for its SVD.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed
from torch import nn

import torch_regularizers as tr

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _dist_worker_norms as W  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

WORLD = 2
WARMUP = tr.constraints.WARMUP_ITERATIONS


@pytest.fixture(scope="module")
def runs():
    """Start both ranks once; {rank: {scenario: results}}."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        src = os.path.join(os.path.dirname(HERE), "src")
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["OMP_NUM_THREADS"] = "1"
        init = os.path.join(tmp, "rendezvous")
        logs = [open(os.path.join(tmp, f"log{r}"), "w+") for r in range(WORLD)]
        procs = [
            subprocess.Popen(
                [sys.executable, os.path.join(HERE, "_dist_worker_norms.py"), str(r), str(WORLD), init, tmp],
                env=env,
                stdout=logs[r],
                stderr=subprocess.STDOUT,
            )
            for r in range(WORLD)
        ]
        try:
            for p in procs:
                p.wait(timeout=120)
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
            assert os.path.exists(path), f"rank {r} saved nothing (exit {procs[r].returncode}):\n{log[-4000:]}"
            out[r] = torch.load(path, weights_only=False)
        return out


def scenario(runs, name: str, key: str | None = None, rank: int = 0):
    res = runs[rank][name]
    if isinstance(res, str) and res.startswith("ERROR"):
        pytest.fail(f"rank {rank}, scenario {name}:\n{res}")
    if key is not None:
        res = res[key]
        if isinstance(res, str) and res.startswith("ERROR"):
            pytest.fail(f"rank {rank}, {name}[{key}]:\n{res}")
    return res


def close(got, exp, rtol=2e-6, atol=1e-7):
    torch.testing.assert_close(
        torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(exp, dtype=torch.float64), rtol=rtol, atol=atol
    )


# --------------------------------------------------------------------------- references
def red(w, label):
    if label.startswith("rows"):
        return tuple(range(1, w.dim()))
    if label.startswith("cols"):
        return (0,)
    return tuple(range(w.dim()))


def fixed_ref(w, label):
    """w·r/‖w‖ per group, zero groups unchanged (float64); r from the label, or the group's
    own norm (radius=None: one projection right after construction changes nothing but
    rounding)."""
    w = w.double()
    n = torch.linalg.vector_norm(w, dim=red(w, label), keepdim=True)
    r = n if label.endswith("init") else float(label.split("_r")[1])
    return torch.where(n > 0, w * (r / torch.where(n > 0, n, 1)), w), n


def power_ref(w, u, v, n):
    """The textbook recurrence in float64 (numpy)."""
    w, u, v = (x.double().numpy() for x in (w, u, v))
    s = 0.0
    for _ in range(n):
        t = w.T @ u
        v = t / np.linalg.norm(t)
        x = w @ v
        s = np.linalg.norm(x)
        u = x / s
    return torch.from_numpy(u), torch.from_numpy(v), s


def mat(w):
    return w.double().reshape(w.shape[0], -1)


# --------------------------------------------------------------------------- FixedNorm
@pytest.mark.parametrize("wname", list(W.weights()))
@pytest.mark.parametrize("label", list(W.fixed_cases(tr)))
@pytest.mark.parametrize("impl", ["foreach", "reference"])
def test_fixed_norm_on_sharded_weights_equals_the_formula(runs, wname, label, impl):
    w = W.weights()[wname]
    exp, n0 = fixed_ref(w, label)
    for rank in range(WORLD):
        res = scenario(runs, "rules", f"{wname}/{label}/{impl}", rank)
        close(res["param"], exp)
        assert res["stats"]["fixednorm/max_norm"] == pytest.approx(
            torch.linalg.vector_norm(exp, dim=red(w, label), keepdim=True).max().item(), rel=1e-6
        )
        if label.endswith("init"):  # construction norms: DTensors, saved and restored exactly
            assert res["radius_is_dtensor"]
            close(res["saved_radius"], n0)
            assert torch.equal(res["radius_after_load"], res["saved_radius"])


# --------------------------------------------------------------------------- SpectralNorm
@pytest.mark.parametrize("wname", list(W.weights()))
@pytest.mark.parametrize("impl", ["foreach", "reference"])
def test_sharded_power_iteration_equals_the_recurrence_and_gathers_no_matrix(runs, wname, impl):
    w = W.weights()[wname]
    r0 = scenario(runs, "rules", f"{wname}/power/{impl}", 0)
    r1 = scenario(runs, "rules", f"{wname}/power/{impl}", 1)
    u, v, s = power_ref(mat(w), r0["u0"], r0["v0"], WARMUP + W.N_ITER)
    assert s > W.CAP
    p1 = w.double() * (W.CAP / s)
    close(r0["param1"], p1)
    w2 = r0["param1"].double() * 1.5
    u, v, s2 = power_ref(mat(w2), u, v, W.N_ITER)  # warm-started from the stored vectors
    close(r0["param2"], w2 * (W.CAP / s2))
    close(r0["u"], u, rtol=1e-5, atol=1e-6)
    close(r0["v"], v, rtol=1e-5, atol=1e-6)
    # the vectors are plain tensors, identical on both ranks (bit for bit)
    assert not r0["vectors_are_dtensors"]
    assert torch.equal(r0["u"], r1["u"]) and torch.equal(r0["v"], r1["v"])
    assert torch.equal(r0["param2"], r1["param2"])
    # two vector collectives per iteration, no gather of the matrix
    want = {"all_reduce": WARMUP + W.N_ITER, "all_gather_into_tensor": WARMUP + W.N_ITER}
    assert r0["comm_first"] == want
    assert r0["comm_warm"] == {k: W.N_ITER for k in want}
    assert r0["stats"]["spectralnorm/max_sigma"] <= torch.linalg.svdvals(mat(r0["param2"]))[0].item() * (1 + 1e-6)


@pytest.mark.parametrize("wname", list(W.weights()))
@pytest.mark.parametrize("impl", ["foreach", "reference"])
def test_exact_spectral_norm_on_sharded_weights_holds_the_cap(runs, wname, impl):
    w = W.weights()[wname]
    res = scenario(runs, "rules", f"{wname}/exact/{impl}", 0)
    s = torch.linalg.svdvals(mat(w))[0].item()
    close(res["param1"], w.double() * (W.CAP / s))
    for k in ("param1", "param2"):
        assert torch.linalg.matrix_norm(mat(res[k]), ord=2).item() <= W.CAP * (1 + 1e-5)
    assert res["comm_warm"].get("all_gather_into_tensor", 0) >= 1  # the matrix is gathered
    assert res["stats"]["spectralnorm/max_sigma"] == pytest.approx(W.CAP, rel=1e-5)


# --------------------------------------------------------------------------- training
def _single_process_training(steps):
    model = W.mlp()
    reg = tr.Regularizer(model, W.train_rules(tr))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    reg.attach(opt)
    x, y = W.batch()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, reg


def test_fsdp2_training_equals_single_process_and_holds_the_caps(runs):
    model, reg = _single_process_training(6)
    r0, r1 = scenario(runs, "train", rank=0), scenario(runs, "train", rank=1)
    for n, p in model.named_parameters():
        close(r0["params"][n], p.detach(), rtol=1e-4, atol=1e-5)
        assert torch.equal(r0["params"][n], r1["params"][n])
    n0 = torch.linalg.vector_norm(W.mlp()[0].weight.detach(), dim=1)
    close(torch.linalg.vector_norm(r0["params"]["0.weight"], dim=1), n0, rtol=1e-5)
    assert torch.linalg.matrix_norm(r0["params"]["2.weight"].double(), ord=2) <= W.CAP * (1 + 1e-3)
    for k, (u, v) in r0["vectors"].items():  # replicated, equal on both ranks
        assert torch.equal(u, r1["vectors"][k][0]) and torch.equal(v, r1["vectors"][k][1])
    st = reg.stats()
    for k in ("sn_exact/max_sigma", "fixednorm/max_norm"):
        assert r0["stats"][k] == pytest.approx(st[k], rel=1e-4)


def test_fsdp2_state_dict_resumes_bit_identically(runs):
    """Radii (DTensors) and power-iteration vectors saved after 6 steps: a fresh model, regularizer
    and optimizer that load them train the next 3 steps to the same bits."""
    r0 = scenario(runs, "train", rank=0)
    for n, p in r0["continued"].items():
        assert torch.equal(p, r0["resumed"][n]), n
