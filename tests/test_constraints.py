"""Constraints (DESIGN §1, issue 4): MaxNorm, UnitNorm, NonNeg.

Expected values are Keras 3's constraint formulas re-implemented here in numpy
(keras/src/constraints/constraints.py, epsilon = 1e-7), and invariants checked after
every optimizer step of a Regularizer attached to an optimizer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_regularizers as tr

HYP = settings(deadline=None, max_examples=25)
EPS = 1e-7  # keras.backend.epsilon()
IMPLS = ("reference", "foreach")


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- numpy Keras
def np_axis(shape, dim):
    nd = len(shape)
    if dim is None:
        return tuple(range(1, nd)) if nd >= 2 else tuple(range(nd))
    return tuple(d % nd for d in ((dim,) if isinstance(dim, int) else dim))


def keras_max_norm(w, max_value, axis):
    """Keras: norms = sqrt(sum(w², axis, keepdims)); desired = clip(norms, 0, m);
    w · desired / (ε + norms)."""
    norms = np.sqrt(np.sum(np.square(w), axis=axis, keepdims=True))
    desired = np.clip(norms, 0, max_value)
    return w * (desired / (EPS + norms)), norms


def our_max_norm(w, max_value, axis):
    """The contract: Keras' formula on groups over the cap; groups under it untouched."""
    scaled, norms = keras_max_norm(w, max_value, axis)
    return np.where(norms > max_value, scaled, w)


def keras_unit_norm(w, axis):
    return w / (EPS + np.sqrt(np.sum(np.square(w), axis=axis, keepdims=True)))


def keras_non_neg(w):
    return w * (w >= 0.0).astype(w.dtype)


CASES = [
    ((5,), None),
    ((4, 6), None),
    ((4, 6), 0),
    ((4, 6), 1),
    ((3, 2, 4), (1, 2)),
    ((3, 2, 4), -1),
    ((4, 2, 3, 3), None),
]


def sample(shape, seed=0, scale=2.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * scale).astype(dtype)
    if len(shape) >= 2:
        w[0] = 0.0  # an all-zero row
    return w


# --------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("shape,dim", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_norm_equals_keras_without_the_shrink_under_the_cap(shape, dim, dtype):
    w = sample(shape, dtype=dtype)
    m = 1.5
    axis = np_axis(shape, dim)
    out = tr.MaxNorm(m, dim=dim).project(torch.from_numpy(w)).numpy()
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(out, our_max_norm(w, m, axis), rtol=rtol, atol=0)
    norms = np.sqrt(np.sum(np.square(w.astype(np.float64)), axis=axis, keepdims=True))
    under = np.broadcast_to(norms <= m, w.shape)
    assert np.array_equal(out[under], w[under])  # untouched, bit for bit
    assert np.sqrt(np.sum(np.square(out.astype(np.float64)), axis=axis)).max() <= m + 1e-6
    if norms.size > 1:
        assert (norms > m).any() and (norms <= m).any()  # both branches exercised
    # over the cap it is exactly Keras' formula; under it Keras shrinks by n/(ε + n)
    keras, _ = keras_max_norm(w, m, axis)
    over = np.broadcast_to(norms > m, w.shape)
    np.testing.assert_allclose(out[over], keras[over], rtol=rtol, atol=0)


@pytest.mark.parametrize("shape,dim", CASES)
def test_unit_norm_and_non_neg_equal_keras(shape, dim):
    w = sample(shape, seed=1)
    axis = np_axis(shape, dim)
    out = tr.UnitNorm(dim=dim).project(torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(out, keras_unit_norm(w, axis), rtol=1e-12, atol=0)
    assert np.isfinite(out).all()
    nn_out = tr.NonNeg().project(torch.from_numpy(w)).numpy()
    assert np.array_equal(nn_out, keras_non_neg(w))  # -0.0 == 0.0
    assert (nn_out >= 0).all()


@st.composite
def arrays_with_dim(draw):
    nd = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd)))
    dim = draw(
        st.one_of(
            st.none(),
            st.integers(-nd, nd - 1),
            st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True).map(tuple),
        )
    )
    n = int(np.prod(shape))
    vals = draw(
        st.lists(st.one_of(st.just(0.0), st.floats(-5, 5, width=64)), min_size=n, max_size=n)
    )
    w = np.array(vals, dtype=np.float64).reshape(shape)
    zero_rows = draw(st.booleans())
    if zero_rows:
        w[0] = 0.0
    return w, dim


@HYP
@given(arrays_with_dim(), st.floats(0.1, 4.0))
def test_constraints_hypothesis(case, m):
    w, dim = case
    axis = np_axis(w.shape, dim)
    t = torch.from_numpy(w)
    np.testing.assert_allclose(
        tr.MaxNorm(m, dim=dim).project(t).numpy(), our_max_norm(w, m, axis), rtol=1e-12, atol=1e-300
    )
    np.testing.assert_allclose(
        tr.UnitNorm(dim=dim).project(t).numpy(), keras_unit_norm(w, axis), rtol=1e-12, atol=1e-300
    )
    assert np.array_equal(tr.NonNeg().project(t).numpy(), keras_non_neg(w))
    # the multi-tensor path gives the same numbers
    for rule in (tr.MaxNorm(m, dim=dim), tr.UnitNorm(dim=dim), tr.NonNeg()):
        a, b = t.clone(), t.clone()
        rule.project_([a], impl="reference")
        rule.project_([b], impl="foreach")
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------- multi-tensor
SHAPES = (
    [(6, 5)] * 4
    + [(7,)] * 3
    + [(3, 4, 2), (2,), (4, 1, 3, 3), (4, 1, 3, 3), (300, 260), (300, 260)]
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", ["max", "unit", "nonneg"])
def test_multi_tensor_path_many_shapes(dtype, make):
    ws = [sample(s, seed=i, scale=0.8) for i, s in enumerate(SHAPES)]
    rule = {"max": tr.MaxNorm(1.0), "unit": tr.UnitNorm(), "nonneg": tr.NonNeg()}[make]
    expect = []
    for w in ws:
        axis = np_axis(w.shape, None)
        expect.append(
            our_max_norm(w, 1.0, axis)
            if make == "max"
            else keras_unit_norm(w, axis)
            if make == "unit"
            else keras_non_neg(w)
        )
    for impl in IMPLS:
        ps = [torch.tensor(w).to(dtype) for w in ws]  # copies: ws stay the inputs
        rule.project_(ps, impl=impl)
        for p, e in zip(ps, expect):
            assert p.dtype == dtype
            if dtype == torch.bfloat16:
                torch.testing.assert_close(p.double(), torch.from_numpy(e), rtol=1e-2, atol=1e-2)
            else:
                tol = 1e-12 if dtype == torch.float64 else 1e-6
                np.testing.assert_allclose(p.double().numpy(), e, rtol=tol, atol=1e-30)


@pytest.mark.parametrize("make", ["max", "unit", "nonneg"])
@pytest.mark.parametrize("impl", IMPLS)
def test_found_inf_changes_nothing(make, impl):
    rule = {"max": tr.MaxNorm(0.5), "unit": tr.UnitNorm(), "nonneg": tr.NonNeg()}[make]
    ws = [
        torch.from_numpy(sample(s, seed=i)).float() for i, s in enumerate([(4, 6), (5,), (3, 2, 2)])
    ]
    ps = [w.clone() for w in ws]
    rule.project_(ps, found_inf=torch.tensor(1.0), impl=impl)
    assert all(torch.equal(p, w) for p, w in zip(ps, ws))
    rule.project_(ps, found_inf=torch.tensor(0.0), impl=impl)
    qs = [w.clone() for w in ws]
    rule.project_(qs, impl=impl)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    assert not all(torch.equal(p, w) for p, w in zip(ps, ws))


# --------------------------------------------------------------------------- through a Regularizer
def test_constraints_hold_after_every_step_of_an_attached_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    reg = tr.Regularizer(
        model,
        [
            tr.MaxNorm(0.5, dim=1, on=tr.select.name("0.weight", "2.weight")),
            tr.UnitNorm(dim=1, on=tr.select.name("4.weight")),
            tr.NonNeg(on=tr.select.name("2.bias")),
            tr.L1(1e-3, mode="prox", on=tr.select.name("0.weight")),
        ],
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    reg.attach(opt)
    x, y = torch.randn(64, 8), torch.randn(64, 3)
    for _ in range(25):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        assert model[0].weight.norm(dim=1).max() <= 0.5 + 1e-6
        assert model[2].weight.norm(dim=1).max() <= 0.5 + 1e-6
        torch.testing.assert_close(model[4].weight.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
        assert model[2].bias.min() >= 0
    stats = reg.stats()
    assert stats["maxnorm/max_norm"] <= 0.5 + 1e-6
    assert stats["maxnorm/max_norm"] == pytest.approx(
        max(model[0].weight.norm(dim=1).max().item(), model[2].weight.norm(dim=1).max().item()),
        rel=1e-6,
    )
    assert stats["nonneg/min"] >= 0
    s = reg.summary(as_dict=True)
    modes = {r["rule"]: r["mode"] for p in s["params"] for r in p["rules"]}
    assert modes["maxnorm"] == "constraint" and modes["nonneg"] == "constraint"


def _one_step(rules, seed=1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    if rules:
        tr.Regularizer(model, rules).attach(opt)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 2, generator=g)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    return model


def test_constraint_runs_after_prox_and_leaves_unselected_bits():
    """One step: MaxNorm is applied after the L1 prox (projection of the prox output),
    and the parameters it does not select equal a run without rules, bit for bit."""
    sel = tr.select.name("0.weight")
    plain = _one_step([])
    m = _one_step([tr.L1(0.05, mode="prox", on=sel), tr.MaxNorm(0.3, dim=1, on=sel)])
    for name in ("0.bias", "2.weight", "2.bias"):
        assert torch.equal(dict(m.named_parameters())[name], dict(plain.named_parameters())[name])
    w = plain[0].weight.detach().double().numpy()
    soft = np.sign(w) * np.maximum(np.abs(w) - 0.5 * 0.05, 0)  # L1 prox with t = lr·λ
    np.testing.assert_allclose(
        m[0].weight.detach().double().numpy(), our_max_norm(soft, 0.3, (1,)), rtol=1e-6, atol=1e-7
    )
    assert m[0].weight.norm(dim=1).max() <= 0.3 + 1e-6


def test_constraint_arguments_are_validated():
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"dim=2.*0\.weight"):
        tr.Regularizer(model, [tr.MaxNorm(1.0, dim=2)])
    with pytest.raises(ValueError, match=r"dim.*0\.bias"):
        tr.Regularizer(model, [tr.UnitNorm(dim=1, on=tr.select.all)])
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="max_value"):
            tr.MaxNorm(bad)
    with pytest.raises(ValueError, match="mode"):
        tr.MaxNorm(1.0, mode="prox")
    with pytest.raises(TypeError, match="dim"):
        tr.UnitNorm(dim=1.5)
    c = tr.MaxNorm(2.0, dim=1)
    assert c.strength_at(10) == 0.0 and c.summary_strength() == 2.0 and c.mode == "constraint"
    assert "MaxNorm" in repr(c)
    with pytest.raises(ValueError, match="decoupled/prox/constraint"):
        tr.Regularizer(model, [tr.NonNeg()]).attach(torch.optim.LBFGS(model.parameters()))
