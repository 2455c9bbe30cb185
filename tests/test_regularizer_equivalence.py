"""Equivalence of the core penalties and modes with independent references.

References used here: torch's own ``weight_decay`` / ``AdamW``, autograd of the
penalty written out by hand, hand-computed closed forms, and scikit-learn's
``Lasso`` / ``ElasticNet`` solutions.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_regularizers as tr

LAM = 0.1


# --------------------------------------------------------------------------- helpers


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def make_data(n=16, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    y = torch.randn(n, 3, generator=g, dtype=dtype)
    return x, y


def train(model, opt, x, y, steps=12):
    for i in range(steps):
        sl = slice((i % 4) * 4, (i % 4) * 4 + 4)
        opt.zero_grad()
        loss = ((model(x[sl]) - y[sl]) ** 2).mean()
        loss.backward()
        opt.step()


def assert_params_equal(a, b):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        assert torch.equal(pa, pb), f"{na}: max |diff| = {(pa - pb).abs().max().item():.3e}"


def assert_some_param_differs(a, b):
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters())), (
        "regularizer had no effect (test would be vacuous)"
    )


OPTIMIZERS = {
    "sgd": lambda params, **kw: torch.optim.SGD(params, lr=0.05, momentum=0.9, **kw),
    "adam": lambda params, **kw: torch.optim.Adam(params, lr=1e-2, **kw),
    "rmsprop": lambda params, **kw: torch.optim.RMSprop(params, lr=1e-2, **kw),
}


class Holder(nn.Module):
    """One parameter ``w`` of arbitrary shape."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)


def penalty_cases(lam=0.3, alpha=0.2, rho=0.3):
    """(rule factory, written-out penalty) pairs."""
    return {
        "l1": (
            lambda **kw: tr.L1(lam, **kw),
            lambda p: lam * p.abs().sum(),
        ),
        "l2": (
            lambda **kw: tr.L2(lam, **kw),
            lambda p: 0.5 * lam * (p**2).sum(),
        ),
        "elasticnet": (
            lambda **kw: tr.ElasticNet(alpha, l1_ratio=rho, **kw),
            lambda p: alpha * rho * p.abs().sum() + 0.5 * alpha * (1 - rho) * (p**2).sum(),
        ),
    }


def rand_with_zeros(shape, dtype=torch.float64, seed=0):
    """Random entries with exact zeros at flat positions 1, 4, 7, ... (the subgradient of
    |.| is 0 there); position 0 is never zeroed, so every case (a (1, 1) one too) has a
    nonzero entry and the penalty acts on it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g, dtype=dtype)
    w.view(-1)[1::3] = 0.0
    assert (w != 0).any()
    return w


def autograd_grad(fn, p):
    q = p.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(q), q)
    return g


# --------------------------------------------------------------------------- grad mode == torch weight_decay


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("opt_name", ["sgd", "adam", "rmsprop"])
def test_l2_grad_mode_bit_identical_to_torch_weight_decay(opt_name, foreach, impl_kw):
    make_opt = OPTIMIZERS[opt_name]
    x, y = make_data()
    base = make_model()
    ref, ours, plain = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)

    opt_ref = make_opt(ref.parameters(), weight_decay=LAM, foreach=foreach)
    opt_ours = make_opt(ours.parameters(), weight_decay=0, foreach=foreach)
    opt_plain = make_opt(plain.parameters(), weight_decay=0, foreach=foreach)
    reg = tr.Regularizer(ours, [tr.L2(LAM, on=tr.select.all)], **impl_kw)
    reg.attach(opt_ours)

    train(ref, opt_ref, x, y)
    train(ours, opt_ours, x, y)
    train(plain, opt_plain, x, y)
    assert_params_equal(ours, ref)
    assert_some_param_differs(ours, plain)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_l2_grad_mode_maximize_bit_identical(opt_name, foreach, impl_kw):
    make_opt = OPTIMIZERS[opt_name]
    x, y = make_data()
    base = make_model()
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    opt_ref = make_opt(ref.parameters(), weight_decay=LAM, foreach=foreach, maximize=True)
    opt_ours = make_opt(ours.parameters(), weight_decay=0, foreach=foreach, maximize=True)
    tr.Regularizer(ours, [tr.L2(LAM, on=tr.select.all)], **impl_kw).attach(opt_ours)
    train(ref, opt_ref, x, y)
    train(ours, opt_ours, x, y)
    assert_params_equal(ours, ref)


def test_l2_grad_mode_maximize_still_minimizes_penalty():
    # maximize the (negated) loss -> ascent on -loss; with a huge L2 the weights must shrink
    base = make_model(torch.float64)
    w0 = base[0].weight.detach().norm()
    opt = torch.optim.SGD(base.parameters(), lr=0.1, maximize=True)
    tr.Regularizer(base, [tr.L2(5.0)]).attach(opt)
    x, _ = make_data(dtype=torch.float64)
    for _ in range(5):
        opt.zero_grad()
        (0.0 * base(x).sum()).backward()
        opt.step()
    assert base[0].weight.detach().norm() < 0.2 * w0


# --------------------------------------------------------------------------- decoupled == AdamW


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("which", ["AdamW", "Adam(decoupled_weight_decay=True)"])
def test_l2_decoupled_bit_identical_to_adamw(which, foreach, impl_kw):
    x, y = make_data()
    base = make_model()
    ref, ours, plain = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    if which == "AdamW":
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=LAM, foreach=foreach)
    else:
        opt_ref = torch.optim.Adam(
            ref.parameters(),
            lr=1e-2,
            weight_decay=LAM,
            decoupled_weight_decay=True,
            foreach=foreach,
        )
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2, weight_decay=0, foreach=foreach)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-2, weight_decay=0, foreach=foreach)
    tr.Regularizer(ours, [tr.L2(LAM, on=tr.select.all, mode="decoupled")], **impl_kw).attach(
        opt_ours
    )
    train(ref, opt_ref, x, y)
    train(ours, opt_ours, x, y)
    train(plain, opt_plain, x, y)
    assert_params_equal(ours, ref)
    assert_some_param_differs(ours, plain)


# --------------------------------------------------------------------------- unselected parameters untouched


@pytest.mark.parametrize("foreach", [False, True])
def test_partial_selection_matches_per_group_weight_decay(foreach):
    x, y = make_data()
    base = make_model()
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    rest = [p for n, p in ref.named_parameters() if n != "0.weight"]
    opt_ref = torch.optim.Adam(
        [{"params": [ref[0].weight], "weight_decay": LAM}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-2,
        foreach=foreach,
    )
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2, foreach=foreach)
    tr.Regularizer(ours, [tr.L2(LAM, on=tr.select.name("0.weight"))]).attach(opt_ours)
    train(ref, opt_ref, x, y)
    train(ours, opt_ours, x, y)
    assert_params_equal(ours, ref)


@pytest.mark.parametrize("mode", ["grad", "decoupled", "prox"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_unselected_params_bit_for_bit_plain_optimizer(mode, opt_name, impl_kw):
    # separable loss: each parameter's gradient depends on itself only, so an
    # unselected parameter must follow exactly the plain optimizer's trajectory.
    base = make_model()
    targets = {n: torch.randn_like(p) for n, p in base.named_parameters()}
    ours, plain = copy.deepcopy(base), copy.deepcopy(base)
    opt_ours = OPTIMIZERS[opt_name](ours.parameters())
    opt_plain = OPTIMIZERS[opt_name](plain.parameters())
    tr.Regularizer(ours, [tr.L1(0.05, on=tr.select.name("0.weight"), mode=mode)], **impl_kw).attach(
        opt_ours
    )
    for model, opt in ((ours, opt_ours), (plain, opt_plain)):
        for _ in range(10):
            opt.zero_grad()
            loss = sum(((p - targets[n]) ** 2).sum() for n, p in model.named_parameters())
            loss.backward()
            opt.step()
    for (n, p), q in zip(ours.named_parameters(), plain.parameters()):
        if n == "0.weight":
            assert not torch.equal(p, q), "selected parameter was not regularized"
        else:
            assert torch.equal(p, q), f"unselected parameter {n} changed"


# --------------------------------------------------------------------------- grad mode == autograd of R


SHAPES = [(7,), (3, 4), (2, 3, 4), (5, 1), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["l1", "l2", "elasticnet"])
def test_grad_mode_equals_autograd_of_written_penalty(kind, shape, impl_kw):
    make_rule, fn = penalty_cases()[kind]
    w = rand_with_zeros(shape)
    assert autograd_grad(fn, w).abs().sum() > 0  # the case is not vacuous
    model = Holder(w.clone())
    reg = tr.Regularizer(model, [make_rule(on=tr.select.all)], **impl_kw)
    g = torch.randn(shape, dtype=torch.float64)
    model.w.grad = g.clone()
    reg.apply_grad()
    torch.testing.assert_close(model.w.grad, g + autograd_grad(fn, w), rtol=1e-12, atol=1e-14)
    # the parameter itself is not touched by apply_grad
    assert torch.equal(model.w.detach(), w)
    # value() is the detached penalty
    v = reg.value()
    assert v.ndim == 0 and not v.requires_grad
    torch.testing.assert_close(v, fn(w), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["l1", "l2", "elasticnet"])
def test_grad_mode_default_selector_is_weights(kind):
    make_rule, fn = penalty_cases()[kind]
    model = make_model(torch.float64)
    reg = tr.Regularizer(model, [make_rule()])  # on=None -> tr.select.weights
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    reg.apply_grad()
    for n, p in model.named_parameters():
        if n.endswith("weight"):
            expected = grads[n] + autograd_grad(fn, p)
            torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-14)
        else:  # biases are not selected by the default selector
            assert torch.equal(p.grad, grads[n]), n


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["l1", "l2", "elasticnet"])
def test_grad_mode_sgd_step_via_attach(kind, shape, impl_kw):
    make_rule, fn = penalty_cases()[kind]
    lr = 0.1
    w = rand_with_zeros(shape, seed=3)
    assert autograd_grad(fn, w).abs().sum() > 0  # the case is not vacuous
    target = torch.randn(shape, dtype=torch.float64)
    model = Holder(w.clone())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tr.Regularizer(model, [make_rule(on=tr.select.all)], **impl_kw).attach(opt)
    opt.zero_grad()
    (0.5 * ((model.w - target) ** 2).sum()).backward()
    opt.step()
    expected = w - lr * ((w - target) + autograd_grad(fn, w))
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-12, atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    kind=st.sampled_from(["l1", "l2", "elasticnet"]),
    seed=st.integers(0, 2**16),
)
def test_grad_mode_autograd_property(shape, dtype, kind, seed):
    make_rule, fn = penalty_cases()[kind]
    w = rand_with_zeros(shape, dtype=dtype, seed=seed)
    model = Holder(w.clone())
    reg = tr.Regularizer(model, [make_rule(on=tr.select.all)])
    g = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    model.w.grad = g.clone()
    reg.apply_grad()
    assert model.w.grad.dtype == dtype
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(model.w.grad, g + autograd_grad(fn, w), **tol)


# --------------------------------------------------------------------------- loss mode


def test_loss_mode_penalty_matches_written_penalty_and_gradient():
    model = make_model(torch.float64)
    reg = tr.Regularizer(
        model,
        [
            tr.L2(0.1, mode="loss"),  # 0.weight, 2.weight
            tr.L1(0.05, on=tr.select.name("2.weight"), mode="loss"),
            tr.ElasticNet(0.3, l1_ratio=0.4, on=tr.select.all, mode="grad"),  # not in penalty()
        ],
    )
    w0, w2 = model[0].weight, model[2].weight
    expected = 0.5 * 0.1 * ((w0**2).sum() + (w2**2).sum()) + 0.05 * w2.abs().sum()
    pen = reg.penalty()
    assert pen.ndim == 0 and pen.requires_grad
    torch.testing.assert_close(pen, expected, rtol=1e-12, atol=1e-14)

    params = list(model.parameters())
    got = torch.autograd.grad(pen, params, allow_unused=True)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    for (n, _), a, b in zip(model.named_parameters(), got, want):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, n
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)

    # value(): detached sum of *every* rule, including the grad-mode elastic net
    en = sum(0.3 * 0.4 * p.abs().sum() + 0.5 * 0.3 * 0.6 * (p**2).sum() for p in model.parameters())
    v = reg.value()
    assert v.ndim == 0 and not v.requires_grad
    torch.testing.assert_close(v, (expected + en).detach(), rtol=1e-12, atol=1e-14)


def test_loss_mode_is_never_applied_automatically():
    x, y = make_data(dtype=torch.float64)
    base = make_model(torch.float64)
    ours, plain = copy.deepcopy(base), copy.deepcopy(base)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    tr.Regularizer(ours, [tr.L1(0.5, mode="loss")]).attach(opt_ours)
    train(ours, opt_ours, x, y, steps=5)
    train(plain, opt_plain, x, y, steps=5)
    assert_params_equal(ours, plain)


def test_loss_mode_training_equals_hand_written_loss():
    x, y = make_data(dtype=torch.float64)
    base = make_model(torch.float64)
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    reg = tr.Regularizer(ours, [tr.L1(0.05, mode="loss")])
    for _ in range(5):
        opt_ours.zero_grad()
        (((ours(x) - y) ** 2).mean() + reg.penalty()).backward()
        opt_ours.step()
        opt_ref.zero_grad()
        pen = 0.05 * (ref[0].weight.abs().sum() + ref[2].weight.abs().sum())
        (((ref(x) - y) ** 2).mean() + pen).backward()
        opt_ref.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- prox == scikit-learn


def _regression(n=80, p=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    w_true = np.array([3.0, -2.0, 0.0, 0.0, 1.5, 0.0, -0.7, 0.0][:p])
    y = X @ w_true + 0.3 * rng.standard_normal(n)
    return X, y


def _ista(X, y, rule, iters):
    Xt = torch.from_numpy(X)
    yt = torch.from_numpy(y)
    n, p = X.shape
    L = float(np.linalg.eigvalsh(X.T @ X / n).max())
    model = nn.Linear(p, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=1.0 / L)
    tr.Regularizer(model, [rule]).attach(opt)
    for _ in range(iters):
        opt.zero_grad()
        loss = ((model(Xt).squeeze(1) - yt) ** 2).mean() / 2
        loss.backward()
        opt.step()
    return model.weight.detach().squeeze(0).numpy()


def test_l1_prox_sgd_matches_sklearn_lasso():
    from sklearn.linear_model import Lasso

    X, y = _regression()
    alpha = 0.2
    sk = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(X, y).coef_
    assert (sk == 0).any() and (sk != 0).any()  # non-trivial sparsity pattern
    w = _ista(X, y, tr.L1(alpha, mode="prox"), iters=600)
    np.testing.assert_allclose(w, sk, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(w == 0.0, sk == 0.0)


def test_elasticnet_prox_sgd_matches_sklearn_elasticnet():
    from sklearn.linear_model import ElasticNet

    X, y = _regression(seed=1)
    alpha, rho = 0.3, 0.7
    sk = (
        ElasticNet(alpha=alpha, l1_ratio=rho, fit_intercept=False, tol=1e-12, max_iter=100_000)
        .fit(X, y)
        .coef_
    )
    assert (sk == 0).any() and (sk != 0).any()
    w = _ista(X, y, tr.ElasticNet(alpha, l1_ratio=rho, mode="prox"), iters=600)
    np.testing.assert_allclose(w, sk, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(w == 0.0, sk == 0.0)


# --------------------------------------------------------------------------- lr_coupling


def _decoupled_run(lr_coupling, lam, lrs, scheduler_factory=None):
    """Runs SGD (no momentum) + decoupled L2 with the given coupling; returns
    (final weight, hand-computed reference). ``lrs`` is the lr at each step."""
    torch.manual_seed(0)
    model = Holder(torch.randn(3, 4, dtype=torch.float64))
    target = torch.randn(3, 4, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0])
    sched = scheduler_factory(opt) if scheduler_factory else None
    tr.Regularizer(
        model, [tr.L2(lam, on=tr.select.all, mode="decoupled", lr_coupling=lr_coupling)]
    ).attach(opt)
    ref = model.w.detach().clone()
    for lr in lrs:
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        opt.zero_grad()
        (0.5 * ((model.w - target) ** 2).sum()).backward()
        opt.step()
        if sched is not None:
            sched.step()
        g = ref - target  # gradient at the pre-step parameters
        c = {"none": lam, "lr": lr * lam, "lr_ratio": lam * lr / lrs[0]}[lr_coupling]
        ref = ref * (1 - c) - lr * g
    return model.w.detach(), ref


@pytest.mark.parametrize("lr_coupling", ["lr", "none"])
def test_lr_coupling_constant_lr(lr_coupling):
    got, ref = _decoupled_run(lr_coupling, 0.05, [0.2] * 6)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_lr_coupling_lr_ratio_with_scheduler():
    lrs = [0.2 * 0.5**k for k in range(6)]
    got, ref = _decoupled_run(
        "lr_ratio",
        0.05,
        lrs,
        scheduler_factory=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_lr_coupling_none_independent_of_lr():
    # with lr_coupling="none" the decay factor must not depend on a changing lr
    lrs = [0.2 * 0.5**k for k in range(6)]
    got, ref = _decoupled_run(
        "none",
        0.05,
        lrs,
        scheduler_factory=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- manual API


def _manual_model(seed=0):
    w = rand_with_zeros((4, 5), seed=seed)
    w.view(-1)[1::7] = 0.004  # small entries that the prox must zero out (t = 0.1*0.3 = 0.03)
    model = Holder(w.clone())
    model.w.grad = torch.zeros_like(w)  # present grad: manual calls act on "stepped" params
    return model, w


def soft_threshold(w, t):
    return torch.sign(w) * torch.clamp(w.abs() - t, min=0.0)


@pytest.mark.parametrize("kind", ["l1", "l2", "elasticnet"])
def test_manual_apply_decoupled(kind, impl_kw):
    make_rule, fn = penalty_cases()[kind]
    model, w = _manual_model()
    reg = tr.Regularizer(model, [make_rule(on=tr.select.all, mode="decoupled")], **impl_kw)
    reg.apply_decoupled(lr=0.1)
    expected = w - 0.1 * autograd_grad(fn, w)
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-12, atol=1e-14)


def test_manual_apply_decoupled_l2_scaling_form():
    model, w = _manual_model()
    reg = tr.Regularizer(model, [tr.L2(0.3, on=tr.select.all, mode="decoupled")])
    reg.apply_decoupled(lr=0.1)
    torch.testing.assert_close(model.w.detach(), w * (1 - 0.1 * 0.3), rtol=1e-14, atol=0)


def test_manual_apply_prox_l1_soft_threshold_exact_zeros(impl_kw):
    lam, lr = 0.3, 0.1
    model, w = _manual_model()
    reg = tr.Regularizer(model, [tr.L1(lam, on=tr.select.all, mode="prox")], **impl_kw)
    reg.apply_prox(lr=lr)
    out = model.w.detach()
    torch.testing.assert_close(out, soft_threshold(w, lr * lam), rtol=1e-14, atol=1e-15)
    # exact zeros exactly where |w| <= lr*lam
    assert torch.equal(out == 0, w.abs() <= lr * lam)
    assert (w.abs() <= lr * lam).any() and (w != 0).any()


def test_manual_apply_prox_l2(impl_kw):
    lam, lr = 0.3, 0.1
    model, w = _manual_model()
    reg = tr.Regularizer(model, [tr.L2(lam, on=tr.select.all, mode="prox")], **impl_kw)
    reg.apply_prox(lr=lr)
    torch.testing.assert_close(model.w.detach(), w / (1 + lr * lam), rtol=1e-14, atol=1e-15)


def test_manual_apply_prox_elasticnet(impl_kw):
    alpha, rho, lr = 0.3, 0.4, 0.1
    model, w = _manual_model()
    reg = tr.Regularizer(
        model, [tr.ElasticNet(alpha, l1_ratio=rho, on=tr.select.all, mode="prox")], **impl_kw
    )
    reg.apply_prox(lr=lr)
    expected = soft_threshold(w, lr * alpha * rho) / (1 + lr * alpha * (1 - rho))
    out = model.w.detach()
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-15)
    assert torch.equal(out == 0, expected == 0)


def test_manual_apply_prox_is_argmin_of_prox_objective():
    # independent check of the prox definition: prox_{tR}(v) = argmin_x ½‖x−v‖² + t·R(x)
    alpha, rho, t = 0.3, 0.4, 0.5
    model, v = _manual_model(seed=5)
    reg = tr.Regularizer(model, [tr.ElasticNet(alpha, l1_ratio=rho, on=tr.select.all, mode="prox")])
    reg.apply_prox(lr=t)
    x = model.w.detach()

    def obj(z):
        return 0.5 * ((z - v) ** 2).sum() + t * (
            alpha * rho * z.abs().sum() + 0.5 * alpha * (1 - rho) * (z**2).sum()
        )

    g = torch.Generator().manual_seed(0)
    base = obj(x)
    for _ in range(50):
        assert obj(x + 1e-3 * torch.randn(x.shape, generator=g, dtype=x.dtype)) > base


def test_manual_apply_grad_only_touches_grad_mode_rules():
    model, w = _manual_model()
    g = torch.randn_like(w)
    model.w.grad = g.clone()
    reg = tr.Regularizer(
        model,
        [
            tr.L2(0.3, on=tr.select.all, mode="grad"),
            tr.L1(0.2, on=tr.select.all, mode="prox"),
        ],
    )
    reg.apply_grad()
    torch.testing.assert_close(model.w.grad, g + 0.3 * w, rtol=1e-14, atol=1e-15)
    assert torch.equal(model.w.detach(), w)
    reg.apply_prox(lr=0.1)
    torch.testing.assert_close(model.w.detach(), soft_threshold(w, 0.02), rtol=1e-14, atol=1e-15)
