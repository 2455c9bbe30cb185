"""Activity regularization (DESIGN §1, issue 4): ActivityL1 / ActivityL2 on module outputs.

The reference is always the penalty written out by hand on the intermediate outputs of
a forward pass computed step by step, R = λ·Σ|y|/B (L1) or ½·λ·Σy²/B (L2) with
B = y.shape[0] (Keras' batch normalization), added to the loss and differentiated
by autograd in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_regularizers as tr

L1, L2 = 0.1, 0.2


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def data(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(
        n, 3, generator=g, dtype=torch.float64
    )


def by_hand_loss(model, x, t, l1=L1, l2=L2):
    h = model[0](x)
    a = model[1](h)
    y = model[2](a)
    B = x.shape[0]
    return ((y - t) ** 2).mean() + l1 * h.abs().sum() / B + 0.5 * l2 * (a * a).sum() / B


def activity_rules(model, mode):
    return [
        tr.ActivityL1(L1, on=model[0], mode=mode),
        tr.ActivityL2(L2, on=nn.Tanh, mode=mode),
    ]


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


# --------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("mode", ["grad", "loss"])
def test_gradients_equal_penalty_added_by_hand(mode):
    x, t = data()
    ref = make_model()
    by_hand_loss(ref, x, t).backward()

    model = make_model()
    reg = tr.Regularizer(model, activity_rules(model, mode))
    loss = ((model(x) - t) ** 2).mean()
    if mode == "loss":
        loss = loss + reg.penalty()
    loss.backward()
    for g, r in zip(grads(model), grads(ref)):
        torch.testing.assert_close(g, r, rtol=1e-13, atol=1e-15)
    # and the penalty actually matters
    plain = make_model()
    ((plain(x) - t) ** 2).mean().backward()
    assert not torch.allclose(grads(plain)[0], grads(ref)[0])


def test_grad_mode_with_an_optimizer_matches_by_hand_over_steps():
    x, t = data()
    ref, model = make_model(), make_model()
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_m = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tr.Regularizer(model, activity_rules(model, "grad")).attach(opt_m)
    for _ in range(4):
        opt_r.zero_grad()
        by_hand_loss(ref, x, t).backward()
        opt_r.step()
        opt_m.zero_grad()
        ((model(x) - t) ** 2).mean().backward()
        opt_m.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        a = self.lin(x)
        return a, {"b": torch.sin(a), "n": torch.arange(3)}  # the integer tensor is ignored


def test_tuple_and_dict_outputs_contribute_every_float_tensor():
    torch.manual_seed(0)
    m = TupleOut().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    reg = tr.Regularizer(m, [tr.ActivityL2(0.3, on=TupleOut, mode="grad")])
    a, d = m(x)
    (a.sum() + d["b"].sum()).backward()
    g = m.lin.weight.grad.clone()
    m.zero_grad()
    reg.detach()
    a, d = m(x)
    (a.sum() + d["b"].sum() + 0.5 * 0.3 * ((a * a).sum() + (d["b"] ** 2).sum()) / 6).backward()
    torch.testing.assert_close(g, m.lin.weight.grad, rtol=1e-13, atol=1e-15)


def test_leaf_output_hook_fires_once_per_forward():
    """nn.Identity on a leaf input returns the leaf itself: its hook must not pile up."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    model = nn.Sequential(nn.Identity())
    tr.Regularizer(model, [tr.ActivityL1(0.5, on=nn.Identity)])
    for _ in range(3):
        x.grad = None
        model(x).pow(2).sum().backward()
        torch.testing.assert_close(x.grad, 2 * x.detach() + 0.5 * torch.sign(x.detach()) / 4)


# --------------------------------------------------------------------------- loss mode bookkeeping
def test_loss_mode_penalty_is_consumed_cleared_each_step_and_skips_no_grad():
    x, t = data()
    model = make_model()
    reg = tr.Regularizer(model, activity_rules(model, "loss"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    with torch.no_grad():
        h = model[0](x)
        expected = L1 * h.abs().sum() / 8 + 0.5 * L2 * (torch.tanh(h) ** 2).sum() / 8
        model(x)  # evaluation: no hook acts
    assert float(reg.penalty()) == 0.0
    model(x)
    p = reg.penalty()
    assert p.requires_grad
    torch.testing.assert_close(p.detach(), expected, rtol=1e-13, atol=0)
    assert float(reg.penalty()) == 0.0  # consumed: a second call never double counts
    stats = reg.stats()
    assert stats["activityl1/value"] == pytest.approx(float(L1 * h.abs().sum() / 8), rel=1e-12)
    torch.testing.assert_close(reg.value(), expected, rtol=1e-12, atol=0)
    model(x)
    model(x)  # forwards whose penalty is never taken ...
    opt.zero_grad()
    ((model(x) - t) ** 2).mean().backward()
    opt.step()
    assert float(reg.penalty()) == 0.0  # ... are dropped at the optimizer step


def test_loss_mode_gradient_accumulation_counts_each_micro_batch_once():
    xs = [data(seed=s, n=4) for s in range(3)]
    ref = make_model()
    for x, t in xs:
        (by_hand_loss(ref, x, t) / 3).backward()
    model = make_model()
    reg = tr.Regularizer(model, activity_rules(model, "loss"))
    for x, t in xs:
        ((((model(x) - t) ** 2).mean() + reg.penalty()) / 3).backward()
    for g, r in zip(grads(model), grads(ref)):
        torch.testing.assert_close(g, r, rtol=1e-13, atol=1e-15)


def test_batch_dim_and_schedule():
    x = torch.randn(7, 2, 5, dtype=torch.float64)  # (time, batch, features)
    model = nn.Sequential(nn.Linear(5, 4)).double()
    reg = tr.Regularizer(
        model,
        [
            tr.ActivityL1(0.3, on="0", mode="loss", batch_dim=1, name="seq"),
            tr.ActivityL2(0.3, on=nn.Linear, mode="loss", batch_dim=None, name="nodiv"),
            tr.ActivityL1(lambda k: 0.1 * (k + 1), on=nn.Linear, mode="loss", name="sched"),
        ],
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt)
    with torch.no_grad():
        y = model[0](x)
    model(x)
    expected = 0.3 * y.abs().sum() / 2 + 0.5 * 0.3 * (y * y).sum() + 0.1 * y.abs().sum() / 7
    torch.testing.assert_close(reg.penalty().detach(), expected, rtol=1e-13, atol=0)
    model(x).sum().backward()
    opt.step()  # step 1: the schedule gives 0.2
    model(x)
    expected = 0.3 * y.abs().sum() / 2 + 0.5 * 0.3 * (y * y).sum() + 0.2 * y.abs().sum() / 7
    torch.testing.assert_close(reg.penalty().detach(), expected, rtol=1e-13, atol=0)


# --------------------------------------------------------------------------- hooks lifecycle
@pytest.mark.parametrize("mode", ["grad", "loss"])
def test_detach_removes_hooks_and_attach_restores_them(mode):
    x, t = data()
    ref, plain, model = make_model(), make_model(), make_model()
    by_hand_loss(ref, x, t).backward()
    ((plain(x) - t) ** 2).mean().backward()
    reg = tr.Regularizer(model, activity_rules(model, mode))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def backward():
        model.zero_grad()
        loss = ((model(x) - t) ** 2).mean()
        (loss + reg.penalty()).backward()
        return grads(model)

    reg.attach(opt)
    reg.detach()
    assert not any(m._forward_hooks for m in model.modules())
    for g, r in zip(backward(), grads(plain)):
        torch.testing.assert_close(g, r, rtol=1e-13, atol=1e-15)
    with reg.attached(opt):
        for g, r in zip(backward(), grads(ref)):
            torch.testing.assert_close(g, r, rtol=1e-13, atol=1e-15)
    assert not any(m._forward_hooks for m in model.modules())


def test_in_place_change_after_the_module_raises_in_grad_mode():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x).mul_(2)

    m = M()
    tr.Regularizer(m, [tr.ActivityL1(0.1, on=nn.Linear, name="act")])
    with pytest.raises(RuntimeError, match=r"'act'.*in place"):
        m(torch.randn(2, 3)).sum().backward()


def test_module_selection_and_errors():
    model = make_model()
    for on in (
        "0",
        model[0],
        nn.Linear,
        tr.select.modules(nn.Linear),
        tr.select.within(model[0]),
        lambda n, m: n == "0",
        ["0", nn.Tanh],
    ):
        r = tr.ActivityL1(0.1, on=on)
        names = [n for n, _ in r.on.modules(model)]
        assert "0" in names and all(n in ("0", "1", "2") for n in names)
    assert [n for n, _ in tr.ActivityL1(0.1, on=nn.Linear).on.modules(model)] == ["0", "2"]
    with pytest.raises(TypeError, match="selects parameters"):
        tr.ActivityL1(0.1, on=tr.select.weights)
    with pytest.raises(TypeError, match="on= is required"):
        tr.ActivityL2(0.1)
    with pytest.raises(ValueError, match=r"'activityl1'.*selects no module"):
        tr.Regularizer(model, [tr.ActivityL1(0.1, on=nn.Conv2d)])
    tr.Regularizer(model, [tr.ActivityL1(0.1, on=nn.Conv2d)], allow_empty=True)
    with pytest.raises(ValueError, match="mode"):
        tr.ActivityL1(0.1, on=nn.Linear, mode="prox")
    with pytest.raises(ValueError, match="strength"):
        tr.ActivityL2(-1.0, on=nn.Linear)
    reg = tr.Regularizer(model, [tr.ActivityL1(0.1, on=nn.Linear), tr.L2(1e-3)])
    text = reg.summary()
    assert "activityl1" in text and "ActivityL1" in text
    # value()/grad() of one output tensor: the documented formula
    y = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(tr.ActivityL1(0.1, on=nn.Linear).value(y), 0.1 * y.abs().sum() / 4)
    torch.testing.assert_close(tr.ActivityL2(0.1, on=nn.Linear).grad(y), 0.1 * y / 4)
