"""metric="adaptive" prox (ProxGen) and stochastic rounding, against formulas written out here."""

import copy
import math

import pytest
import torch
from torch import nn

import torch_regularizers as tr


def _data(n=32, d=6, k=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, k, generator=g, dtype=dtype)


def _soft(x, t):
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.9, 0.99), eps=1e-6),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.0, amsgrad=True),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, eps=1e-5),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.01),
    ],
    ids=["adam", "adamw-amsgrad", "rmsprop", "rmsprop-centered", "adagrad"],
)
@pytest.mark.parametrize("pen", ["l1", "elasticnet"])
def test_adaptive_prox_threshold_is_lr_over_preconditioner(make_opt, pen):
    X, Y = _data()
    torch.manual_seed(1)
    a = nn.Linear(6, 3, bias=False).double()
    b = nn.Linear(6, 3, bias=False).double()
    b.load_state_dict(a.state_dict())
    lam, rho = 0.02, 0.7
    rule = (
        tr.L1(lam, mode="prox", metric="adaptive")
        if pen == "l1"
        else tr.ElasticNet(lam, rho, mode="prox", metric="adaptive")
    )
    oa, ob = make_opt(a.parameters()), make_opt(b.parameters())
    tr.Regularizer(a, [rule]).attach(oa)
    for _ in range(6):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            ((m(X) - Y) ** 2).mean().backward()
            o.step()
        # reference: the written-out ProxGen threshold from b's own optimizer state
        g = ob.param_groups[0]
        s = ob.state[b.weight]
        if isinstance(ob, torch.optim.Adagrad):
            lr = g["lr"] / (1 + (s["step"].item() - 1) * g["lr_decay"])
            denom = s["sum"].sqrt() + g["eps"]
        elif isinstance(ob, torch.optim.RMSprop):
            lr = g["lr"]
            v = s["square_avg"]
            if g["centered"]:
                v = v - s["grad_avg"] ** 2
            denom = v.sqrt() + g["eps"]
        else:
            lr = g["lr"]
            v = s["max_exp_avg_sq"] if g["amsgrad"] else s["exp_avg_sq"]
            denom = (v / (1 - g["betas"][1] ** s["step"].item())).sqrt() + g["eps"]
        t = lr / denom
        with torch.no_grad():
            if pen == "l1":
                b.weight.copy_(_soft(b.weight, t * lam))
            else:
                b.weight.copy_(_soft(b.weight, t * lam * rho) / (1 + t * lam * (1 - rho)))
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-10, atol=1e-12)
        # both now hold the same value; keep the optimizer states identical too
        ob.load_state_dict(copy.deepcopy(oa.state_dict()))
        with torch.no_grad():
            b.weight.copy_(a.weight)


def test_adaptive_metric_rejects_unsupported_optimizer_and_modes():
    m = nn.Linear(3, 2)
    reg = tr.Regularizer(m, [tr.L1(0.1, mode="prox", metric="adaptive", name="sparse")])
    with pytest.raises(ValueError, match="sparse.*SGD"):
        reg.attach(torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="metric"):
        tr.L1(0.1, mode="grad", metric="adaptive")
    with pytest.raises(ValueError, match="metric"):
        tr.L1(0.1, mode="prox", metric="riemann")


def test_bf16_decay_without_stochastic_rounding_stalls_and_with_it_keeps_expectation():
    lr, lam, steps = 1e-3, 1e-2, 200  # lr·λ = 1e-5: far below half a bf16 ulp at 1.0
    expected = (1 - lr * lam) ** steps

    def run(sr):
        torch.manual_seed(0)
        m = nn.Linear(256, 256, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            m.weight.fill_(1.0)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        tr.Regularizer(m, [tr.L2(lam, mode="decoupled", stochastic_rounding=sr)]).attach(opt)
        for _ in range(steps):
            m.weight.grad = torch.zeros_like(m.weight)
            opt.step()
        return m.weight.float()

    plain = run(False)
    assert torch.equal(plain, torch.ones_like(plain))  # plain bf16 never moves
    w = run(True)
    # mean of 65536 independent unbiased roundings: standard error ≈ ulp/√n ≪ 2e-4
    assert abs(w.mean().item() - expected) < 2e-4
    assert w.dtype == torch.float32 and not torch.equal(w, torch.ones_like(w))


def test_stochastic_rounding_only_with_decoupled_or_prox():
    with pytest.raises(ValueError, match="stochastic_rounding"):
        tr.L1(0.1, mode="grad", stochastic_rounding=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_is_unbiased_and_brackets(dtype):
    from torch_regularizers._precision import stochastic_round_

    x = torch.linspace(-3, 3, 4001, dtype=torch.float32) * math.pi
    reps = torch.stack([stochastic_round_(torch.empty(x.shape, dtype=dtype), x).float() for _ in range(200)])
    # the two grid neighbours of x, found independently of the implementation
    near = x.to(dtype)
    lower = torch.where(near.float() > x, torch.nextafter(near, torch.tensor(-torch.inf, dtype=dtype)), near)
    upper = torch.where(near.float() < x, torch.nextafter(near, torch.tensor(torch.inf, dtype=dtype)), near)
    assert ((reps == lower.float()) | (reps == upper.float())).all()
    # unbiased: the mean of 200 draws is close to x (a biased nearest rounding would not
    # pass for values near the midpoint of two neighbours)
    gap = (upper.float() - lower.float()).clamp_min(1e-30)
    z = (reps.mean(0) - x).abs() / gap
    assert z.max() < 0.2  # 200 Bernoulli draws: standard error ≤ 0.036 gap
    mid = ((x - lower.float()) / gap - 0.5).abs() < 0.05
    assert mid.any() and ((reps[:, mid] == lower.float()[mid]).float().mean() - 0.5).abs() < 0.05
