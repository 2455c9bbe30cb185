"""Issue 11, item 14: metric="adaptive" reads the metric RAdam and NAdam actually use.

Like the Adam/RMSprop/Adagrad test in ``test_metric_rounding.py``: a second model with its own
optimizer takes the same steps, and after each step its weights get the prox with the
per-coordinate threshold written out here from that optimizer's own state (torch/optim/radam.py,
torch/optim/nadam.py):

* RAdam, ρ_∞ = 2/(1−β₂) − 1, ρ_t = ρ_∞ − 2t·β₂^t/(1−β₂^t): while ρ_t ≤ 5 the step is lr·m̂
  (no preconditioner), so t_i = lr; afterwards t_i = lr·r_t·√(1−β₂^t)/(√v_i + ε) with
  r_t = √((ρ_t−4)(ρ_t−2)ρ_∞ / ((ρ_∞−4)(ρ_∞−2)ρ_t));
* NAdam: t_i = lr/(√(v_i/(1−β₂^t)) + ε), Adam's — its momentum schedule only weights g and m.
"""

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


def _radam_threshold_lr(opt, p):
    """Per-coordinate lr/D of RAdam's step just taken, and whether it was rectified."""
    g, s = opt.param_groups[0], opt.state[p]
    lr, (_, beta2), eps, t = g["lr"], g["betas"], g["eps"], s["step"].item()
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
    if rho_t <= 5:
        return torch.full_like(p, lr), False
    r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    return lr * r * math.sqrt(1 - beta2**t) / (s["exp_avg_sq"].sqrt() + eps), True


def _nadam_threshold_lr(opt, p):
    g, s = opt.param_groups[0], opt.state[p]
    t = s["step"].item()
    return g["lr"] / ((s["exp_avg_sq"] / (1 - g["betas"][1] ** t)).sqrt() + g["eps"]), None


CASES = {
    "radam": (lambda ps: torch.optim.RAdam(ps, lr=0.05, eps=1e-6), _radam_threshold_lr),
    "radam-beta2-0.99": (lambda ps: torch.optim.RAdam(ps, lr=0.05, betas=(0.8, 0.99)), _radam_threshold_lr),
    "radamw": (
        lambda ps: torch.optim.RAdam(ps, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
        _radam_threshold_lr,
    ),
    "radam-foreach": (lambda ps: torch.optim.RAdam(ps, lr=0.05, foreach=True), _radam_threshold_lr),
    "nadam": (lambda ps: torch.optim.NAdam(ps, lr=0.05, eps=1e-6), _nadam_threshold_lr),
    "nadamw": (
        lambda ps: torch.optim.NAdam(
            ps, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True, momentum_decay=0.01
        ),
        _nadam_threshold_lr,
    ),
}


@pytest.mark.filterwarnings("ignore:double weight decay")  # the *w cases: on purpose
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pen", ["l1", "elasticnet"])
def test_adaptive_prox_threshold_is_the_optimizers_own_metric(case, pen):
    make_opt, threshold_lr = CASES[case]
    X, Y = _data()
    torch.manual_seed(1)
    a = nn.Linear(6, 3, bias=False).double()
    b = copy.deepcopy(a)
    lam, rho = 0.02, 0.7
    rule = (
        tr.L1(lam, mode="prox", metric="adaptive")
        if pen == "l1"
        else tr.ElasticNet(lam, rho, mode="prox", metric="adaptive")
    )
    oa, ob = make_opt(a.parameters()), make_opt(b.parameters())
    tr.Regularizer(a, [rule]).attach(oa)
    rectified = []
    for _ in range(10):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            ((m(X) - Y) ** 2).mean().backward()
            o.step()
        t, rect = threshold_lr(ob, b.weight)
        rectified.append(rect)
        with torch.no_grad():
            if pen == "l1":
                b.weight.copy_(_soft(b.weight, t * lam))
            else:
                b.weight.copy_(_soft(b.weight, t * lam * rho) / (1 + t * lam * (1 - rho)))
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-10, atol=1e-12)
        # both now hold the same value; keep the optimizer states identical too (a deep
        # copy, not load_state_dict, which casts NAdam's fp32 mu_product to the fp64 param)
        ob.state[b.weight] = copy.deepcopy(oa.state[a.weight])
        with torch.no_grad():
            b.weight.copy_(a.weight)
    if case.startswith("radam"):  # both regimes were exercised: ρ_t ≤ 5 (steps 1-5), then > 5
        assert rectified == [False] * 5 + [True] * 5


def test_radam_warmup_prox_is_the_euclidean_prox():
    """While ρ_t ≤ 5 RAdam's adaptive prox equals the plain (metric='euclidean') prox."""
    X, Y = _data()
    torch.manual_seed(2)
    a = nn.Linear(6, 3, bias=False).double()
    b = copy.deepcopy(a)
    oa = torch.optim.RAdam(a.parameters(), lr=0.05)
    ob = torch.optim.RAdam(b.parameters(), lr=0.05)
    tr.Regularizer(a, [tr.L1(0.05, mode="prox", metric="adaptive")]).attach(oa)
    tr.Regularizer(b, [tr.L1(0.05, mode="prox")]).attach(ob)
    for _ in range(5):  # steps 1..5 with β₂ = 0.999: ρ_t ≈ t ≤ 5
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            ((m(X) - Y) ** 2).mean().backward()
            o.step()
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-12, atol=1e-14)
