"""The Triton backend on a real GPU (skipped without CUDA and triton): compiled kernels on
CUDA tensors against the CPU single-tensor references, "auto" picking them, no host sync.

The compiled kernels use the reference's op sequence (explicit fma, IEEE division, no
fp-contraction; see ``test_triton_compile.py``), so float32 elementwise results are
expected bit for bit equal to the CPU reference; row groups equal the reference run with
float64-accumulated norms within 1 ulp (the float64 sums differ in order).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from test_kernels import GRAD_OPS, MIXED_SHAPES, OPS, make, op_name, ref, ref_fp32_once, run
from test_triton import (
    Launches,
    _f64_norm,
    _run_rule,
    assert_bits,
    group_data,
    group_rules,
    ulps32,
)

import torch_regularizers as tr
from torch_regularizers import kernels


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    old = kernels.get_backend()
    kernels.set_backend("auto")
    yield
    kernels.set_backend(old)


def cuda(ts):
    return None if ts is None else [t.cuda() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("key", list(OPS))
def test_elementwise_on_cuda(key, dtype, monkeypatch):
    op, c = op_name(key), OPS[key]
    ps, gs = make([(s, dtype) for s in MIXED_SHAPES] + [((70_000,), dtype)], seed=5)
    g_in = gs if op in GRAD_OPS else None
    assert kernels.backend_for(cuda(ps)) == "triton"  # "auto" on CUDA
    launches = Launches(monkeypatch)
    got = run(op, cuda(ps), cuda(g_in), c)
    assert launches.n == 1
    i = 1 if op in GRAD_OPS else 0
    want = ref(op, ps, g_in, c)[i] if dtype == torch.float32 else ref_fp32_once(op, ps, g_in, c)
    assert_bits([t.cpu() for t in got[i]], want)


@pytest.mark.parametrize("name", list(group_rules()))
def test_row_groups_on_cuda(name, monkeypatch):
    from torch_regularizers import constraints, structured

    rule, how = group_rules()[name]
    ps = group_data(torch.float32)
    monkeypatch.setattr(structured, "group_norm", _f64_norm)
    monkeypatch.setattr(constraints, "group_norm", _f64_norm)
    want = _run_rule(rule, how, ps, "reference")
    got = [t.cpu() for t in _run_rule(rule, how, cuda(ps), "foreach")]
    for a, b in zip(got, want):
        assert (ulps32(a, b) <= 1).all()


def test_no_host_sync_once_tables_are_built():
    ps = [torch.randn(s, device="cuda") for s in (1000, 300, 5)] + [torch.randn(64, 33, device="cuda")]
    gs = [torch.randn_like(p) for p in ps]
    pen, gl, mn = tr.L1(1e-3), tr.GroupLasso(1e-3), tr.MaxNorm(1.0)
    for _ in range(2):  # build the tables, compile
        pen.grad_(ps, gs, 1e-3, 1.0)
        pen.prox_(ps, 1e-3, 0.1)
        gl.prox_(ps, 1e-3, 0.1)
        mn.project_(ps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pen.grad_(ps, gs, 1e-3, 1.0)
        pen.prox_(ps, 1e-3, 0.1)
        gl.prox_(ps, 1e-3, 0.1)
        mn.project_(ps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_regularizer_on_cuda_matches_foreach():
    out = {}
    for be in ("aten", "triton"):
        kernels.set_backend(be)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Tanh(), torch.nn.Linear(48, 8)).cuda()
        reg = tr.Regularizer(model, [tr.ElasticNet(1e-2, 0.5, mode="prox"), tr.MaxNorm(2.0)])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        reg.attach(opt)
        x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        out[be] = [p.detach().cpu() for p in model.parameters()]
    for a, b in zip(out["triton"], out["aten"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
