"""When rules are applied: once per real optimizer step (accumulation, GradScaler
skips, fused unscaling), never on frozen/grad-less parameters, with closures and
LBFGS, across detach and several optimizers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import torch_regularizers as tr


# --------------------------------------------------------------------------- helpers
def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def make_data(n=32, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    y = torch.randn(n, 3, generator=g, dtype=dtype)
    return x, y


def batch(x, y, i, size=4):
    k = i % (x.shape[0] // size)
    return x[k * size : (k + 1) * size], y[k * size : (k + 1) * size]


def mse(model, xb, yb):
    return ((model(xb) - yb) ** 2).mean()


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(model, ref):
    ref_params = ref.parameters() if isinstance(ref, nn.Module) else ref
    for (n, p), q in zip(model.named_parameters(), ref_params):
        assert torch.equal(p, q), f"{n}: max |diff| = {(p - q).abs().max().item():.3e}"


def assert_params_close(model, ref, **tol):
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, n=n: f"{n}: {m}", **tol)


def assert_some_param_differs(a, b):
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), (
        "regularizer had no effect (test would be vacuous)"
    )


def soft_threshold_(p, t):
    p.copy_(torch.sign(p) * torch.clamp(p.abs() - t, min=0.0))


# --------------------------------------------------------------------------- gradient accumulation


def _accumulate(model, opt, x, y, outer=3, micro=4, extra=None):
    for s in range(outer):
        opt.zero_grad()
        for m in range(micro):
            xb, yb = batch(x, y, s * micro + m)
            (mse(model, xb, yb) / micro).backward()
        if extra is not None:
            extra(model)
        opt.step()


def test_accumulation_l2_grad_once_per_step_bit_identical_to_weight_decay():
    x, y = make_data()
    base = make_model()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    tr.Regularizer(ours, [tr.L2(0.1, on=tr.select.all)]).attach(opt_ours)
    _accumulate(ref, opt_ref, x, y)
    _accumulate(ours, opt_ours, x, y)
    assert_params_equal(ours, ref)


def test_accumulation_l2_decoupled_once_per_step_bit_identical_to_adamw():
    x, y = make_data()
    base = make_model()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2)
    tr.Regularizer(ours, [tr.L2(0.1, on=tr.select.all, mode="decoupled")]).attach(opt_ours)
    _accumulate(ref, opt_ref, x, y)
    _accumulate(ours, opt_ours, x, y)
    assert_params_equal(ours, ref)


def test_accumulation_l1_grad_once_per_step_matches_hand_written():
    lam = 0.05
    x, y = make_data(dtype=torch.float64)
    base = make_model(torch.float64)
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    tr.Regularizer(ours, [tr.L1(lam)]).attach(opt_ours)

    def add_l1_grad(model):
        for layer in (model[0], model[2]):
            layer.weight.grad.add_(lam * torch.sign(layer.weight.detach()))

    _accumulate(ref, opt_ref, x, y, extra=add_l1_grad)
    _accumulate(ours, opt_ours, x, y)
    assert_params_close(ours, ref, rtol=1e-12, atol=1e-14)


def test_accumulation_l1_prox_once_per_step_matches_hand_written():
    lam, lr = 0.3, 0.05
    x, y = make_data(dtype=torch.float64)
    base = make_model(torch.float64)
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=lr)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=lr)
    tr.Regularizer(ours, [tr.L1(lam, mode="prox")]).attach(opt_ours)
    for s in range(3):
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            for m in range(4):
                xb, yb = batch(x, y, s * 4 + m)
                (mse(model, xb, yb) / 4).backward()
            opt.step()
        with torch.no_grad():
            soft_threshold_(ref[0].weight, lr * lam)
            soft_threshold_(ref[2].weight, lr * lam)
    assert_params_close(ours, ref, rtol=1e-12, atol=1e-14)
    assert (ours[0].weight == 0).any()  # the prox did produce exact zeros


# --------------------------------------------------------------------------- GradScaler


OPT_KINDS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam_foreach": lambda params: torch.optim.Adam(params, lr=1e-2, foreach=True),
    "adam_fused": lambda params: torch.optim.Adam(params, lr=1e-2, fused=True),
}


def make_rule(kind, mode):
    if kind == "l2":
        return tr.L2(0.5, on=tr.select.all, mode=mode)
    return tr.L1(0.05, on=tr.select.all, mode=mode)


def scaler_run(
    opt_kind, rules, data_idx, skip=(), unscale_first=False, init_scale=2.0**8, impl_kw=None
):
    """Trains with GradScaler over the data batches ``data_idx``; at positions in
    ``skip`` a grad is set to inf so the step must be skipped (checked here)."""
    x, y = make_data()
    model = make_model()
    opt = OPT_KINDS[opt_kind](model.parameters())
    if rules:
        tr.Regularizer(model, rules, **(impl_kw or {})).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    for pos, i in enumerate(data_idx):
        opt.zero_grad()
        xb, yb = batch(x, y, i)
        scaler.scale(mse(model, xb, yb)).backward()
        if pos in skip:
            model[0].weight.grad[0, 0] = float("inf")
            before = snapshot(model)
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        if pos in skip:
            assert_params_equal(model, before)
    return model


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("mode", ["grad", "decoupled", "prox"])
@pytest.mark.parametrize("opt_kind", list(OPT_KINDS))
def test_gradscaler_skipped_step_applies_nothing(opt_kind, mode, kind, impl_kw):
    # step at position 1 is skipped (inside scaler_run the params are checked bit-for-bit)
    ours = scaler_run(
        opt_kind, [make_rule(kind, mode)], data_idx=[0, 1, 2, 3], skip={1}, impl_kw=impl_kw
    )
    # the next normal steps apply: same as never having seen the skipped batch
    ref = scaler_run(opt_kind, [make_rule(kind, mode)], data_idx=[0, 2, 3])
    assert_params_close(ours, ref, rtol=1e-6, atol=1e-7)
    plain = scaler_run(opt_kind, [], data_idx=[0, 2, 3])
    assert_some_param_differs(ours, plain)


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("mode", ["grad", "decoupled"])
def test_fused_adam_gradscaler_matches_foreach(mode, kind, unscale_first, impl_kw):
    fused = scaler_run(
        "adam_fused",
        [make_rule(kind, mode)],
        [0, 1, 2, 3, 4],
        skip={2},
        unscale_first=unscale_first,
        impl_kw=impl_kw,
    )
    foreach = scaler_run(
        "adam_foreach",
        [make_rule(kind, mode)],
        [0, 1, 2, 3, 4],
        skip={2},
        unscale_first=unscale_first,
    )
    assert_params_close(fused, foreach, rtol=1e-5, atol=1e-6)
    # guard: the regularization is visible at this tolerance (so an unscaled
    # grad-mode term, i.e. ∇R/scale, would fail the comparison above)
    plain = scaler_run("adam_fused", [], [0, 1, 2, 3, 4], skip={2})
    diff = max((p - q).abs().max().item() for p, q in zip(fused.parameters(), plain.parameters()))
    assert diff > 1e-4


# --------------------------------------------------------------------------- frozen / grad None


class WithFrozen(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 3)
        self.frozen = nn.Linear(5, 3)
        self.frozen.requires_grad_(False)
        self.sometimes = nn.Linear(5, 3)  # used on even steps only
        self.never = nn.Linear(5, 3)  # never used: grad stays None

    def forward(self, x, step):
        out = self.body(x) + self.frozen(x)
        if step % 2 == 0:
            out = out + self.sometimes(x)
        return out


def _train_frozen(model, opt, steps=6, after_step=None):
    x, y = make_data()
    for s in range(steps):
        opt.zero_grad()  # set_to_none=True: unused parameters keep grad None
        xb, yb = batch(x, y, s)
        ((model(xb, s) - yb) ** 2).mean().backward()
        before = snapshot(model)
        opt.step()
        if after_step is not None:
            after_step(model, s, before)


@pytest.mark.parametrize("all_in_optimizer", [True, False])
@pytest.mark.parametrize("mode", ["grad", "decoupled", "prox"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_frozen_and_grad_none_params_untouched(opt_name, mode, all_in_optimizer):
    model = WithFrozen()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = (
        list(model.parameters())
        if all_in_optimizer
        else [p for p in model.parameters() if p.requires_grad]
    )
    if opt_name == "sgd":
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(params, lr=1e-2)
    tr.Regularizer(model, [tr.L1(0.05, on=tr.select.all, mode=mode)]).attach(opt)

    def check(model, s, before):
        if s % 2 == 1:  # "sometimes" had grad None at this step
            for (n, p), q in zip(model.named_parameters(), before):
                if n.startswith("sometimes."):
                    assert torch.equal(p, q), f"{n} changed on a step where its grad was None"

    _train_frozen(model, opt, after_step=check)
    for n, p in model.named_parameters():
        if n.startswith(("frozen.", "never.")):
            assert torch.equal(p, init[n]), f"{n} changed"
            assert p.grad is None
        else:
            assert not torch.equal(p, init[n]), n


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("mode", ["grad", "decoupled"])
def test_grad_none_params_skipped_like_torch_weight_decay(mode, foreach, impl_kw):
    base = WithFrozen()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    if mode == "grad":
        opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
    else:
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2, foreach=foreach)
    tr.Regularizer(ours, [tr.L2(0.1, on=tr.select.all, mode=mode)], **impl_kw).attach(opt_ours)
    _train_frozen(ref, opt_ref)
    _train_frozen(ours, opt_ours)
    assert_params_equal(ours, ref)


# --------------------------------------------------------------------------- optimizer.step(closure)


@pytest.mark.parametrize("mode", ["grad", "decoupled", "prox"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_step_with_closure_bit_identical_to_closure_free(opt_name, mode, impl_kw):
    x, y = make_data()
    base = make_model()
    a, b, plain = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)

    def mk(model):
        if opt_name == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=1e-2)

    opt_a, opt_b, opt_plain = mk(a), mk(b), mk(plain)
    rules = lambda: [  # noqa: E731
        tr.L1(0.05, mode=mode),
        tr.L2(0.2, on=tr.select.biases, mode="prox" if mode != "prox" else "grad"),
    ]
    tr.Regularizer(a, rules(), **impl_kw).attach(opt_a)
    tr.Regularizer(b, rules(), **impl_kw).attach(opt_b)
    for s in range(6):
        xb, yb = batch(x, y, s)

        def closure(xb=xb, yb=yb):
            opt_a.zero_grad()
            loss = mse(a, xb, yb)
            loss.backward()
            return loss

        ret = opt_a.step(closure)
        assert ret is not None

        opt_b.zero_grad()
        mse(b, xb, yb).backward()
        opt_b.step()

        opt_plain.zero_grad()
        mse(plain, xb, yb).backward()
        opt_plain.step()
        assert_params_equal(a, b)
    assert_some_param_differs(a, plain)


# --------------------------------------------------------------------------- LBFGS


def _lbfgs_problem(seed=0, n=40, p=6):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    w_true = np.array([3.0, -2.0, 1.5, -4.0, 2.5, 1.0][:p])
    y = X @ w_true + 0.1 * rng.standard_normal(n)
    return X, y


def _lbfgs_fit(X, y, rule=None, hand_penalty=None):
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    model = nn.Linear(X.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.1)
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    if rule is not None:
        tr.Regularizer(model, [rule]).attach(opt)

    def closure():
        opt.zero_grad()
        loss = ((model(Xt).squeeze(1) - yt) ** 2).mean() / 2
        if hand_penalty is not None:
            loss = loss + hand_penalty(model.weight)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return model.weight.detach().squeeze(0).numpy()


def test_lbfgs_grad_mode_l2_matches_hand_written_and_ridge():
    X, y = _lbfgs_problem()
    lam = 0.3
    ours = _lbfgs_fit(X, y, rule=tr.L2(lam))
    hand = _lbfgs_fit(X, y, hand_penalty=lambda w: 0.5 * lam * (w**2).sum())
    n, p = X.shape
    ridge = np.linalg.solve(X.T @ X / n + lam * np.eye(p), X.T @ y / n)
    np.testing.assert_allclose(hand, ridge, atol=1e-6)  # the reference itself converged
    np.testing.assert_allclose(ours, hand, atol=1e-6)
    np.testing.assert_allclose(ours, ridge, atol=1e-6)


def test_lbfgs_grad_mode_l1_matches_hand_written_and_lasso():
    from sklearn.linear_model import Lasso

    X, y = _lbfgs_problem(seed=1)
    lam = 0.05  # small: every coefficient stays far from 0, so the objective is smooth there
    ours = _lbfgs_fit(X, y, rule=tr.L1(lam))
    hand = _lbfgs_fit(X, y, hand_penalty=lambda w: lam * w.abs().sum())
    sk = Lasso(alpha=lam, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(X, y).coef_
    assert (np.abs(sk) > 0.5).all()
    np.testing.assert_allclose(hand, sk, atol=1e-6)
    np.testing.assert_allclose(ours, hand, atol=1e-6)
    np.testing.assert_allclose(ours, sk, atol=1e-6)


def test_lbfgs_returned_loss_includes_penalty():
    X, y = _lbfgs_problem()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    lam = 0.3
    model = nn.Linear(X.shape[1], 1, bias=False).double()
    w0 = model.weight.detach().clone()
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=2)
    tr.Regularizer(model, [tr.L2(lam)]).attach(opt)

    def closure():
        opt.zero_grad()
        loss = ((model(Xt).squeeze(1) - yt) ** 2).mean() / 2
        loss.backward()
        return loss

    ret = opt.step(closure)  # LBFGS returns the first evaluation's loss
    data = ((Xt @ w0.squeeze(0) - yt) ** 2).mean() / 2
    torch.testing.assert_close(
        torch.as_tensor(ret).detach(), data + 0.5 * lam * (w0**2).sum(), rtol=1e-12, atol=1e-14
    )


# --------------------------------------------------------------------------- detach / attached


def test_detach_restores_plain_optimizer():
    x, y = make_data()
    base = make_model()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    reg = tr.Regularizer(ours, [tr.L2(0.1, on=tr.select.all)])
    assert reg.attach(opt_ours) is reg
    for s in range(6):
        if s == 3:
            reg.detach()
            opt_ref.param_groups[0]["weight_decay"] = 0.0
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            mse(model, *batch(x, y, s)).backward()
            opt.step()
        assert_params_equal(ours, ref)


@pytest.mark.parametrize("mode", ["grad", "decoupled", "prox"])
def test_detach_removes_every_mode(mode):
    x, y = make_data()
    base = make_model()
    ours, plain = copy.deepcopy(base), copy.deepcopy(base)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-2)
    reg = tr.Regularizer(ours, [tr.L1(0.05, mode=mode)])
    reg.attach(opt_ours)
    reg.detach()
    for s in range(4):
        for model, opt in ((plain, opt_plain), (ours, opt_ours)):
            opt.zero_grad()

            def closure(model=model, opt=opt, s=s):
                opt.zero_grad()
                loss = mse(model, *batch(x, y, s))
                loss.backward()
                return loss

            if s % 2:
                opt.step(closure)
            else:
                closure()
                opt.step()
    assert_params_equal(ours, plain)


def test_attached_context_manager_bit_identical_to_adamw_then_plain():
    x, y = make_data()
    base = make_model()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2)
    reg = tr.Regularizer(ours, [tr.L2(0.1, on=tr.select.all, mode="decoupled")])
    with reg.attached(opt_ours) as ctx:
        assert ctx is reg or ctx is None
        for s in range(3):
            for model, opt in ((ref, opt_ref), (ours, opt_ours)):
                opt.zero_grad()
                mse(model, *batch(x, y, s)).backward()
                opt.step()
    opt_ref.param_groups[0]["weight_decay"] = 0.0
    for s in range(3, 6):
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            mse(model, *batch(x, y, s)).backward()
            opt.step()
    assert_params_equal(ours, ref)


def test_attached_context_manager_detaches_on_exception():
    x, y = make_data()
    base = make_model()
    ours, plain = copy.deepcopy(base), copy.deepcopy(base)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.05)
    reg = tr.Regularizer(ours, [tr.L2(0.1, on=tr.select.all)])
    with pytest.raises(RuntimeError, match="boom"), reg.attached(opt_ours):
        raise RuntimeError("boom")
    for model, opt in ((ours, opt_ours), (plain, opt_plain)):
        opt.zero_grad()
        mse(model, *batch(x, y, 0)).backward()
        opt.step()
    assert_params_equal(ours, plain)


# --------------------------------------------------------------------------- several optimizers


def test_two_optimizers_each_get_their_rules():
    x, y = make_data()
    base = make_model()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    ref_a = torch.optim.SGD(ref[0].parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    ref_b = torch.optim.AdamW(ref[2].parameters(), lr=1e-2, weight_decay=0.2)
    opt_a = torch.optim.SGD(ours[0].parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.Adam(ours[2].parameters(), lr=1e-2)
    reg = tr.Regularizer(
        ours,
        [
            tr.L2(0.1, on=tr.select.within(ours[0])),
            tr.L2(0.2, on=tr.select.within(ours[2]), mode="decoupled"),
        ],
    )
    assert reg.attach(opt_a, opt_b) is reg
    for s in range(6):
        for model, opts in ((ref, (ref_a, ref_b)), (ours, (opt_a, opt_b))):
            for o in opts:
                o.zero_grad()
            mse(model, *batch(x, y, s)).backward()
            # step them at different times (GAN-like alternation)
            opts[s % 2].step()
            opts[1 - s % 2].step()
        assert_params_equal(ours, ref)


def test_one_rule_spanning_two_optimizers():
    x, y = make_data()
    base = make_model()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    ref_a = torch.optim.SGD(ref[0].parameters(), lr=0.05, weight_decay=0.1)
    ref_b = torch.optim.Adam(ref[2].parameters(), lr=1e-2, weight_decay=0.1)
    opt_a = torch.optim.SGD(ours[0].parameters(), lr=0.05)
    opt_b = torch.optim.Adam(ours[2].parameters(), lr=1e-2)
    tr.Regularizer(ours, [tr.L2(0.1, on=tr.select.all)]).attach(opt_a, opt_b)
    for s in range(4):
        for model, opts in ((ref, (ref_a, ref_b)), (ours, (opt_a, opt_b))):
            for o in opts:
                o.zero_grad()
            mse(model, *batch(x, y, s)).backward()
            for o in opts:
                o.step()
    assert_params_equal(ours, ref)


# --------------------------------------------------------------------------- schedules


SCHEDULE_OPTS = {
    "sgd": lambda params, **kw: torch.optim.SGD(params, lr=0.05, momentum=0.9, **kw),
    # fused: GradScaler calls step() even on a skipped step, with found_inf set
    "sgd_fused": lambda params, **kw: torch.optim.SGD(
        params, lr=0.05, momentum=0.9, fused=True, **kw
    ),
    "adam_fused": lambda params, **kw: torch.optim.Adam(params, lr=1e-2, fused=True, **kw),
}


@pytest.mark.parametrize("opt_kind", list(SCHEDULE_OPTS))
def test_schedule_uses_kth_applied_step_and_skipped_steps_do_not_count(opt_kind):
    def f(k):
        return 0.1 * (k + 1)

    x, y = make_data()
    base = make_model()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt_ref = SCHEDULE_OPTS[opt_kind](ref.parameters())
    opt_ours = SCHEDULE_OPTS[opt_kind](ours.parameters())
    tr.Regularizer(ours, [tr.L2(f, on=tr.select.all)]).attach(opt_ours)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    k = 0
    for s in range(6):
        xb, yb = batch(x, y, s)
        opt_ours.zero_grad()
        scaler.scale(mse(ours, xb, yb)).backward()
        if s in (1, 3):
            ours[0].weight.grad[0, 0] = float("inf")
            before = snapshot(ours)
        scaler.step(opt_ours)
        scaler.update()
        if s in (1, 3):
            assert_params_equal(ours, before)
            continue  # skipped: the reference never sees it
        opt_ref.param_groups[0]["weight_decay"] = f(k)
        opt_ref.zero_grad()
        mse(ref, xb, yb).backward()
        opt_ref.step()
        k += 1
    if opt_kind == "sgd":
        assert_params_equal(ours, ref)
    else:  # fused kernels unscale inside step(): same math, compare closely
        assert_params_close(ours, ref, rtol=1e-6, atol=1e-7)
