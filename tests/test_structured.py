"""Structured penalties (DESIGN §1, issue 4): GroupLasso, SparseGroupLasso, L2SP, Orthogonal,
Penalty.from_fn.

Expected values come from independent references only: autograd (float64) of the formula
written out group by group with plain indexing, closed forms in numpy, optimality of the
prox checked by perturbation, and scikit-learn's MultiTaskLasso / Lasso solutions.
"""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_regularizers as tr

HYP = settings(deadline=None, max_examples=25)


pytestmark = pytest.mark.usefixtures("one_thread")


IMPLS = ("reference", "foreach")

# (shape, dim): dim as for torch.linalg.vector_norm; None = all but dim 0 / one group for 1-D
GROUP_CASES = [
    ((), None),
    ((7,), None),
    ((7,), 0),
    ((3, 4), None),
    ((3, 4), 0),
    ((3, 4), 1),
    ((3, 4), (0, 1)),
    ((2, 3, 4), None),
    ((2, 3, 4), (0, 2)),
    ((2, 3, 4), -1),
    ((4, 2, 3, 3), None),
    ((1, 1), None),
]


# --------------------------------------------------------------------------- references
def reduced_dims(shape, dim):
    nd = len(shape)
    if dim is None:
        return tuple(range(1, nd)) if nd >= 2 else tuple(range(nd))
    dims = (dim,) if isinstance(dim, int) else dim
    return tuple(sorted(d % nd for d in dims))


def groups(shape, dim):
    """Index tuples (ints on kept dims, full slices on reduced dims), one per group."""
    red = reduced_dims(shape, dim)
    kept = [d for d in range(len(shape)) if d not in red]
    for idx in itertools.product(*[range(shape[d]) for d in kept]):
        ix = [slice(None)] * len(shape)
        for d, i in zip(kept, idx):
            ix[d] = i
        yield tuple(ix)


def ref_gl(x: torch.Tensor, lam: float, dim) -> torch.Tensor:
    """λ·Σ_g √size_g·‖x_g‖, group by group; all-zero groups contribute 0 (and, by the
    contract, a zero gradient), so they are left out of the graph."""
    total = (0 * x).sum()  # connected to x, so an all-zero tensor has gradient 0
    for ix in groups(tuple(x.shape), dim):
        g = x[ix]
        if bool((g != 0).any()):
            total = total + math.sqrt(g.numel()) * torch.sqrt((g * g).sum())
    return lam * total


def ref_sgl(x, lam, rho, dim):
    return lam * rho * x.abs().sum() + ref_gl(x, lam * (1 - rho), dim)


def autograd_ref(fn, theta):
    x = theta.detach().to(torch.float64).clone().requires_grad_(True)
    v = fn(x)
    (g,) = torch.autograd.grad(v, x)
    return v.detach(), g


def np_group_prox(x: np.ndarray, lam: float, t: float, dim) -> np.ndarray:
    """Block soft-threshold written out: x_g·max(0, 1 − tλ√s/‖x_g‖), 0 for a zero group."""
    out = np.array(x, dtype=np.float64, copy=True)
    for ix in groups(x.shape, dim):
        g = np.asarray(x[ix], dtype=np.float64)
        n = math.sqrt(float((g * g).sum()))
        s = g.size
        out[ix] = g * max(0.0, 1 - t * lam * math.sqrt(s) / n) if n > 0 else 0.0
    return out


def np_soft(x, thr):
    return np.sign(x) * np.maximum(np.abs(x) - thr, 0.0)


def with_zero_groups(x: torch.Tensor, dim, every: int = 2) -> torch.Tensor:
    x = x.clone()
    for k, ix in enumerate(groups(tuple(x.shape), dim)):
        if k % every == 0:
            x[ix] = 0
    return x


def rand(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def assert_prox_optimal(prox_x, theta, t, R, trials=40, seed=0):
    """prox_x minimizes F(x) = ½‖x − θ‖² + t·R(x): no perturbation lowers F (F is convex)."""
    F = lambda z: 0.5 * float(((z - theta) ** 2).sum()) + t * float(R(z))  # noqa: E731
    f0 = F(prox_x)
    g = torch.Generator().manual_seed(seed)
    for _ in range(trials):
        d = torch.randn(theta.shape, generator=g, dtype=torch.float64)
        for eps in (1e-2, 1e-4):
            assert F(prox_x + eps * d) >= f0 - 1e-12


# --------------------------------------------------------------------------- GroupLasso math
@pytest.mark.parametrize("shape,dim", GROUP_CASES)
@pytest.mark.parametrize("zero_groups", [False, True])
def test_group_lasso_value_grad_match_autograd(shape, dim, zero_groups):
    theta = rand(shape, seed=len(shape))
    if zero_groups:
        theta = with_zero_groups(theta, dim)
    lam = 0.37
    rule = tr.GroupLasso(lam, dim=dim)
    v_ref, g_ref = autograd_ref(lambda x: ref_gl(x, lam, dim), theta)
    torch.testing.assert_close(rule.value(theta), v_ref, rtol=1e-12, atol=1e-12)
    g = rule.grad(theta)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    # "loss" mode differentiates value(): same gradient, 0 (not NaN) at zero groups
    x = theta.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad(rule.value(x), x)
    assert torch.isfinite(g_auto).all()
    torch.testing.assert_close(g_auto, g_ref, rtol=1e-12, atol=1e-12)
    # float32 parameters: same numbers at float32 precision
    torch.testing.assert_close(rule.grad(theta.float()), g_ref.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,dim", GROUP_CASES)
@pytest.mark.parametrize("t", [0.05, 0.6, 5.0])
def test_group_lasso_prox_is_block_soft_threshold(shape, dim, t):
    theta = with_zero_groups(rand(shape, seed=3) * 2, dim, every=3)
    lam = 0.5
    rule = tr.GroupLasso(lam, dim=dim)
    out = rule.prox(theta, t)
    expected = np_group_prox(theta.numpy(), lam, t, dim)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-14)
    # whole groups are exactly zero where the closed form says so
    for ix in groups(shape, dim):
        assert bool((out[ix] == 0).all()) == bool(np.all(expected[ix] == 0))
    assert_prox_optimal(out, theta, t, lambda z: ref_gl(z, lam, dim))
    assert torch.equal(
        theta, with_zero_groups(rand(shape, seed=3) * 2, dim, every=3)
    )  # no aliasing


@pytest.mark.parametrize("shape,dim", GROUP_CASES)
@pytest.mark.parametrize("rho", [0.0, 0.3, 1.0])
def test_sparse_group_lasso_value_grad_prox(shape, dim, rho):
    theta = with_zero_groups(rand(shape, seed=5), dim)
    lam, t = 0.4, 0.7
    rule = tr.SparseGroupLasso(lam, l1_ratio=rho, dim=dim)
    v_ref, g_ref = autograd_ref(lambda x: ref_sgl(x, lam, rho, dim), theta)
    torch.testing.assert_close(rule.value(theta), v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rule.grad(theta), g_ref, rtol=1e-12, atol=1e-12)
    out = rule.prox(theta, t)
    expected = np_group_prox(np_soft(theta.numpy(), t * lam * rho), lam * (1 - rho), t, dim)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert_prox_optimal(out, theta, t, lambda z: ref_sgl(z, lam, rho, dim))


def test_sparse_group_lasso_limits_equal_lasso_and_group_lasso():
    theta = with_zero_groups(rand((5, 6), seed=11), None, every=3)
    lam, t = 0.3, 0.8
    for sgl, other in (
        (tr.SparseGroupLasso(lam, l1_ratio=1.0), tr.L1(lam)),
        (tr.SparseGroupLasso(lam, l1_ratio=0.0, dim=0), tr.GroupLasso(lam, dim=0)),
    ):
        torch.testing.assert_close(sgl.value(theta), other.value(theta), rtol=1e-14, atol=0)
        torch.testing.assert_close(sgl.grad(theta), other.grad(theta), rtol=1e-14, atol=0)
        torch.testing.assert_close(sgl.prox(theta, t), other.prox(theta, t), rtol=1e-14, atol=0)
    # and the L1 limit is the written-out lasso
    torch.testing.assert_close(
        tr.SparseGroupLasso(lam, l1_ratio=1.0).prox(theta, t),
        torch.from_numpy(np_soft(theta.numpy(), t * lam)),
    )


@st.composite
def group_arrays(draw):
    nd = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd)))
    if nd == 0:
        dim = None
    else:
        dim = draw(
            st.one_of(
                st.none(),
                st.integers(-nd, nd - 1),
                st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True).map(tuple),
            )
        )
    n = math.prod(shape)
    # magnitudes whose squares do not underflow (tiny values: test_group_rules_tiny_values)
    mag = st.one_of(st.just(0.0), st.floats(1e-6, 3.0))
    vals = draw(
        st.lists(
            st.tuples(mag, st.booleans()).map(lambda m: -m[0] if m[1] else m[0]),
            min_size=n,
            max_size=n,
        )
    )
    x = torch.tensor(vals, dtype=torch.float64).reshape(shape)
    gs = list(groups(shape, dim))
    zero = draw(st.lists(st.booleans(), min_size=len(gs), max_size=len(gs)))
    for ix, z in zip(gs, zero):
        if z:
            x[ix] = 0
    return x, dim


@HYP
@given(group_arrays(), st.floats(0, 2), st.floats(0, 1), st.floats(0.01, 3))
def test_group_rules_hypothesis(case, lam, rho, t):
    theta, dim = case
    for rule, ref in (
        (tr.GroupLasso(lam, dim=dim), lambda x: ref_gl(x, lam, dim)),
        (tr.SparseGroupLasso(lam, rho, dim=dim), lambda x: ref_sgl(x, lam, rho, dim)),
    ):
        v_ref, g_ref = autograd_ref(ref, theta)
        g = rule.grad(theta)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(rule.value(theta), v_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
        out = rule.prox(theta, t)
        assert torch.isfinite(out).all()
        l1_thr = t * lam * rho if isinstance(rule, tr.SparseGroupLasso) else 0.0
        gl_lam = lam * (1 - rho) if isinstance(rule, tr.SparseGroupLasso) else lam
        expected = np_group_prox(np_soft(theta.numpy(), l1_thr), gl_lam, t, dim)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_group_rules_tiny_values_never_nan_or_inf(dtype):
    """Groups whose norm underflows or is subnormal act as zero groups: finite everywhere."""
    tiny = torch.finfo(dtype).tiny
    theta = torch.tensor(
        [[tiny / 4, 0.0, 0.0], [0.0, 0.0, 0.0], [1e-30, 0.0, 0.0], [1.0, -2.0, 0.5]], dtype=dtype
    )
    for lam in (0.0, 1e-3, 50.0):
        for rule in (tr.GroupLasso(lam), tr.SparseGroupLasso(lam, 0.5)):
            assert torch.isfinite(rule.value(theta)) and torch.isfinite(rule.grad(theta)).all()
            assert torch.isfinite(rule.prox(theta, 0.1)).all()
            x = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(rule.value(x), x)
            assert torch.isfinite(g).all()
            for impl in IMPLS:
                ps, gs = [theta.clone()], [torch.zeros_like(theta)]
                rule.grad_(ps, gs, lam, 1.0, impl=impl)
                rule.decay_(ps, lam, 0.1, impl=impl)
                assert torch.isfinite(gs[0]).all() and torch.isfinite(ps[0]).all()
                rule.prox_(ps, lam, 0.1, impl=impl)
                assert torch.isfinite(ps[0]).all()
    # the last row is an ordinary group: its gradient is λ√3·θ/‖θ‖
    w = theta[3].double()
    torch.testing.assert_close(
        tr.GroupLasso(2.0).grad(theta)[3].double(),
        2.0 * math.sqrt(3) * w / w.norm(),
        rtol=1e-2,
        atol=1e-2,
    )


def test_group_lasso_zero_step_and_masked_step_change_nothing():
    theta = with_zero_groups(rand((4, 5), seed=2).float(), None)
    rule = tr.GroupLasso(0.5, mode="prox")
    for eta in (0.0, torch.tensor(0.0)):
        for impl in IMPLS:
            p = theta.clone()
            rule.prox_([p], 0.5, eta, impl=impl)
            assert torch.equal(p, theta)


# --------------------------------------------------------------------------- multi-tensor path
MANY_SHAPES = (
    [(6, 5)] * 4
    + [(7,)] * 3
    + [(3, 4, 2), (2,), (4, 1, 3, 3), (4, 1, 3, 3), (300, 260), (300, 260), (1, 9)]
)


def many_tensors(dtype, seed=0, dim=None):
    ps, gs = [], []
    for i, s in enumerate(MANY_SHAPES):
        p = rand(s, seed=seed + i) * 0.3
        if i % 3 == 0:
            p = with_zero_groups(p, dim)
        ps.append(p.to(dtype))
        gs.append(rand(s, seed=100 + i).to(dtype))
    return ps, gs


@pytest.mark.parametrize("dim", [None, 0, -1])
@pytest.mark.parametrize("make", ["gl", "sgl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_multi_tensor_path_matches_formula(dim, make, dtype):
    lam, rho, scale, eta = 0.2, 0.35, 0.7, 0.3
    rule = tr.GroupLasso(lam, dim=dim) if make == "gl" else tr.SparseGroupLasso(lam, rho, dim=dim)
    ref = (lambda x: ref_gl(x, lam, dim)) if make == "gl" else (lambda x: ref_sgl(x, lam, rho, dim))
    l1_thr = eta * lam * rho if make == "sgl" else 0.0
    gl_lam = lam * (1 - rho) if make == "sgl" else lam
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    ps0, gs0 = many_tensors(dtype, dim=dim)
    exp_grads, exp_decay, exp_prox = [], [], []
    for p, g in zip(ps0, gs0):
        _, dr = autograd_ref(ref, p)
        exp_grads.append(g.double() + scale * dr)
        exp_decay.append(p.double() - eta * dr)
        exp_prox.append(
            torch.from_numpy(np_group_prox(np_soft(p.double().numpy(), l1_thr), gl_lam, eta, dim))
        )
    for impl in IMPLS:
        ps, gs = [p.clone() for p in ps0], [g.clone() for g in gs0]
        rule.grad_(ps, gs, lam, scale, impl=impl)
        for g, e in zip(gs, exp_grads):
            torch.testing.assert_close(g.double(), e, **tol)
        assert all(torch.equal(a, b) for a, b in zip(ps, ps0))  # grad_ never touches θ
        rule.decay_(ps, lam, eta, impl=impl)
        for p, e in zip(ps, exp_decay):
            torch.testing.assert_close(p.double(), e, **tol)
        ps = [p.clone() for p in ps0]
        rule.prox_(ps, lam, eta, impl=impl)
        for p, e in zip(ps, exp_prox):
            torch.testing.assert_close(p.double(), e, **tol)
            assert torch.equal(p == 0, e.to(p.dtype) == 0) or dtype != torch.float64


@pytest.mark.parametrize("make", ["gl", "sgl"])
def test_group_multi_tensor_bf16_agrees_with_reference(make):
    lam, rho = 0.2, 0.35
    rule = tr.GroupLasso(lam) if make == "gl" else tr.SparseGroupLasso(lam, rho)
    ps0, gs0 = many_tensors(torch.bfloat16, seed=7)
    outs = {}
    for impl in IMPLS:
        ps, gs = [p.clone() for p in ps0], [g.clone() for g in gs0]
        rule.grad_(ps, gs, lam, 1.0, impl=impl)
        rule.prox_(ps, lam, 0.5, impl=impl)
        outs[impl] = (gs, ps)
        for p in ps:
            assert p.dtype == torch.bfloat16
    for a, b in zip(
        outs["reference"][0] + outs["reference"][1], outs["foreach"][0] + outs["foreach"][1]
    ):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- scikit-learn
def _multitask_problem(n=120, p=10, T=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    W = rng.standard_normal((p, T))
    W[[1, 4, 7, 8]] = 0.0  # irrelevant features
    W[2] *= 0.05  # a weak one
    Y = X @ W + 0.3 * rng.standard_normal((n, T))
    return X, Y


def _ista(X, Y, rule, steps):
    """Full-batch proximal gradient on (1/(2n))‖Y − X Wᵀ‖²_F through a Regularizer."""
    n, p = X.shape
    T = Y.shape[1]
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    model = nn.Linear(p, T, bias=False).double()
    nn.init.zeros_(model.weight)
    L = float(np.linalg.eigvalsh(X.T @ X / n).max())
    opt = torch.optim.SGD(model.parameters(), lr=1.0 / L)
    reg = tr.Regularizer(model, [rule]).attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((Xt @ model.weight.T - Yt) ** 2).sum() / (2 * n)
        loss.backward()
        opt.step()
    return model.weight.detach().numpy(), reg


@pytest.mark.parametrize("make", ["gl", "sgl0"])
def test_group_lasso_prox_reaches_multitask_lasso(make):
    from sklearn.linear_model import MultiTaskLasso

    X, Y = _multitask_problem()
    alpha, T = 0.25, Y.shape[1]
    sk = MultiTaskLasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(X, Y)
    # sklearn: α·Σ_j ‖W_j‖ without √size; ours: λ·√T·Σ_j ‖W_j‖ -> λ = α/√T; group = column (dim=0)
    lam = alpha / math.sqrt(T)
    rule = (
        tr.GroupLasso(lam, dim=0, mode="prox")
        if make == "gl"
        else tr.SparseGroupLasso(lam, l1_ratio=0.0, dim=0, mode="prox")
    )
    W, reg = _ista(X, Y, rule, steps=300)
    sk_zero = np.all(sk.coef_ == 0, axis=0)
    our_zero = np.all(W == 0, axis=0)
    assert sk_zero.sum() >= 4  # the test is not trivial
    np.testing.assert_array_equal(our_zero, sk_zero)
    np.testing.assert_allclose(W, sk.coef_, atol=1e-7, rtol=1e-6)
    stats = reg.stats()
    name = "grouplasso" if make == "gl" else "sparsegrouplasso"
    assert stats[f"{name}/zero_groups"] == sk_zero.sum()
    assert stats[f"{name}/zero_group_fraction"] == pytest.approx(sk_zero.sum() / X.shape[1])
    assert stats[f"{name}/sparsity"] == pytest.approx(sk_zero.sum() / X.shape[1])
    v_ref = alpha * np.linalg.norm(W, axis=0).sum()  # λ√T Σ‖W_j‖ = α Σ‖W_j‖
    assert stats[f"{name}/value"] == pytest.approx(v_ref, rel=1e-12)


def test_sparse_group_lasso_l1_limit_reaches_lasso():
    from sklearn.linear_model import Lasso

    X, Y = _multitask_problem(T=1, seed=3)
    alpha = 0.1
    sk = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(X, Y[:, 0])
    W, _ = _ista(X, Y, tr.SparseGroupLasso(alpha, l1_ratio=1.0, mode="prox"), steps=300)
    assert (sk.coef_ == 0).sum() >= 3
    np.testing.assert_array_equal(W[0] == 0, sk.coef_ == 0)
    np.testing.assert_allclose(W[0], sk.coef_, atol=1e-7, rtol=1e-6)


def test_group_lasso_stats_count_zero_groups_of_each_tensor():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv1d(5, 4, 3))
    with torch.no_grad():
        model[0].weight[[0, 3]] = 0
        model[2].weight[1] = 0
    reg = tr.Regularizer(model, [tr.GroupLasso(0.1)])
    s = reg.stats()
    assert s["grouplasso/zero_groups"] == 3
    assert s["grouplasso/zero_group_fraction"] == pytest.approx(3 / 9)
    w0, w2 = model[0].weight.detach().double(), model[2].weight.detach().double()
    v = 0.1 * (
        math.sqrt(6) * w0.norm(dim=1).sum() + math.sqrt(15) * w2.flatten(1).norm(dim=1).sum()
    )
    assert s["grouplasso/value"] == pytest.approx(float(v), rel=1e-6)


def test_group_rules_validate_arguments():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"dim=2.*0\.weight.*1\.weight"):
        tr.Regularizer(model, [tr.GroupLasso(0.1, dim=2)])
    with pytest.raises(ValueError, match=r"dim.*bias"):
        tr.Regularizer(model, [tr.GroupLasso(0.1, dim=1, on=tr.select.all)])
    with pytest.raises(TypeError, match="dim"):
        tr.GroupLasso(0.1, dim="rows")
    with pytest.raises(ValueError, match="dim"):
        tr.GroupLasso(0.1, dim=())
    with pytest.raises(ValueError, match="strength"):
        tr.GroupLasso(-1.0)
    with pytest.raises(ValueError, match="strength"):
        tr.SparseGroupLasso(float("nan"), 0.5)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="l1_ratio"):
            tr.SparseGroupLasso(0.1, l1_ratio=bad)
    tr.Regularizer(
        model, [tr.GroupLasso(0.1, dim=(0, 1)), tr.SparseGroupLasso(0.1, 0.5, dim=-1, name="s")]
    )


# --------------------------------------------------------------------------- L2SP
def _l2sp_setup(mode, seed=0, lam=0.3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    rule = tr.L2SP(lam, mode=mode, on=tr.select.all)
    reg = tr.Regularizer(model, [rule])
    with torch.no_grad():  # move away from the reference
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model, theta0, reg, rule


def _loss(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    return model(x).pow(2).mean()


def test_l2sp_value_grad_match_autograd():
    lam = 0.3
    model, theta0, reg, rule = _l2sp_setup("grad", lam=lam)
    for n, p in model.named_parameters():
        v_ref, g_ref = autograd_ref(lambda x, n=n: 0.5 * lam * ((x - theta0[n]) ** 2).sum(), p)
        torch.testing.assert_close(rule.value(p), v_ref, rtol=1e-13, atol=0)
        torch.testing.assert_close(rule.grad(p), g_ref, rtol=1e-13, atol=0)
        t = 0.7
        torch.testing.assert_close(
            rule.prox(p, t), theta0[n] + (p.detach() - theta0[n]) / (1 + t * lam)
        )
    assert reg.stats()["l2sp/value"] == pytest.approx(
        sum(
            0.5 * lam * float(((p.detach() - theta0[n]) ** 2).sum())
            for n, p in model.named_parameters()
        )
    )


@pytest.mark.parametrize("mode", ["grad", "decoupled", "prox", "loss"])
def test_l2sp_one_step_closed_form(mode):
    lam, lr = 0.3, 0.1
    model, theta0, reg, _ = _l2sp_setup(mode, lam=lam)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    reg.attach(opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = _loss(model)
    data_grads = dict(
        zip(
            [n for n, _ in model.named_parameters()],
            torch.autograd.grad(loss, list(model.parameters()), retain_graph=True),
        )
    )
    opt.zero_grad()
    (loss + reg.penalty()).backward()
    opt.step()
    for n, p in model.named_parameters():
        th, th0, g = before[n], theta0[n], data_grads[n]
        if mode in ("grad", "loss"):
            exp = th - lr * (g + lam * (th - th0))
        elif mode == "decoupled":
            exp = th - lr * lam * (th - th0) - lr * g
        else:
            z = th - lr * g
            exp = th0 + (z - th0) / (1 + lr * lam)
        torch.testing.assert_close(p.detach(), exp, rtol=1e-13, atol=1e-14)
    # decoupled/prox pull toward θ₀: the distance shrinks without a data gradient
    if mode in ("decoupled", "prox"):

        def dist():
            return sum(
                float(((p.detach() - theta0[n]) ** 2).sum()) for n, p in model.named_parameters()
            )

        d0 = dist()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        assert dist() < d0


def test_l2sp_reference_mapping_and_errors():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    pre = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))  # float32 "pre-trained" weights
    rule = tr.L2SP(0.5, reference=pre.state_dict())
    tr.Regularizer(model, [rule])
    ref = rule.references["0.weight"]
    assert ref.dtype == torch.float64 and torch.equal(ref, pre[0].weight.detach().double())
    assert set(rule.references) == {"0.weight", "1.weight"}
    w = model[0].weight
    torch.testing.assert_close(rule.value(w), 0.5 * 0.5 * ((w.detach() - ref) ** 2).sum())
    tr.Regularizer(model, [tr.L2SP(0.5, reference=pre)])  # a module works through its state_dict
    with pytest.raises(ValueError, match=r"1\.weight"):
        tr.Regularizer(model, [tr.L2SP(0.5, reference={"0.weight": pre[0].weight})])
    bad = {"0.weight": torch.zeros(3, 5), "1.weight": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"0\.weight.*\(3, 5\)"):
        tr.Regularizer(model, [tr.L2SP(0.5, reference=bad)])
    with pytest.raises(TypeError, match="reference"):
        tr.L2SP(0.5, reference=[1, 2])
    with pytest.raises(ValueError, match="not one of the parameters"):
        tr.L2SP(0.5).value(torch.zeros(3))


def test_l2sp_state_dict_round_trip_keeps_references_exactly():
    model, theta0, reg, _ = _l2sp_setup("decoupled", seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "reg": reg.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    # a fresh run with other initial weights, hence other default references
    torch.manual_seed(123)
    model2 = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    rule2 = tr.L2SP(0.3, mode="decoupled", on=tr.select.all)
    reg2 = tr.Regularizer(model2, [rule2])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    reg2.attach(opt2)
    assert not torch.equal(rule2.references["0.weight"], theta0["0.weight"])
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    reg2.load_state_dict(ck["reg"])
    for n, r in rule2.references.items():
        assert torch.equal(r, theta0[n]) and r.dtype == theta0[n].dtype
    # the resumed run continues bit-identically
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        _loss(m).backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="missing"):
        rule2.load_rule_state_dict({"reference": {}})


def test_l2sp_multi_tensor_path_matches_formula():
    shapes = [(6, 5)] * 3 + [(7,), (2, 3, 4), ()]
    model = nn.Module()
    for i, s in enumerate(shapes):
        model.register_parameter(f"p{i}", nn.Parameter(rand(s, seed=i)))
    lam, scale, eta = 0.4, 0.6, 0.25
    rule = tr.L2SP(lam, on=tr.select.all)
    tr.Regularizer(model, [rule])
    ref = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.7).add_(0.3)
    base = [p.detach().clone() for p in model.parameters()]
    grads0 = [rand(s, seed=50 + i) for i, s in enumerate(shapes)]
    for impl in IMPLS:
        with torch.no_grad():
            for p, b in zip(model.parameters(), base):
                p.copy_(b)
        ps = list(model.parameters())
        gs = [g.clone() for g in grads0]
        rule.grad_(ps, gs, lam, scale, impl=impl)
        for g, g0, b, r in zip(gs, grads0, base, ref):
            torch.testing.assert_close(g, g0 + scale * lam * (b - r), rtol=1e-13, atol=1e-14)
        rule.decay_(ps, lam, eta, impl=impl)
        for p, b, r in zip(ps, base, ref):
            torch.testing.assert_close(p.detach(), b - eta * lam * (b - r), rtol=1e-13, atol=1e-14)
        with torch.no_grad():
            for p, b in zip(ps, base):
                p.copy_(b)
        rule.prox_(ps, lam, eta, impl=impl)
        for p, b, r in zip(ps, base, ref):
            torch.testing.assert_close(
                p.detach(), r + (b - r) / (1 + eta * lam), rtol=1e-13, atol=1e-14
            )


# --------------------------------------------------------------------------- Orthogonal
@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4), (4, 2, 3, 3), (6, 1, 2, 2), (1, 1)])
def test_orthogonal_value_and_grad(shape):
    lam = 0.2
    theta = rand(shape, seed=9) * 0.5
    out = shape[0]
    inn = math.prod(shape[1:])

    def big_gram(x):  # λ‖WWᵀ − I_out‖²_F, the formula of the docs
        w = x.reshape(out, -1)
        d = w @ w.T - torch.eye(out, dtype=x.dtype)
        return lam * (d * d).sum()

    v_big, g_ref = autograd_ref(big_gram, theta)
    rule = tr.Orthogonal(lam)
    # the documented value λ‖WWᵀ − I‖²_F, whichever Gram the rule computes with
    assert inn >= 1
    torch.testing.assert_close(rule.value(theta), v_big, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rule.grad(theta), g_ref, rtol=1e-11, atol=1e-12)
    x = theta.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad(rule.value(x), x)
    torch.testing.assert_close(g_auto, g_ref, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(rule.grad(theta.float()), g_ref.float(), rtol=1e-4, atol=1e-5)


def test_orthogonal_training_reaches_orthonormal_rows_and_validates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4, bias=False), nn.Linear(4, 6, bias=False)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reg = tr.Regularizer(model, [tr.Orthogonal(1.0, mode="decoupled", lr_coupling="lr")]).attach(
        opt
    )
    for _ in range(400):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    w0, w1 = model[0].weight.detach(), model[1].weight.detach()
    torch.testing.assert_close(w0 @ w0.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(w1.T @ w1, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    # λ‖WWᵀ − I‖²_F: 0 for the wide layer's orthonormal rows, out − in = 2 for the tall one's
    # orthonormal columns (WWᵀ is a rank-4 projection in 6 dims)
    assert abs(reg.stats()["orthogonal/value"] - 2.0) < 1e-9
    with pytest.raises(ValueError, match="prox"):
        tr.Orthogonal(0.1, mode="prox")
    with pytest.raises(ValueError, match=r"at least 2 dims.*bias"):
        tr.Regularizer(nn.Linear(3, 2), [tr.Orthogonal(0.1, on=tr.select.all)])


# --------------------------------------------------------------------------- Penalty.from_fn
def test_from_fn_grad_value_and_modes():
    lam = 0.3
    fn = lambda p: (p**4).sum() + p.sum() ** 2  # noqa: E731
    rule = tr.Penalty.from_fn(fn, lam, name="quartic")
    assert isinstance(rule, tr.FnPenalty) and rule.name == "quartic"
    theta = rand((3, 4), seed=2)
    closed = lam * (4 * theta**3 + 2 * theta.sum())
    torch.testing.assert_close(rule.grad(theta), closed, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(rule.value(theta), lam * fn(theta), rtol=1e-14, atol=0)
    # bf16 parameters: fp32 math, result in the parameter's dtype
    gb = rule.grad(theta.bfloat16())
    assert gb.dtype == torch.bfloat16
    torch.testing.assert_close(gb.float(), closed.float(), rtol=3e-2, atol=3e-2)

    def run(mode):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        reg = tr.Regularizer(model, [tr.Penalty.from_fn(fn, lam, mode=mode)]).attach(opt)
        opt.zero_grad()
        loss = _loss(model) + reg.penalty()
        loss.backward()
        opt.step()
        return model

    def by_hand():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = _loss(model) + lam * sum(fn(model[i].weight) for i in (0, 2))
        loss.backward()
        opt.step()
        return model

    ref = by_hand()
    for mode in ("grad", "loss"):
        m = run(mode)
        for a, b in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_from_fn_errors_name_the_rule():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"'vec'.*scalar.*weight"):
        tr.Regularizer(model, [tr.Penalty.from_fn(lambda p: p.sum(0), 0.1, name="vec")])
    with pytest.raises(TypeError, match=r"'num'.*tensor"):
        tr.Regularizer(model, [tr.Penalty.from_fn(lambda p: 1.0, 0.1, name="num")])
    with pytest.raises(ValueError, match=r"'const'.*differentiabl"):
        tr.Regularizer(
            model, [tr.Penalty.from_fn(lambda p: torch.tensor(p.sum().item()), 0.1, name="const")]
        )
    with pytest.raises(ValueError, match="prox"):
        tr.Penalty.from_fn(lambda p: p.sum(), 0.1, mode="prox")
    with pytest.raises(TypeError, match="callable"):
        tr.Penalty.from_fn(3.0)
