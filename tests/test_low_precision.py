"""bf16/fp16 parameters are regularized in their own dtype with fp32 math (DESIGN §3):
every path (fast kernels, reference loop, tensor lr) gives the fp32 result rounded once."""

import pytest
import torch
from torch import nn

import torch_regularizers as tr

DTYPES = [torch.bfloat16, torch.float16]
PATHS = ["foreach", "reference", "tensor-eta"]


def _run(op, xs, eta, path):
    if path == "tensor-eta":
        op(xs, eta=torch.tensor(eta))
    else:
        op(xs, eta=eta, impl=path)


def _data(dtype):
    g = torch.Generator().manual_seed(0)
    # mixed sizes: tiny tensors and one large one take different kernel routes
    return [torch.randn(n, generator=g).to(dtype) for n in (7, 1024, 3, 70_000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lam_eta", [(3.0, 1e-3), (0.5, 0.02)])
def test_l2_decay_and_prox_are_fp32_math_rounded_once(dtype, path, lam_eta):
    lam, eta = lam_eta
    xs = _data(dtype)
    a = [x.clone() for x in xs]
    _run(tr.L2(lam).decay_, a, eta, path)
    for x, y in zip(xs, a):
        assert torch.equal(y, (x.float() * (1 - eta * lam)).to(dtype))
    b = [x.clone() for x in xs]
    _run(tr.L2(lam).prox_, b, eta, path)
    for x, y in zip(xs, b):
        assert torch.equal(y, (x.float() / (1 + eta * lam)).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_l1_prox_is_fp32_soft_threshold_rounded_once(dtype, path):
    lam, eta = 0.37, 0.013  # t = 0.00481: not representable in bf16/fp16
    xs = _data(dtype)
    a = [x.clone() for x in xs]
    _run(tr.L1(lam).prox_, a, eta, path)
    t = eta * lam
    for x, y in zip(xs, a):
        w = x.float()
        expect = (torch.sign(w) * torch.clamp(w.abs() - t, min=0)).to(dtype)
        assert torch.equal(y, expect)
        assert ((w.abs() <= t) == (y == 0)).all()  # exact zeros exactly where |θ| ≤ t


@pytest.mark.parametrize("foreach", [False, True])
def test_decoupled_l2_on_bf16_matches_single_tensor_adamw(foreach):
    """torch's single-tensor AdamW computes θ·(1 − lr·λ) in fp32; (its foreach path rounds
    the factor to the parameter dtype first, a 30 % error for lr·λ = 3e-3 in bf16).
    Adam + the decoupled L2 rule must give AdamW's weights bit for bit, whichever Adam path
    (foreach or single-tensor) runs the Adam part.
    (fp16 Adam itself overflows with eps=1e-8, so only bf16 here.)"""
    dtype = torch.bfloat16
    torch.manual_seed(0)
    a = nn.Linear(64, 32).to(dtype)
    b = nn.Linear(64, 32).to(dtype)
    plain = nn.Linear(64, 32).to(dtype)
    b.load_state_dict(a.state_dict())
    plain.load_state_dict(a.state_dict())
    oa = torch.optim.AdamW(a.parameters(), lr=1e-3, weight_decay=3.0, foreach=False)
    ob = torch.optim.Adam(b.parameters(), lr=1e-3, foreach=foreach)
    op = torch.optim.Adam(plain.parameters(), lr=1e-3, foreach=foreach)
    tr.Regularizer(b, [tr.L2(3.0, mode="decoupled", on=tr.select.all)]).attach(ob)
    x = torch.randn(16, 64).to(dtype)
    for _ in range(5):
        for m, o in ((a, oa), (b, ob), (plain, op)):
            o.zero_grad()
            m(x).float().pow(2).mean().backward()
            o.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{n}: max |diff| = {(p.float() - q.float()).abs().max():.3e}"
    # guard: the decay has a visible effect at this precision (else the check is vacuous)
    for (n, q), r in zip(b.named_parameters(), plain.parameters()):
        assert not torch.equal(q, r), f"{n}: the decoupled decay changed nothing"


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoupled_l2_factor_is_not_rounded_to_low_precision(dtype):
    """θ·(1 − lr·λ) in fp32, rounded once: a factor rounded to the parameter dtype first
    (bf16(0.997) = 0.99609375) or a product in low precision gives other weights."""
    lr, lam = 1e-3, 3.0
    w = nn.Linear(256, 256, bias=False).to(dtype)
    with torch.no_grad():
        w.weight.copy_(torch.randn(256, 256, generator=torch.Generator().manual_seed(0)))
    w0 = w.weight.detach().clone()
    o = torch.optim.SGD(w.parameters(), lr=lr)
    tr.Regularizer(w, [tr.L2(lam, mode="decoupled")]).attach(o)
    w.weight.grad = torch.zeros_like(w.weight)
    o.step()
    expect = (w0.float() * (1 - lr * lam)).to(dtype)
    assert torch.equal(w.weight.detach(), expect)
    # guards: the reference is distinguishable from a rounded factor and from no decay
    rounded_factor = w0 * torch.tensor(1 - lr * lam, dtype=dtype)
    assert not torch.equal(expect, rounded_factor)
    assert not torch.equal(expect, w0)
