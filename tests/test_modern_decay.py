"""Modern weight decay for any optimizer (issue 12): cautious, corrected (AdamC), timescale,
anchored (init / EMA / constant) and Muon. References: the papers' formulas written out in
float64, timm's AdamWLegacy (corrected decay), torch's own Muon."""

import copy
import importlib
import importlib.util
import math
import pathlib
import sys
import types

import pytest
import torch
from torch import nn

import torch_regularizers as tr

DT = torch.float64


def _data(n=16, d_in=5, d_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=DT), torch.randn(n, d_out, generator=g, dtype=DT)


def _linear(seed=1, d_in=5, d_out=3):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=False).to(DT)


def _loss(m, x, y):
    return ((m(x) - y) ** 2).mean()


# ------------------------------------------------------------------ 1. cautious weight decay
def test_cautious_adamw_equals_the_papers_update_written_out():
    """θ_{t+1} = θ_t − η_t·(u_t + λ·𝟙[u_t ⊙ θ_t ≥ 0] ⊙ θ_t), u_t = Adam's m̂/(√v̂ + ε)."""
    x, y = _data()
    m = _linear()
    w = m.weight.detach().clone()
    lam, b1, b2, eps = 0.3, 0.9, 0.999, 1e-8
    lrs = [0.05, 0.04, 0.03, 0.05, 0.02, 0.01, 0.05, 0.03]
    opt = torch.optim.Adam(m.parameters(), lr=lrs[0], betas=(b1, b2), eps=eps)
    tr.Regularizer(m, [tr.L2(lam, mode="decoupled", cautious=True)]).attach(opt)
    mom, vel = torch.zeros_like(w), torch.zeros_like(w)
    masked_out = 0
    for t, lr in enumerate(lrs, start=1):
        ref = w.clone().requires_grad_(True)
        g = torch.autograd.grad(((x @ ref.T - y) ** 2).mean(), ref)[0]
        mom = b1 * mom + (1 - b1) * g
        vel = b2 * vel + (1 - b2) * g * g
        u = (mom / (1 - b1**t)) / ((vel / (1 - b2**t)).sqrt() + eps)
        mask = (u * w >= 0).to(DT)
        masked_out += int((mask == 0).sum())
        w = w - lr * (u + lam * mask * w)

        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        _loss(m, x, y).backward()
        opt.step()
        torch.testing.assert_close(m.weight.detach(), w, rtol=1e-12, atol=1e-14)
    assert masked_out > 0  # the mask did something: this is not plain decoupled decay


def test_cautious_sgd_momentum_equals_the_formula_written_out():
    x, y = _data(seed=3)
    m = _linear(seed=4)
    w = m.weight.detach().clone()
    lam, lr, mu = 0.5, 0.1, 0.9
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=mu)
    tr.Regularizer(m, [tr.L2(lam, mode="decoupled", cautious=True)]).attach(opt)
    buf = None
    masked_out = 0
    for _ in range(8):
        ref = w.clone().requires_grad_(True)
        g = torch.autograd.grad(((x @ ref.T - y) ** 2).mean(), ref)[0]
        buf = g.clone() if buf is None else mu * buf + g
        mask = (buf * w >= 0).to(DT)
        masked_out += int((mask == 0).sum())
        w = w - lr * (buf + lam * mask * w)
        opt.zero_grad()
        _loss(m, x, y).backward()
        opt.step()
        torch.testing.assert_close(m.weight.detach(), w, rtol=1e-12, atol=1e-14)
    assert masked_out > 0


@pytest.mark.parametrize("make", [lambda: tr.L1(0.2, mode="decoupled", cautious=True),
                                  lambda: tr.ElasticNet(0.2, 0.3, mode="decoupled", cautious=True)])
def test_cautious_l1_and_elasticnet_mask_by_the_sign_of_their_direction(make):
    x, y = _data(seed=5)
    m = _linear(seed=6)
    rule = make()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    tr.Regularizer(m, [rule]).attach(opt)
    w = m.weight.detach().clone()
    ref = w.clone().requires_grad_(True)
    g = torch.autograd.grad(((x @ ref.T - y) ** 2).mean(), ref)[0]
    if isinstance(rule, tr.ElasticNet):
        d = 0.2 * (0.3 * torch.sign(w) + 0.7 * w)
    else:
        d = 0.2 * torch.sign(w)
    expect = w - 0.1 * g - 0.1 * (g * d >= 0).to(DT) * d
    opt.zero_grad()
    _loss(m, x, y).backward()
    opt.step()
    torch.testing.assert_close(m.weight.detach(), expect, rtol=1e-12, atol=1e-14)


def test_cautious_l2sp_uses_the_direction_to_the_reference():
    x, y = _data(seed=7)
    m = _linear(seed=8)
    w0 = m.weight.detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    tr.Regularizer(m, [tr.L2SP(0.4, mode="decoupled", cautious=True)]).attach(opt)
    with torch.no_grad():
        m.weight.add_(torch.randn_like(w0))
    w = m.weight.detach().clone()
    ref = w.clone().requires_grad_(True)
    g = torch.autograd.grad(((x @ ref.T - y) ** 2).mean(), ref)[0]
    d = 0.4 * (w - w0)
    expect = w - 0.1 * g - 0.1 * (g * d >= 0).to(DT) * d
    opt.zero_grad()
    _loss(m, x, y).backward()
    opt.step()
    torch.testing.assert_close(m.weight.detach(), expect, rtol=1e-12, atol=1e-14)


def test_cautious_refuses_other_modes_and_manual_use():
    with pytest.raises(ValueError, match="cautious=True needs mode='decoupled'"):
        tr.L2(0.1, cautious=True)
    with pytest.raises(ValueError, match="cautious=True needs mode='decoupled'"):
        tr.GroupLasso(0.1, mode="decoupled", cautious=True)
    reg = tr.Regularizer(_linear(), [tr.L2(0.1, mode="decoupled", cautious=True)])
    with pytest.raises(ValueError, match="only an optimizer step"):
        reg.apply_decoupled(lr=0.1)


# ------------------------------------------------------------------ 2. corrected decay (AdamC)
def _timm_adamw_legacy():
    """timm's AdamWLegacy, loaded from its file without importing timm (whose package init
    imports torchvision, which has no CPU wheel here)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (CI: pip install --no-deps timm)")
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    saved = {k: sys.modules.get(k) for k in ("timm", "timm.optim")}
    try:
        for name, path in (("timm", root), ("timm.optim", root / "optim")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
        mod = importlib.import_module("timm.optim.adamw")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k in [k for k in sys.modules if k.startswith("timm.optim.")]:
            sys.modules.pop(k)
    return mod.AdamWLegacy


@pytest.mark.parametrize("foreach", [False, True])
def test_corrected_decay_matches_timm_adamw_legacy_through_a_schedule(foreach):
    AdamWLegacy = _timm_adamw_legacy()
    x, y = _data(seed=9)
    a = _linear(seed=10)
    b = copy.deepcopy(a)
    lam, lr = 0.05, 0.03
    oa = AdamWLegacy(a.parameters(), lr=lr, weight_decay=lam, corrected_weight_decay=True, foreach=foreach)
    ob = AdamWLegacy(b.parameters(), lr=lr, weight_decay=0.0, foreach=foreach)
    sa = torch.optim.lr_scheduler.CosineAnnealingLR(oa, T_max=12)
    sb = torch.optim.lr_scheduler.CosineAnnealingLR(ob, T_max=12)
    tr.Regularizer(b, [tr.L2(lam, mode="decoupled", lr_coupling="corrected")]).attach(ob)
    plain = _linear(seed=10)
    for _ in range(12):
        for m, o, s in ((a, oa, sa), (b, ob, sb)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
            s.step()
        ulp = torch.finfo(DT).eps * a.weight.detach().abs()
        assert ((a.weight - b.weight).abs() <= ulp).all()
    with torch.no_grad():
        assert not torch.allclose(a.weight, plain.weight)


def test_corrected_decay_is_lr_squared_over_lr_max():
    m = _linear()
    opt = torch.optim.SGD(m.parameters(), lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    tr.Regularizer(m, [tr.L2(0.25, mode="decoupled", lr_coupling="corrected")]).attach(opt)
    for k in range(3):
        lr = 0.4 * 0.5**k
        w = m.weight.detach().clone()
        m.weight.grad = torch.zeros_like(w)
        opt.step()
        torch.testing.assert_close(m.weight.detach(), w * (1 - 0.25 * lr * lr / 0.4), rtol=0, atol=1e-15)
        sched.step()


# ------------------------------------------------------------------ 3. timescale
@pytest.mark.parametrize("coupling", ["lr", "lr_ratio", "none"])
def test_timescale_gives_a_per_step_decay_of_one_over_tau_at_the_peak_lr(coupling):
    T = 50.0
    m = _linear()
    opt = torch.optim.SGD(m.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: [1.0, 0.5, 0.25][min(k, 2)])
    reg = tr.Regularizer(m, [tr.L2(timescale=T, mode="decoupled", lr_coupling=coupling)]).attach(opt)
    for k in range(3):
        ratio = [1.0, 0.5, 0.25][k] if coupling != "none" else 1.0
        w = m.weight.detach().clone()
        m.weight.grad = torch.zeros_like(w)
        opt.step()
        torch.testing.assert_close(m.weight.detach(), w * (1 - ratio / T), rtol=0, atol=1e-15)
        sched.step()
    s = reg.summary(as_dict=True)["params"][0]["rules"][0]
    assert s["timescale"] == T
    assert "τ=50 steps" in reg.summary()
    if coupling == "lr":  # λ = 1/(T·lr_peak)
        assert math.isclose(reg.rules["l2"].strength_at(0), 1 / (T * 0.2))


def test_summary_shows_tau_for_a_strength_given_rule():
    m = _linear()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
    reg = tr.Regularizer(m, [tr.L2(0.1, mode="decoupled")]).attach(opt)
    tau = reg.summary(as_dict=True)["params"][0]["rules"][0]["timescale"]
    assert math.isclose(tau, 1 / (0.1 * 1e-3))  # τ = 1/(η·λ)


def test_timescale_round_trips_through_a_config():
    m = _linear()
    reg = tr.Regularizer(m, [tr.L2(timescale=1000, mode="decoupled")])
    cfg = reg.to_config()
    assert cfg["rules"][0]["timescale"] == 1000
    back = tr.Regularizer.from_config(m, cfg)
    assert back.rules["l2"].timescale == 1000 and back.rules["l2"].mode == "decoupled"


def test_timescale_errors():
    with pytest.raises(ValueError, match="needs mode='decoupled'"):
        tr.L2(timescale=100)
    with pytest.raises(ValueError, match="not both"):
        tr.L2(0.1, timescale=100, mode="decoupled")
    with pytest.raises(ValueError, match="only for L2 and L2SP"):
        tr.L1(timescale=100, mode="decoupled")
    with pytest.raises(ValueError, match="> 0"):
        tr.L2(timescale=0, mode="decoupled")


# ------------------------------------------------------------------ 4. anchored decay
def test_ema_reference_follows_the_weights():
    x, y = _data(seed=11)
    m = _linear(seed=12)
    beta, lam, lr = 0.9, 0.2, 0.1
    ref = m.weight.detach().clone()
    w = m.weight.detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    reg = tr.Regularizer(m, [tr.L2SP(lam, reference="ema", ema_decay=beta)]).attach(opt)  # grad mode
    for _ in range(5):
        leaf = w.clone().requires_grad_(True)
        g = torch.autograd.grad(((x @ leaf.T - y) ** 2).mean(), leaf)[0]
        w = w - lr * (g + lam * (w - ref))
        ref = beta * ref + (1 - beta) * w
        opt.zero_grad()
        _loss(m, x, y).backward()
        opt.step()
        torch.testing.assert_close(m.weight.detach(), w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(reg.rules["l2sp"].references["weight"], ref, rtol=1e-12, atol=1e-14)


def test_ema_reference_in_loss_mode_and_resume_is_bit_identical():
    x, y = _data(seed=13)

    def build(seed):
        m = _linear(seed=seed)
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        reg = tr.Regularizer(m, [tr.L2SP(0.3, reference="ema", ema_decay=0.8, mode="loss")]).attach(opt)
        return m, opt, reg

    def train(m, opt, reg, n):
        for _ in range(n):
            opt.zero_grad()
            (_loss(m, x, y) + reg.penalty()).backward()
            opt.step()

    m, opt, reg = build(14)
    train(m, opt, reg, 6)
    straight = m.weight.detach().clone()
    m1, opt1, reg1 = build(14)
    train(m1, opt1, reg1, 3)
    ck = copy.deepcopy({"m": m1.state_dict(), "o": opt1.state_dict(), "r": reg1.state_dict()})
    m2, opt2, reg2 = build(99)
    m2.load_state_dict(ck["m"])
    opt2.load_state_dict(ck["o"])
    reg2.load_state_dict(ck["r"])
    train(m2, opt2, reg2, 3)
    assert torch.equal(m2.weight, straight)
    assert torch.equal(reg2.rules["l2sp"].references["weight"], reg.rules["l2sp"].references["weight"])


def test_constant_reference_pulls_toward_the_constant():
    m = nn.LayerNorm(4).to(DT)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.5, 2.0, 1.0], dtype=DT))
    reg = tr.Regularizer(m, [tr.L2SP(0.1, reference=1.0, on=tr.select.name("weight"), mode="loss")])
    expect = 0.5 * 0.1 * ((m.weight.detach() - 1.0) ** 2).sum()
    torch.testing.assert_close(reg.penalty(), expect.to(reg.penalty().dtype))
    reg.penalty().backward()
    torch.testing.assert_close(m.weight.grad, 0.1 * (m.weight.detach() - 1.0))


def test_reference_argument_errors():
    with pytest.raises(ValueError, match="needs ema_decay"):
        tr.L2SP(0.1, reference="ema")
    with pytest.raises(ValueError, match="only for reference='ema'"):
        tr.L2SP(0.1, ema_decay=0.9)
    with pytest.raises(ValueError, match="not 'init', 'ema'"):
        tr.L2SP(0.1, reference="pretrained")
    with pytest.raises(ValueError, match="finite"):
        tr.L2SP(0.1, reference=float("nan"))
    tr.Regularizer(_linear(), [tr.L2SP(0.1, reference="init")])


# ------------------------------------------------------------------ 6. Muon
def _muon_model(seed=20):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6, bias=False), nn.Linear(6, 4, bias=False))


def test_decoupled_l2_with_muon_is_bit_identical_to_muons_weight_decay():
    x = torch.randn(16, 8)
    y = torch.randn(16, 4)
    a, b = _muon_model(), _muon_model()
    oa = torch.optim.Muon(a.parameters(), lr=0.02, weight_decay=0.1)
    ob = torch.optim.Muon(b.parameters(), lr=0.02, weight_decay=0.0)
    tr.Regularizer(b, [tr.L2(0.1, mode="decoupled")]).attach(ob)
    for _ in range(5):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_cautious_with_muon_masks_by_muons_own_update():
    x = torch.randn(16, 8)
    y = torch.randn(16, 4)
    a, twin = _muon_model(), _muon_model()
    oa = torch.optim.Muon(a.parameters(), lr=0.02, weight_decay=0.0)
    ot = torch.optim.Muon(twin.parameters(), lr=0.02, weight_decay=0.0)
    tr.Regularizer(a, [tr.L2(0.5, mode="decoupled", cautious=True)]).attach(oa)
    before = [p.detach().clone() for p in a.parameters()]
    for m, o in ((a, oa), (twin, ot)):
        o.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        o.step()
    for w0, p, t in zip(before, a.parameters(), twin.parameters()):
        update = w0 - t.detach()  # η·u of Muon itself
        expect = t.detach() - 0.02 * 0.5 * (update * w0 >= 0).to(w0.dtype) * w0
        torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=1e-7)


def test_adaptive_metric_refuses_muon():
    m = _muon_model()
    reg = tr.Regularizer(m, [tr.L1(0.1, mode="prox", metric="adaptive")])
    with pytest.raises(ValueError, match=r"metric='adaptive'.*Muon"):
        reg.attach(torch.optim.Muon(m.parameters(), lr=0.02))


# ------------------------------------------------------------------ configs and summary cover the new options
@pytest.mark.parametrize(
    ("rule", "attrs"),
    [
        (lambda: tr.L2(0.1, mode="decoupled", cautious=True), {"cautious": True, "mode": "decoupled"}),
        (lambda: tr.L1(0.1, mode="decoupled", cautious=True), {"cautious": True}),
        (lambda: tr.L2(0.1, mode="decoupled", lr_coupling="corrected"), {"lr_coupling": "corrected"}),
        (lambda: tr.L2SP(0.1, reference="ema", ema_decay=0.99), {"reference": "ema", "ema_decay": 0.99}),
        (lambda: tr.L2SP(0.1, reference=1.0, on=tr.select.all), {"reference": 1.0}),
        (lambda: tr.L2SP(timescale=500, mode="decoupled", cautious=True), {"timescale": 500.0, "cautious": True}),
    ],
)
def test_new_options_round_trip_through_configs(rule, attrs):
    m = _linear()
    reg = tr.Regularizer(m, [rule()])
    back = tr.Regularizer.from_config(m, reg.to_config())
    (r,) = back.rules.values()
    for k, v in attrs.items():
        assert getattr(r, k) == v, k
    assert back.to_config() == reg.to_config()
