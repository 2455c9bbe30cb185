"""Penalty math (DESIGN §1): value / grad / prox and the in-place multi-tensor hot path.

Every expected value here comes from an independent reference: autograd of the
written-out formula in float64, a closed-form numpy expression, or scikit-learn.
Nothing is compared against the library's own output except where the test is
"two implementations of the library agree" (reference vs foreach hot path), and
those are also checked against the independent formula.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import torch_regularizers as tr

HYP = settings(deadline=None, max_examples=30)

SHAPES = [(), (1,), (1, 1), (7,), (3, 4), (2, 3, 4), (4, 1, 3, 3)]
IMPLS = ("reference", "foreach")


# --------------------------------------------------------------------------- references
def ref_value(kind: str, theta: torch.Tensor, lam: float, rho: float = 0.5) -> torch.Tensor:
    """R(θ) written out from the DESIGN table."""
    if kind == "l2":
        return 0.5 * lam * (theta**2).sum()
    if kind == "l1":
        return lam * theta.abs().sum()
    if kind == "en":
        return lam * rho * theta.abs().sum() + 0.5 * lam * (1 - rho) * (theta**2).sum()
    raise AssertionError(kind)


def ref_value_and_autograd(kind, theta, lam, rho=0.5):
    """(R(θ), ∇R(θ)) in float64 via autograd of the written-out formula.

    torch's abs() backward is sign(θ), i.e. 0 at 0, which is the subgradient the
    contract asks for.
    """
    x = theta.detach().to(torch.float64).clone().requires_grad_(True)
    v = ref_value(kind, x, lam, rho)
    (g,) = torch.autograd.grad(v, x)
    return v.detach(), g


def np_soft(x: np.ndarray, t: float) -> np.ndarray:
    return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


def np_prox(kind: str, x: np.ndarray, t: float, lam: float, rho: float = 0.5) -> np.ndarray:
    if kind == "l2":
        return x / (1.0 + t * lam)
    if kind == "l1":
        return np_soft(x, t * lam)
    if kind == "en":
        return np_soft(x, t * lam * rho) / (1.0 + t * lam * (1 - rho))
    raise AssertionError(kind)


def np_grad(kind: str, x: np.ndarray, lam: float, rho: float = 0.5) -> np.ndarray:
    if kind == "l2":
        return lam * x
    if kind == "l1":
        return lam * np.sign(x)
    if kind == "en":
        return lam * rho * np.sign(x) + lam * (1 - rho) * x
    raise AssertionError(kind)


def make(kind: str, lam: float, rho: float = 0.5):
    if kind == "l2":
        return tr.L2(lam)
    if kind == "l1":
        return tr.L1(lam)
    if kind == "en":
        return tr.ElasticNet(lam, l1_ratio=rho)
    raise AssertionError(kind)


KINDS = ["l2", "l1", "en"]


def sample(shape, dtype=torch.float64, seed=0, zeros=True):
    """Random values with some exact zeros and some tiny values mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if zeros and x.numel() > 1:
        flat = x.view(-1)
        flat[::3] = 0.0
        if flat.numel() > 2:
            flat[1] = 1e-30
            flat[-1] = -1e-30
    return x.to(dtype)


# --------------------------------------------------------------------------- value / grad
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("lam,rho", [(0.3, 0.5), (1.7, 0.2), (0.0, 0.5)])
def test_value_and_grad_match_autograd_of_formula(kind, shape, lam, rho):
    theta = sample(shape, seed=len(shape) + int(10 * lam))
    pen = make(kind, lam, rho)
    want_v, want_g = ref_value_and_autograd(kind, theta, lam, rho)

    v = pen.value(theta)
    assert isinstance(v, torch.Tensor) and v.ndim == 0
    torch.testing.assert_close(v.to(torch.float64), want_v, rtol=1e-12, atol=1e-15)

    g = pen.grad(theta)
    assert g.shape == theta.shape and g.dtype == theta.dtype
    assert not torch.isnan(g).any()
    torch.testing.assert_close(g, want_g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_strength_override(kind):
    theta = sample((5, 3), seed=3)
    pen = make(kind, 10.0, 0.3)
    want_v, want_g = ref_value_and_autograd(kind, theta, 0.25, 0.3)
    torch.testing.assert_close(pen.value(theta, strength=0.25), want_v, rtol=1e-12, atol=0)
    torch.testing.assert_close(pen.grad(theta, strength=0.25), want_g, rtol=1e-12, atol=0)
    want_p = np_prox(kind, theta.numpy(), 0.1, 0.25, 0.3)
    np.testing.assert_allclose(pen.prox(theta, 0.1, strength=0.25).numpy(), want_p, rtol=1e-12)
    # and the override did not stick
    want_v10, _ = ref_value_and_autograd(kind, theta, 10.0, 0.3)
    torch.testing.assert_close(pen.value(theta), want_v10, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_is_differentiable(kind, dtype):
    theta = sample((4, 5), dtype=dtype, seed=1).requires_grad_(True)
    pen = make(kind, 0.7, 0.4)
    v = pen.value(theta)
    assert v.requires_grad
    (g,) = torch.autograd.grad(v, theta)
    _, want_g = ref_value_and_autograd(kind, theta, 0.7, 0.4)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(g.to(torch.float64), want_g, rtol=tol, atol=tol)
    # grad() on a parameter that requires grad returns the same subgradient
    torch.testing.assert_close(pen.grad(theta).to(torch.float64), want_g, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1,), (6,), (3, 3)], ids=str)
def test_zeros_tensor(kind, shape):
    theta = torch.zeros(shape, dtype=torch.float64)
    pen = make(kind, 0.5)
    assert pen.value(theta).item() == 0.0
    g = pen.grad(theta)
    assert not torch.isnan(g).any()
    assert torch.equal(g, torch.zeros_like(theta))
    p = pen.prox(theta, 0.3)
    assert not torch.isnan(p).any()
    assert torch.equal(p, torch.zeros_like(theta))
    # the gradient of value() at 0 is 0 as well (no NaN from abs at 0)
    x = theta.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(pen.value(x), x)
    assert torch.equal(gx, torch.zeros_like(theta))


def test_l1_grad_at_zero_is_zero_and_sign_elsewhere():
    theta = torch.tensor([-2.0, -1e-38, -0.0, 0.0, 1e-38, 3.0], dtype=torch.float32)
    g = tr.L1(0.5).grad(theta)
    assert g.tolist() == [-0.5, -0.5, 0.0, 0.0, 0.5, 0.5]


# --------------------------------------------------------------------------- prox
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("step", [0.0, 0.05, 1.0, 3.0])
def test_prox_matches_closed_form(kind, shape, step):
    theta = sample(shape, seed=7 + len(shape))
    lam, rho = 0.6, 0.3
    got = make(kind, lam, rho).prox(theta, step)
    assert got.shape == theta.shape and got.dtype == theta.dtype
    want = np_prox(kind, theta.numpy(), step, lam, rho)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", ["l1", "en"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_prox_gives_exact_zeros(kind, dtype):
    lam, step, rho = 0.5, 0.4, 0.5
    t = step * lam * (rho if kind == "en" else 1.0)  # the soft threshold: 0.2 or 0.1
    # the exact boundary |θ| = t is tested in float64 below (in low precision the
    # rounded θ may sit on either side of t)
    vals = [-1.0, -0.9 * t, -t / 2, -1e-30, -0.0, 0.0, 1e-30, t / 3, 0.95 * t, 1.2 * t, 2.0]
    theta = torch.tensor(vals, dtype=torch.float64).to(dtype)
    got = make(kind, lam, rho).prox(theta, step)
    small = theta.to(torch.float64).abs() < t
    assert small.sum() == 8
    assert (got[small] == 0).all(), got
    assert (got[~small] != 0).all(), got
    # signs are preserved on the survivors
    assert torch.equal(torch.sign(got[~small]), torch.sign(theta[~small]))


def test_l1_prox_threshold_boundary_is_zero():
    # |θ| exactly equal to t·λ must land on exactly 0 (not ±ε)
    theta = torch.tensor([0.25, -0.25, 0.5, -0.5], dtype=torch.float64)
    got = tr.L1(0.5).prox(theta, 0.5)  # t·λ = 0.25
    assert got.tolist() == [0.0, 0.0, 0.25, -0.25]


@pytest.mark.parametrize("kind", KINDS)
def test_single_tensor_methods_are_pure(kind):
    theta = sample((4, 6), dtype=torch.float32, seed=11)
    keep = theta.clone()
    pen = make(kind, 0.8)
    pen.value(theta)
    assert torch.equal(theta, keep)
    g = pen.grad(theta)
    assert torch.equal(theta, keep)
    p = pen.prox(theta, 0.5)
    assert torch.equal(theta, keep)
    # results are new tensors, not aliases of the input
    assert g.data_ptr() != theta.data_ptr()
    assert p.data_ptr() != theta.data_ptr()
    # a parameter (leaf requiring grad) is not touched either, and keeps no grad
    param = torch.nn.Parameter(keep.clone())
    pen.grad(param)
    pen.prox(param, 0.5)
    assert torch.equal(param.detach(), keep) and param.grad is None


def test_prox_step_zero_is_identity():
    theta = sample((5, 5), seed=2)
    for kind in KINDS:
        assert torch.equal(make(kind, 1.3).prox(theta, 0.0), theta)


def test_l2_prox_vs_l2_grad_consistency():
    """prox of L2 is the implicit gradient step: x = θ − tλx."""
    theta = sample((6, 2), seed=4)
    t, lam = 0.7, 0.9
    x = tr.L2(lam).prox(theta, t)
    torch.testing.assert_close(x + t * lam * x, theta, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- scikit-learn convention
@pytest.mark.parametrize("alpha,l1_ratio,step", [(0.3, 0.5, 1.0), (0.2, 0.8, 0.5), (1.0, 0.1, 0.3)])
def test_elasticnet_prox_matches_sklearn(alpha, l1_ratio, step):
    """With X = √n·I, sklearn's objective (1/2n)‖y − Xw‖² + R(w) becomes
    ½‖θ − w‖² + R(w) for θ = y/√n, so its solution is prox_R(θ)."""
    from sklearn.linear_model import ElasticNet as SkEN

    rng = np.random.default_rng(0)
    n = 12
    theta = rng.normal(size=n)
    X = math.sqrt(n) * np.eye(n)
    y = math.sqrt(n) * theta
    sk = SkEN(
        alpha=step * alpha, l1_ratio=l1_ratio, fit_intercept=False, tol=1e-14, max_iter=10_000
    )
    sk.fit(X, y)
    got = tr.ElasticNet(alpha, l1_ratio=l1_ratio).prox(torch.from_numpy(theta), step)
    np.testing.assert_allclose(got.numpy(), sk.coef_, rtol=1e-9, atol=1e-12)


def test_l1_prox_matches_sklearn_lasso():
    from sklearn.linear_model import Lasso

    rng = np.random.default_rng(1)
    n = 10
    theta = rng.normal(size=n)
    sk = Lasso(alpha=0.4, fit_intercept=False, tol=1e-14, max_iter=10_000)
    sk.fit(math.sqrt(n) * np.eye(n), math.sqrt(n) * theta)
    got = tr.L1(0.4).prox(torch.from_numpy(theta), 1.0)
    np.testing.assert_allclose(got.numpy(), sk.coef_, rtol=1e-9, atol=1e-12)
    assert (got.numpy() == 0).sum() == (sk.coef_ == 0).sum() > 0


def test_elasticnet_endpoints_are_l1_and_l2():
    theta = sample((4, 4), seed=9)
    a = 0.7
    for other, rho in ((tr.L1(a), 1.0), (tr.L2(a), 0.0)):
        en = tr.ElasticNet(a, l1_ratio=rho)
        torch.testing.assert_close(en.value(theta), other.value(theta), rtol=1e-14, atol=0)
        torch.testing.assert_close(en.grad(theta), other.grad(theta), rtol=1e-14, atol=0)
        torch.testing.assert_close(en.prox(theta, 0.3), other.prox(theta, 0.3), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------- hypothesis
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=True)
special = st.sampled_from([0.0, -0.0, 1e-300, -1e-300, 5e-324, 1e-8, -1e-8])
arrays64 = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=5),
    elements=st.one_of(finite, special),
)
nonneg = st.floats(0.0, 10.0, allow_nan=False, allow_subnormal=False)


@HYP
@given(x=arrays64, t=nonneg, lam=nonneg)
def test_l1_prox_optimality_condition(x, t, lam):
    """z = prox solves min_z ½‖z − θ‖² + tλ‖z‖₁: per coordinate,
    z ≠ 0 ⇒ z − θ + tλ·sign(z) = 0 (and sign(z) = sign(θ)); z = 0 ⇒ |θ| ≤ tλ."""
    theta = torch.from_numpy(x.copy())
    z = tr.L1(lam).prox(theta, t).numpy()
    assert z.shape == x.shape
    assert np.isfinite(z).all()
    tl = t * lam
    tol = 1e-12 * np.maximum(1.0, np.abs(x))
    nz = z != 0
    assert (np.abs(z[nz] - x[nz] + tl * np.sign(z[nz])) <= tol[nz]).all()
    assert (np.sign(z[nz]) == np.sign(x[nz])).all()
    assert (np.abs(x[~nz]) <= tl + tol[~nz]).all()
    # and strictly: anything above the threshold survives
    assert (nz[np.abs(x) > tl * (1 + 1e-12) + 1e-300]).all()
    np.testing.assert_allclose(z, np_soft(x, tl), rtol=1e-14, atol=1e-14 * max(1.0, tl))


@HYP
@given(x=arrays64, t=nonneg, lam=nonneg)
def test_l2_prox_shrinks_norm(x, t, lam):
    theta = torch.from_numpy(x.copy())
    z = tr.L2(lam).prox(theta, t).numpy()
    f = 1.0 / (1.0 + t * lam)
    # (atol only matters for subnormal inputs, whose quotient is rounded coarsely)
    np.testing.assert_allclose(np.linalg.norm(z), f * np.linalg.norm(x), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(z, x * f, rtol=1e-14, atol=1e-300)
    assert np.linalg.norm(z) <= np.linalg.norm(x)


@HYP
@given(x=arrays64, t=nonneg, lam=nonneg, rho=st.floats(0.0, 1.0))
def test_elasticnet_prox_optimality_condition(x, t, lam, rho):
    """z = prox ⇒ 0 ∈ z − θ + tαρ·∂‖z‖₁ + tα(1−ρ)z."""
    theta = torch.from_numpy(x.copy())
    z = tr.ElasticNet(lam, l1_ratio=rho).prox(theta, t).numpy()
    a1, a2 = t * lam * rho, t * lam * (1 - rho)
    tol = 1e-11 * np.maximum(1.0, np.abs(x))
    nz = z != 0
    res = z - x + a1 * np.sign(z) + a2 * z
    assert (np.abs(res[nz]) <= tol[nz]).all()
    assert (np.abs(x[~nz]) <= a1 + tol[~nz]).all()
    np.testing.assert_allclose(
        z, np_prox("en", x, t, lam, rho), rtol=1e-13, atol=1e-13 * max(1.0, a1)
    )


@HYP
@given(x=arrays64, lam=nonneg, kind=st.sampled_from(KINDS), rho=st.floats(0.0, 1.0))
def test_grad_and_value_property(x, lam, kind, rho):
    theta = torch.from_numpy(x.copy())
    pen = make(kind, lam, rho)
    g = pen.grad(theta).numpy()
    assert not np.isnan(g).any()
    np.testing.assert_allclose(g, np_grad(kind, x, lam, rho), rtol=1e-14, atol=1e-300)
    want_v = float(ref_value(kind, torch.from_numpy(x), lam, rho))
    np.testing.assert_allclose(float(pen.value(theta)), want_v, rtol=1e-12, atol=1e-300)
    assert float(pen.value(theta)) >= 0


@HYP
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6),
        elements=st.floats(-100, 100, width=32, allow_subnormal=True),
    ),
    kind=st.sampled_from(KINDS),
    t=st.floats(0.0, 2.0),
)
def test_float32_prox_and_grad_keep_dtype_and_match_numpy(x, kind, t):
    theta = torch.from_numpy(x.copy())
    pen = make(kind, 0.5)
    z = pen.prox(theta, t)
    g = pen.grad(theta)
    assert z.dtype == g.dtype == torch.float32
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(z.numpy(), np_prox(kind, x64, t, 0.5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.numpy(), np_grad(kind, x64, 0.5), rtol=1e-6, atol=1e-6)
    assert torch.equal(theta, torch.from_numpy(x))


# --------------------------------------------------------------------------- hot path
MIXED = [
    ((3, 4), torch.float32),
    ((5,), torch.float64),
    ((2, 3, 2), torch.bfloat16),
    ((1,), torch.float32),
    ((), torch.float64),
    ((8, 8), torch.float32),
    ((17,), torch.bfloat16),
]


def mixed_lists(seed=0, specs=MIXED):
    g = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for shape, dtype in specs:
        p = torch.randn(shape, generator=g, dtype=torch.float64)
        flat = p.view(-1)
        if flat.numel() > 2:
            flat[::4] = 0.0
        params.append(p.to(dtype))
        grads.append(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
    return params, grads


def tol_for(dtype):
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-14),
        torch.float32: dict(rtol=2e-6, atol=2e-6),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    }[dtype]


def assert_impls_agree(a, b):
    """reference vs foreach: identical bits where the math is the same (float32/64),
    within bf16 rounding for bf16 tensors."""
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        if x.dtype == torch.bfloat16:
            torch.testing.assert_close(x.double(), y.double(), **tol_for(torch.bfloat16))
        else:
            assert torch.equal(x, y), (x, y)


def clone_all(ts):
    return [t.clone() for t in ts]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [1.0, 0.5, -1.0])
def test_grad_inplace_hot_path(kind, scale):
    lam, rho = 0.3, 0.4
    params, grads = mixed_lists(seed=1)
    keep_p, keep_g = clone_all(params), clone_all(grads)
    pen = make(kind, 99.0, rho)  # strength passed explicitly below overrides this
    results = {}
    for impl in IMPLS:
        ps, gs = clone_all(params), clone_all(grads)
        ptrs = [g.data_ptr() for g in gs]
        pen.grad_(ps, gs, lam, scale, impl=impl)
        assert [g.data_ptr() for g in gs] == ptrs  # in place
        for p, k in zip(ps, keep_p):  # params untouched
            assert torch.equal(p, k)
        results[impl] = gs
    assert_impls_agree(results["reference"], results["foreach"])
    for gs, p, g0 in zip(results["foreach"], keep_p, keep_g):
        want = g0.double().numpy() + scale * np_grad(kind, p.double().numpy(), lam, rho)
        np.testing.assert_allclose(gs.double().numpy(), want, **tol_for(p.dtype))
    # agrees with the single-tensor grad(): g ← g + scale·grad(p)
    for gs, p, g0 in zip(results["reference"], keep_p, keep_g):
        single = pen.grad(p.double(), strength=lam)
        torch.testing.assert_close(gs.double(), g0.double() + scale * single, **tol_for(p.dtype))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eta", [0.1, 1.0])
def test_decay_inplace_hot_path(kind, eta):
    lam, rho = 0.3, 0.4
    params, _ = mixed_lists(seed=2)
    keep = clone_all(params)
    pen = make(kind, 99.0, rho)
    results = {}
    for impl in IMPLS:
        ps = clone_all(params)
        ptrs = [p.data_ptr() for p in ps]
        pen.decay_(ps, lam, eta, impl=impl)
        assert [p.data_ptr() for p in ps] == ptrs
        results[impl] = ps
    for impl in IMPLS:
        for a, k in zip(results[impl], keep):
            x = k.double().numpy()
            want = x - eta * np_grad(kind, x, lam, rho)
            np.testing.assert_allclose(a.double().numpy(), want, **tol_for(k.dtype))
    # reference and foreach agree (bitwise where same math, bf16 within tolerance)
    for a, b in zip(results["reference"], results["foreach"]):
        if a.dtype == torch.bfloat16:
            torch.testing.assert_close(a.double(), b.double(), **tol_for(torch.bfloat16))
        else:
            torch.testing.assert_close(a, b, rtol=4 * torch.finfo(a.dtype).eps, atol=1e-30)
    if kind == "l1":
        # decoupled L1 is a subgradient step: zeros stay exactly zero
        for a, k in zip(results["foreach"], keep):
            assert (a[k == 0] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eta", [0.1, 1.0, 5.0])
def test_prox_inplace_hot_path(kind, eta):
    lam, rho = 0.3, 0.4
    params, _ = mixed_lists(seed=3)
    keep = clone_all(params)
    pen = make(kind, 99.0, rho)
    results = {}
    for impl in IMPLS:
        ps = clone_all(params)
        ptrs = [p.data_ptr() for p in ps]
        pen.prox_(ps, lam, eta, impl=impl)
        assert [p.data_ptr() for p in ps] == ptrs
        results[impl] = ps
    assert_impls_agree(results["reference"], results["foreach"])
    for impl in IMPLS:
        for a, k in zip(results[impl], keep):
            want = np_prox(kind, k.double().numpy(), eta, lam, rho)
            np.testing.assert_allclose(a.double().numpy(), want, **tol_for(k.dtype))
            if kind != "l2":
                # exact zeros exactly where the (dtype-rounded) input is within the threshold
                thr = eta * lam * (rho if kind == "en" else 1.0)
                x = k.double()
                clear_small = x.abs() < thr * (1 - 1e-2)
                clear_big = x.abs() > thr * (1 + 1e-2)
                assert (a[clear_small] == 0).all()
                assert (a[clear_big] != 0).all()
    # agrees with the single-tensor prox()
    for a, k in zip(results["foreach"], keep):
        if k.dtype != torch.bfloat16:
            assert torch.equal(a, pen.prox(k, eta, strength=lam))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_l2_hot_path_bit_identical_to_torch_weight_decay_formulas(impl, dtype):
    """DESIGN §3: L2 grad mode is torch's `grad.add(param, alpha=wd)` (SGD/Adam),
    decoupled is AdamW's `param.mul_(1 - lr * wd)` — bit for bit, in every dtype."""
    lam, lr, scale = 1e-2, 3e-3, 1.0
    params, grads = mixed_lists(seed=8, specs=[((7, 5), dtype), ((3,), dtype), ((64,), dtype)])
    pen = tr.L2(lam)
    gs = clone_all(grads)
    pen.grad_(params, gs, lam, scale, impl=impl)
    for g, g0, p in zip(gs, grads, params):
        assert torch.equal(g, g0.add(p, alpha=lam))
    ps = clone_all(params)
    pen.decay_(ps, lam, lr, impl=impl)
    for a, p in zip(ps, params):
        assert torch.equal(a, p.mul(1 - lr * lam))


@pytest.mark.parametrize("method", ["grad_", "decay_", "prox_"])
@pytest.mark.parametrize("kind", KINDS)
def test_hot_path_zero_strength_is_noop(method, kind):
    params, grads = mixed_lists(seed=4)
    keep_p, keep_g = clone_all(params), clone_all(grads)
    pen = make(kind, 1.0)
    for impl in IMPLS:
        if method == "grad_":
            pen.grad_(params, grads, 0.0, 1.0, impl=impl)
        else:
            getattr(pen, method)(params, 0.0, 0.5, impl=impl)
        for a, b in zip(params + grads, keep_p + keep_g):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_grad_hot_path_accumulates(kind):
    """grads += ∇R, never grads = ∇R: applying twice adds twice."""
    params, grads = mixed_lists(seed=6, specs=[((5, 3), torch.float64)])
    g0 = grads[0].clone()
    pen = make(kind, 0.4)
    pen.grad_(params, grads, 0.4, 1.0)
    pen.grad_(params, grads, 0.4, 1.0)
    want = g0.numpy() + 2 * np_grad(kind, params[0].numpy(), 0.4)
    np.testing.assert_allclose(grads[0].numpy(), want, rtol=1e-13, atol=1e-15)


dtypes_st = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
shape_st = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=6)


@HYP
@given(
    specs=st.lists(st.tuples(shape_st, dtypes_st), min_size=1, max_size=5),
    kind=st.sampled_from(KINDS),
    lam=st.floats(0.0, 2.0),
    eta=st.floats(0.0, 2.0),
    scale=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_hot_path_property_mixed_lists(specs, kind, lam, eta, scale, seed):
    params, grads = mixed_lists(seed=seed, specs=specs)
    rho = 0.35
    pen = make(kind, 1.0, rho)
    out = {}
    for impl in IMPLS:
        gs = clone_all(grads)
        pen.grad_(clone_all(params), gs, lam, scale, impl=impl)
        dp = clone_all(params)
        pen.decay_(dp, lam, eta, impl=impl)
        pp = clone_all(params)
        pen.prox_(pp, lam, eta, impl=impl)
        out[impl] = (gs, dp, pp)
    assert_impls_agree(out["reference"][0], out["foreach"][0])
    assert_impls_agree(out["reference"][2], out["foreach"][2])
    gs, dp, pp = out["foreach"]
    for p, g0, g, d, z in zip(params, grads, gs, dp, pp):
        x = p.double().numpy()
        tol = tol_for(p.dtype)
        # bf16: the expected value itself is only known to bf16 precision, add an
        # absolute slack proportional to the terms involved
        np.testing.assert_allclose(
            g.double().numpy(), g0.double().numpy() + scale * np_grad(kind, x, lam, rho), **tol
        )
        np.testing.assert_allclose(
            d.double().numpy(),
            x - eta * np_grad(kind, x, lam, rho),
            rtol=tol["rtol"],
            atol=tol["atol"] * (1 + eta * lam),
        )
        np.testing.assert_allclose(z.double().numpy(), np_prox(kind, x, eta, lam, rho), **tol)


# --------------------------------------------------------------------------- invalid arguments
@pytest.mark.parametrize("bad", [-1.0, -1e-12, float("nan")])
@pytest.mark.parametrize("cls", [tr.L1, tr.L2])
def test_invalid_strength(cls, bad):
    with pytest.raises(ValueError, match="strength"):
        cls(bad)


@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_invalid_elasticnet_alpha(bad):
    with pytest.raises(ValueError, match="alpha"):
        tr.ElasticNet(bad)


@pytest.mark.parametrize("bad", [-0.01, 1.01, 2.0, float("nan")])
def test_invalid_l1_ratio(bad):
    with pytest.raises(ValueError, match="l1_ratio"):
        tr.ElasticNet(0.1, l1_ratio=bad)


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda: tr.L1(0.1, mode="foo"),
        lambda: tr.L2(0.1, mode="foo"),
        lambda: tr.ElasticNet(0.1, mode="foo"),
    ],
)
def test_invalid_mode(make_bad):
    with pytest.raises(ValueError, match="mode"):
        make_bad()


@pytest.mark.parametrize(
    "ok",
    [
        lambda: tr.L1(0.0),
        lambda: tr.L2(0),
        lambda: tr.ElasticNet(0.0, l1_ratio=0.0),
        lambda: tr.ElasticNet(1.0, l1_ratio=1.0),
        lambda: tr.L2(1e-4, mode="decoupled"),
        lambda: tr.L1(1e-4, mode="prox"),
        lambda: tr.ElasticNet(1e-4, mode="loss"),
    ],
)
def test_valid_edge_arguments(ok):
    ok()
