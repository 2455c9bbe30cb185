"""Strength schedules: the formulas (against torch's LR schedulers and the closed forms
written out here), which step a schedule sees (applied optimizer steps: accumulation
micro-steps and GradScaler-skipped steps don't count, each optimizer counts its own),
and changing a strength mid-training with ``set_strength``."""

from __future__ import annotations

import bisect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_regularizers as tr
from torch_regularizers import schedules as S

# --------------------------------------------------------------------------- formulas


def torch_lrs(make_sched, base, n):
    """The lr a torch LR scheduler gives at steps 0..n-1, starting from lr=base."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sch = make_sched(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    return out


values = st.floats(1e-6, 10.0)


@settings(deadline=None, max_examples=25)
@given(v=values, size=st.integers(1, 7), gamma=st.floats(0.05, 0.99))
def test_step_equals_torch_steplr(v, size, gamma):
    n = 30
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, size, gamma), v, n)
    sched = S.step(v, step_size=size, gamma=gamma)
    for k in range(n):
        assert sched(k) == v * gamma ** (k // size)  # closed form, exactly
        assert sched(k) == pytest.approx(ref[k], rel=1e-12)


@settings(deadline=None, max_examples=25)
@given(
    v=values,
    ms=st.lists(st.integers(1, 25), min_size=1, max_size=4, unique=True).map(sorted),
    gamma=st.floats(0.05, 0.99),
)
def test_multistep_equals_torch_multisteplr(v, ms, gamma):
    n = 30
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, ms, gamma), v, n)
    sched = S.multistep(v, milestones=ms, gamma=gamma)
    for k in range(n):
        assert sched(k) == v * gamma ** bisect.bisect_right(ms, k)
        assert sched(k) == pytest.approx(ref[k], rel=1e-12)


@settings(deadline=None, max_examples=25)
@given(v=values, t=st.integers(1, 40), final_frac=st.floats(0.0, 0.9))
def test_cosine_equals_torch_cosineannealing(v, t, final_frac):
    final = v * final_frac
    n = t + 1
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, t, eta_min=final), v, n)
    sched = S.cosine(v, total_steps=t, final=final)
    for k in range(n):
        closed = final + (v - final) * (1 + math.cos(math.pi * k / t)) / 2
        assert sched(k) == closed
        assert sched(k) == pytest.approx(ref[k], rel=1e-9, abs=1e-15)
    # held at `final` after total_steps (torch's scheduler would rise again)
    assert sched(t + 5) == sched(t) == pytest.approx(final, abs=1e-15)


@settings(deadline=None, max_examples=25)
@given(v=values, w=st.integers(1, 20), start_frac=st.floats(0.01, 1.0))
def test_linear_warmup_equals_torch_linearlr(v, w, start_frac):
    start = v * start_frac
    n = w + 5
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=start_frac, end_factor=1.0, total_iters=w),
        v,
        n,
    )
    sched = S.linear_warmup(v, warmup_steps=w, start=start)
    for k in range(n):
        closed = start + (v - start) * min(k, w) / w
        assert sched(k) == pytest.approx(closed, rel=1e-15)
        assert sched(k) == pytest.approx(ref[k], rel=1e-9)
    assert sched(w) == v and sched(w + 100) == v


def test_linear_warmup_of_a_schedule_and_constant():
    inner = S.cosine(2.0, total_steps=10)
    sched = S.linear_warmup(inner, warmup_steps=4)
    for k in range(15):
        expect = inner(k) * min(k, 4) / 4
        assert sched(k) == pytest.approx(expect, rel=1e-15, abs=0)
    assert S.linear_warmup(3.0, 0)(0) == 3.0
    assert S.constant(0.25)(0) == S.constant(0.25)(10**9) == 0.25


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: S.constant(-1.0), "value"),
        (lambda: S.constant(float("nan")), "value"),
        (lambda: S.cosine(1.0, total_steps=0), "total_steps"),
        (lambda: S.cosine(1.0, total_steps=10, final=-0.1), "final"),
        (lambda: S.step(1.0, step_size=0), "step_size"),
        (lambda: S.step(1.0, step_size=2, gamma=-1), "gamma"),
        (lambda: S.multistep(1.0, milestones=[5, 3]), "milestones"),
        (lambda: S.multistep(1.0, milestones=[0]), "milestones"),
        (lambda: S.linear_warmup(1.0, warmup_steps=-1), "warmup_steps"),
        (lambda: S.linear_warmup(1.0, warmup_steps=2.5), "warmup_steps"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_schedule_config_round_trip_and_errors():
    scheds = [
        S.constant(0.5),
        S.linear_warmup(S.cosine(1e-3, 100, final=1e-5), 10, start=1e-6),
        S.cosine(1.0, 7),
        S.step(2.0, 3, gamma=0.5),
        S.multistep(1.0, [2, 9], gamma=0.3),
    ]
    for s in scheds:
        cfg = s.to_config()
        back = S.from_config(cfg)
        assert back == s
        assert [back(k) for k in range(20)] == [s(k) for k in range(20)]
    with pytest.raises(ValueError, match=r"strength\.type"):
        S.from_config({"type": "exponential", "value": 1.0}, "strength")
    with pytest.raises(ValueError, match=r"strength\.warmup"):
        S.from_config({"type": "cosine", "value": 1.0, "total_steps": 3, "warmup": 2}, "strength")
    with pytest.raises(ValueError, match=r"strength\.total_steps"):
        S.from_config({"type": "cosine", "value": 1.0, "total_steps": 0}, "strength")
    # YAML 1.1 reads 1e-4 as a string
    assert S.from_config({"type": "constant", "value": "1e-4"})(0) == 1e-4


# --------------------------------------------------------------------------- which step a schedule sees


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


def mse(model, x, y):
    return ((model(x) - y) ** 2).mean()


WEIGHTS = ("0.weight", "2.weight")


def table_schedule(seed=3, n=64):
    """A schedule whose value changes a lot at every step, so the wrong k shows."""
    g = torch.Generator().manual_seed(seed)
    vals = (torch.rand(n, generator=g, dtype=torch.float64) * 0.5).tolist()
    return lambda k: vals[k]


def assert_equal_params(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{n}: max |diff| {(p - q).abs().max().item():.3e}"


def test_grad_schedule_uses_applied_step_with_accumulation():
    """k-th optimizer step uses f(k): 3 micro-batches per step do not advance k."""
    f = table_schedule()
    x, y = data()
    m1, m2 = make_model(), make_model()
    opt1 = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    reg = tr.Regularizer(m1, [tr.L2(f)])
    reg.attach(opt1)
    for k in range(8):
        for model, opt in ((m1, opt1), (m2, opt2)):
            opt.zero_grad()
            for j in range(3):
                i = (3 * k + j) % 12
                (mse(model, x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]) / 3).backward()
        with torch.no_grad():  # reference: torch's own weight_decay formula, by hand
            for n, p in m2.named_parameters():
                if n in WEIGHTS:
                    p.grad.add_(p, alpha=f(k))
        opt1.step()
        opt2.step()
    assert reg.step == 8
    assert_equal_params(m1, m2)


@pytest.mark.parametrize("mode", ["decoupled", "prox"])
def test_decoupled_and_prox_schedules_by_hand(mode):
    f = table_schedule(seed=5)
    lr = 0.05
    x, y = data()
    m1, m2 = make_model(), make_model()
    opt1 = torch.optim.SGD(m1.parameters(), lr=lr)
    opt2 = torch.optim.SGD(m2.parameters(), lr=lr)
    tr.Regularizer(m1, [tr.L1(f, mode=mode)]).attach(opt1)
    for k in range(10):
        xb, yb = x[4 * (k % 12) : 4 * (k % 12) + 4], y[4 * (k % 12) : 4 * (k % 12) + 4]
        for model, opt in ((m1, opt1), (m2, opt2)):
            opt.zero_grad()
            mse(model, xb, yb).backward()
        with torch.no_grad():
            if mode == "decoupled":
                for n, p in m2.named_parameters():
                    if n in WEIGHTS:
                        p.add_(torch.sign(p), alpha=-lr * f(k))
        opt1.step()
        opt2.step()
        with torch.no_grad():
            if mode == "prox":  # soft-threshold by lr·f(k)
                for n, p in m2.named_parameters():
                    if n in WEIGHTS:
                        t = lr * f(k)
                        p.sub_(torch.clamp(p, -t, t))
    assert_equal_params(m1, m2)


@pytest.mark.parametrize("fused", [False, True])
def test_gradscaler_skipped_steps_do_not_count(fused):
    """Steps skipped by GradScaler (inf grads) apply nothing and do not advance k."""
    f = table_schedule(seed=7)
    x, y = data()
    skip = {1, 4, 5}
    m1, m2 = make_model(), make_model()
    opt1 = torch.optim.SGD(m1.parameters(), lr=0.1, fused=fused)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, fused=fused)
    reg = tr.Regularizer(m1, [tr.L2(f)])
    reg.attach(opt1)
    sc1, sc2 = torch.amp.GradScaler("cpu", init_scale=8.0), torch.amp.GradScaler("cpu", init_scale=8.0)
    applied = 0
    for it in range(9):
        xb, yb = x[4 * it : 4 * it + 4], y[4 * it : 4 * it + 4]
        for model, opt, sc in ((m1, opt1, sc1), (m2, opt2, sc2)):
            opt.zero_grad()
            sc.scale(mse(model, xb, yb)).backward()
            if it in skip:
                model[0].bias.grad[0] = float("inf")
        # reference: unscale, then torch's weight_decay formula with the count of applied steps
        sc2.unscale_(opt2)
        if it not in skip:
            with torch.no_grad():
                for n, p in m2.named_parameters():
                    if n in WEIGHTS:
                        p.grad.add_(p, alpha=f(applied))
            applied += 1
        sc1.step(opt1)
        sc1.update()
        sc2.step(opt2)
        sc2.update()
    assert reg.step == applied == 6
    if fused:  # the fused kernel unscales itself: grad-mode terms are scaled, not bit-equal
        for p, q in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    else:
        assert_equal_params(m1, m2)


def test_each_optimizer_counts_its_own_steps():
    """Two optimizers (a GAN's): B steps every other iteration; its rule sees its own k."""
    fa, fb = table_schedule(seed=11), table_schedule(seed=12)
    x, y = data()
    m1, m2 = make_model(), make_model()

    def opts(m):
        return (
            torch.optim.SGD(m[0].parameters(), lr=0.1),
            torch.optim.SGD(m[2].parameters(), lr=0.1),
        )

    a1, b1 = opts(m1)
    a2, b2 = opts(m2)
    reg = tr.Regularizer(
        m1, [tr.L2(fa, on=tr.select.name("0.weight")), tr.L2(fb, on=tr.select.name("2.weight"))]
    )
    reg.attach(a1, b1)
    nb = 0
    for it in range(8):
        xb, yb = x[4 * it : 4 * it + 4], y[4 * it : 4 * it + 4]
        for m in (m1, m2):
            m.zero_grad()
            mse(m, xb, yb).backward()
        with torch.no_grad():
            m2[0].weight.grad.add_(m2[0].weight, alpha=fa(it))
        a1.step()
        a2.step()
        if it % 2 == 1:
            with torch.no_grad():
                m2[2].weight.grad.add_(m2[2].weight, alpha=fb(nb))
            nb += 1
            b1.step()
            b2.step()
    assert reg.state_dict()["optimizers"][0]["steps"] == 8
    assert reg.state_dict()["optimizers"][1]["steps"] == 4
    assert_equal_params(m1, m2)


def test_manual_use_advance():
    f = table_schedule(seed=13)
    m1, m2 = make_model(), make_model()
    reg = tr.Regularizer(m1, [tr.L2(f, mode="decoupled")])
    for p in m1.parameters():  # parameters without a gradient are skipped, as in torch
        p.grad = torch.zeros_like(p)
    for k in range(4):
        reg.apply_decoupled(lr=0.5)
        reg.advance()
        with torch.no_grad():
            for n, p in m2.named_parameters():
                if n in WEIGHTS:
                    p.mul_(1 - 0.5 * f(k))
    assert reg.step == 4
    assert_equal_params(m1, m2)


def test_negative_schedule_value_raises_naming_rule_and_step():
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    tr.Regularizer(m, [tr.L1(lambda k: 0.1 if k < 2 else -1.0, name="sparse")]).attach(opt)
    x, y = data()
    for _k in range(2):
        opt.zero_grad()
        mse(m, x[:4], y[:4]).backward()
        opt.step()
    opt.zero_grad()
    mse(m, x[:4], y[:4]).backward()
    with pytest.raises(ValueError, match=r"'sparse'.*step 2"):
        opt.step()


# --------------------------------------------------------------------------- set_strength


def test_set_strength_mid_training_and_summary():
    x, y = data()
    m1, m2 = make_model(), make_model()
    opt1 = torch.optim.SGD(m1.parameters(), lr=0.1)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    reg = tr.Regularizer(m1, [tr.L2(0.01, name="wd"), tr.MaxNorm(5.0, dim=1)])
    reg.attach(opt1)
    lam = 0.01
    for k in range(8):
        if k == 3:
            reg.set_strength("wd", 0.2)
            lam = 0.2
        if k == 6:
            reg.set_strength("wd", S.constant(0.05))
            lam = 0.05
        xb, yb = x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]
        for m, opt in ((m1, opt1), (m2, opt2)):
            opt.zero_grad()
            mse(m, xb, yb).backward()
        with torch.no_grad():
            for n, p in m2.named_parameters():
                if n in WEIGHTS:
                    p.grad.add_(p, alpha=lam)
        opt1.step()
        opt2.step()
        with torch.no_grad():  # MaxNorm(5, dim=1): never active at these scales
            assert all(p.norm(dim=1).max() < 5 for n, p in m2.named_parameters() if n in WEIGHTS)
    assert_equal_params(m1, m2)
    d = reg.summary(as_dict=True)
    strengths = {r["strength"] for p in d["params"] for r in p["rules"] if r["rule"] == "wd"}
    assert strengths == {0.05}
    assert "λ=0.05" in reg.summary()

    with pytest.raises(ValueError, match="no rule named 'nope'"):
        reg.set_strength("nope", 1.0)
    with pytest.raises(ValueError, match="maxnorm"):
        reg.set_strength("maxnorm", 1.0)
    with pytest.raises(ValueError, match="strength"):
        reg.set_strength("wd", -1.0)
