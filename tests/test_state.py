"""reg.state_dict() / load_state_dict(): a run stopped after k steps and resumed from the
model, optimizer, LR scheduler and regularizer state dicts (through torch.save/torch.load
with weights_only=True) is bit-identical to the uninterrupted run, for every mode; without
the regularizer's state it is not (so the test is not vacuous)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import torch_regularizers as tr
from torch_regularizers import schedules as S

K = 5  # steps before the interruption; as many after


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def batch(k):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


sched = S.multistep(0.05, milestones=[2, 4, 6, 8], gamma=0.5)
warm = S.linear_warmup(S.cosine(0.08, 10, final=0.01), 3)

CASES = {
    "grad": lambda: [tr.L2(sched), tr.L1(warm, on=tr.select.name("5.weight"), name="l1g")],
    "decoupled": lambda: [
        tr.L2(sched, mode="decoupled", lr_coupling="lr_ratio"),
        tr.ElasticNet(warm, 0.3, mode="decoupled", on=tr.select.name("5.weight")),
    ],
    "prox": lambda: [
        tr.L1(warm, mode="prox", on=tr.select.name("0.weight", "5.weight")),
        tr.GroupLasso(sched, mode="prox", on=tr.select.name("3.weight")),
    ],
    "prox_adaptive": lambda: [tr.L1(warm, mode="prox", metric="adaptive")],
    "loss": lambda: [tr.L2(sched, mode="loss"), tr.L1(warm, mode="loss", on=tr.select.biases)],
    "l2sp": lambda: [tr.L2SP(sched, mode="decoupled"), tr.L2SP(warm, on=tr.select.norms, name="sp_norms")],
    "constraint": lambda: [tr.L2(sched, mode="decoupled"), tr.MaxNorm(0.9, dim=1)],
}


def build(case, seed):
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    lrs = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    reg = tr.Regularizer(model, CASES[case]())
    reg.attach(opt)
    return model, opt, lrs, reg


def train(model, opt, lrs, reg, steps):
    for k in steps:
        x, y = batch(k)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean() + reg.penalty()
        loss.backward()
        opt.step()
        lrs.step()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q), f"param {i}: max |diff| {(p - q).abs().max().item():.3e}"


def resumed(case, load_reg=True, attach_first=True):
    model, opt, lrs, reg = build(case, seed=0)
    train(model, opt, lrs, reg, range(K))
    ckpt = roundtrip(
        {"model": model.state_dict(), "opt": opt.state_dict(), "lrs": lrs.state_dict(), "reg": reg.state_dict()}
    )
    # a fresh process: other initial weights (so an L2-SP reference taken now would be wrong)
    model = make_model(seed=123)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    lrs = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    reg = tr.Regularizer(model, CASES[case]())
    if attach_first:
        reg.attach(opt)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    lrs.load_state_dict(ckpt["lrs"])
    if load_reg:
        reg.load_state_dict(ckpt["reg"])
    if not attach_first:
        reg.attach(opt)
    train(model, opt, lrs, reg, range(K, 2 * K))
    return params(model), reg


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bit_identical(case):
    model, opt, lrs, reg = build(case, seed=0)
    start = params(model)
    train(model, opt, lrs, reg, range(2 * K))
    straight = params(model)
    assert any(not torch.equal(p, q) for p, q in zip(start, straight))

    got, reg2 = resumed(case)
    assert_same(got, straight)
    assert reg2.step == reg.step == 2 * K

    # without the regularizer's state (step counts / references) the run differs
    other, _ = resumed(case, load_reg=False)
    assert any(not torch.equal(p, q) for p, q in zip(other, straight)), "state had no effect"


@pytest.mark.parametrize("case", ["l2sp", "decoupled"])
def test_load_before_attach(case):
    """Lightning restores callbacks before it builds the optimizers: loading first works."""
    model, opt, lrs, reg = build(case, seed=0)
    train(model, opt, lrs, reg, range(2 * K))
    got, _ = resumed(case, attach_first=False)
    assert_same(got, params(model))


def test_state_dict_contents_and_strict():
    model, opt, lrs, reg = build("l2sp", seed=0)
    train(model, opt, lrs, reg, range(3))
    sd = reg.state_dict()
    assert sd["optimizers"][0]["steps"] == 3
    assert sd["optimizers"][0]["initial_lr"] == {0: 0.02}
    assert set(sd["rules"]) == {"l2sp", "sp_norms"}
    assert sd["strengths"]["l2sp"] == {"schedule": sched.to_config()}
    ref = sd["rules"]["l2sp"]["reference"]
    torch.manual_seed(0)
    assert torch.equal(ref["0.weight"], make_model(0)[0].weight)  # θ₀ = weights at construction

    other = tr.Regularizer(make_model(0), [tr.L2(0.1, name="x")])
    with pytest.raises(ValueError, match=r"missing: \['x'\].*unexpected: \['l2sp', 'sp_norms'\]"):
        other.load_state_dict(sd)
    other.load_state_dict(sd, strict=False)  # nothing matches: only counts are taken
    assert other.step == 0  # not attached: the count waits for attach()
    other.attach(torch.optim.SGD(other.model.parameters(), lr=0.1))
    assert other.step == 3


def test_set_strength_survives_resume():
    m = make_model(0)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    reg = tr.Regularizer(m, [tr.L2(0.01, name="wd"), tr.L1(S.cosine(0.1, 10), name="l1")])
    reg.attach(opt)
    reg.set_strength("wd", 0.3)
    reg.set_strength("l1", S.step(0.2, 2))
    sd = roundtrip(reg.state_dict())
    m2 = make_model(0)
    reg2 = tr.Regularizer(m2, [tr.L2(0.01, name="wd"), tr.L1(S.cosine(0.1, 10), name="l1")])
    reg2.load_state_dict(sd)
    assert reg2.rules["wd"].strength == 0.3
    assert reg2.rules["l1"].strength == S.step(0.2, 2)


def test_plain_and_stateful_callables():
    class Counter:
        """A stateful strength: its own state_dict is kept."""

        def __init__(self):
            self.scale = 1.0

        def __call__(self, k):
            return 0.01 * self.scale

        def state_dict(self):
            return {"scale": self.scale}

        def load_state_dict(self, d):
            self.scale = d["scale"]

    m = make_model(0)
    c = Counter()
    c.scale = 3.0
    plain = lambda k: 0.5  # noqa: E731
    reg = tr.Regularizer(m, [tr.L2(c, name="a"), tr.L1(plain, name="b")])
    sd = roundtrip(reg.state_dict())
    assert sd["strengths"] == {"a": {"callable_state": {"scale": 3.0}}, "b": None}
    c2 = Counter()
    plain2 = lambda k: 0.25  # noqa: E731
    reg2 = tr.Regularizer(make_model(0), [tr.L2(c2, name="a"), tr.L1(plain2, name="b")])
    reg2.load_state_dict(sd)
    assert c2.scale == 3.0 and reg2.rules["b"].strength is plain2


def test_gradscaler_skips_are_resolved_in_state_dict():
    """Without a schedule, fused-optimizer skips are counted on device; state_dict resolves them."""
    m = make_model(0)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, fused=True)
    reg = tr.Regularizer(m, [tr.L2(0.01)])
    reg.attach(opt)
    sc = torch.amp.GradScaler("cpu", init_scale=4.0)
    for k in range(6):
        x, y = batch(k)
        opt.zero_grad()
        sc.scale(((m(x) - y) ** 2).mean()).backward()
        if k in (2, 3):
            m[0].bias.grad[0] = float("nan")
        sc.step(opt)
        sc.update()
    assert reg.state_dict()["optimizers"][0]["steps"] == 4


def test_manual_steps_resume():
    m = make_model(0)
    reg = tr.Regularizer(m, [tr.L2(S.step(0.1, 1, gamma=0.5), mode="decoupled")])
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(3):
        reg.apply_decoupled(lr=1.0)
        reg.advance()
    sd = roundtrip(reg.state_dict())
    reg2 = tr.Regularizer(make_model(0), [tr.L2(S.step(0.1, 1, gamma=0.5), mode="decoupled")])
    reg2.load_state_dict(sd)
    assert reg2.step == 3


def test_stats_logger_pattern_for_plain_loops():
    """StatsLogger logs reg.stats() every n applied steps, once per step (micro-batches too)."""
    from torch_regularizers.integrations import StatsLogger

    m = make_model(0)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    reg = tr.Regularizer(m, [tr.L1(0.05, mode="prox", on=tr.select.name("5.weight"))])
    reg.attach(opt)
    seen = []
    log = StatsLogger(reg, lambda d, step: seen.append((step, d)), every=3)
    for k in range(7):
        opt.zero_grad()
        for j in range(2):  # gradient accumulation: the logger is called on every micro-batch
            x, y = batch(2 * k + j)
            ((m(x) - y) ** 2).mean().backward()
            log()
        opt.step()
    log()
    assert [s for s, _ in seen] == [3, 6]
    w = m[5].weight.detach()
    d = log(force=True)
    assert d["reg/l1/value"] == pytest.approx(0.05 * w.abs().sum().item(), rel=1e-6)
    assert d["reg/l1/sparsity"] == pytest.approx((w == 0).float().mean().item())
    assert set(seen[0][1]) == {"reg/l1/value", "reg/l1/sparsity"}
