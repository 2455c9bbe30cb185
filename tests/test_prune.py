"""tr.prune without Torch-Pruning: coupled groups written by hand in GroupLasso /
SparseGroupLasso (value, grad, decoupled, prox against autograd of the written-out penalty
and a hand-written block soft-threshold; split buckets; stats; errors) and the NM constraint."""

import math

import pytest
import torch
from torch import nn

import torch_regularizers as tr

D = torch.float64


def mlp(seed=0, dtype=D):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)
    ).to(dtype)


def hidden_groups(m, consumers=True):
    """Coupled groups of the two hidden layers of ``mlp``: a unit's row and bias entry, and
    (``consumers``) the next layer's column that reads it."""
    h1 = [("0.weight", 0), ("0.bias", 0)] + ([("2.weight", 1)] if consumers else [])
    h2 = [("2.weight", 0), ("2.bias", 0)] + ([("4.weight", 1)] if consumers else [])
    return tr.prune.CoupledGroups(m, {"h1": h1, "h2": h2})


def written_groups(m, consumers=True):
    """The groups of ``hidden_groups`` written out: a list of lists of (tensor, index fn)."""
    W1, b1, W2, b2, W3 = m[0].weight, m[0].bias, m[2].weight, m[2].bias, m[4].weight
    out = []
    for i in range(8):
        out.append([W1[i], b1[i : i + 1]] + ([W2[:, i]] if consumers else []))
    for i in range(5):
        out.append([W2[i], b2[i : i + 1]] + ([W3[:, i]] if consumers else []))
    return out


def written_penalty(m, lam, consumers=True, rho=0.0):
    r = 0.0
    for slices in written_groups(m, consumers):
        v = torch.cat([s.reshape(-1) for s in slices])
        r = r + math.sqrt(v.numel()) * torch.linalg.vector_norm(v)  # gradient 0 at 0
    l1 = sum(p.abs().sum() for p in (m[0].weight, m[0].bias, m[2].weight, m[2].bias))
    if consumers:
        l1 = l1 + m[4].weight.abs().sum()
    return lam * (1 - rho) * r + lam * rho * l1


def covered(m, consumers=True):
    names = ["0.weight", "0.bias", "2.weight", "2.bias"] + (["4.weight"] if consumers else [])
    params = dict(m.named_parameters())
    return names, [params[n] for n in names]


def block_soft_threshold(m, lam, t, consumers=True):
    """The hand-written prox: every group's factor max(0, 1 − tλ√size/‖θ_g‖) from the same θ,
    each element multiplied by the factors of the groups it is in (the exact block
    soft-threshold when no element is in two groups)."""
    with torch.no_grad():
        new = {id(p): p.detach().clone() for p in m.parameters()}
        W1, b1, W2, b2, W3 = m[0].weight, m[0].bias, m[2].weight, m[2].bias, m[4].weight
        f1, f2 = [], []
        for slices, f in [(g, f1) for g in written_groups(m, consumers)[:8]] + [
            (g, f2) for g in written_groups(m, consumers)[8:]
        ]:
            v = torch.cat([s.reshape(-1) for s in slices])
            n = v.norm()
            f.append(max(0.0, 1 - t * lam * math.sqrt(v.numel()) / float(n)) if n > 0 else 0.0)
        f1, f2 = torch.tensor(f1, dtype=D), torch.tensor(f2, dtype=D)
        new[id(W1)] *= f1[:, None]
        new[id(b1)] *= f1
        new[id(W2)] *= f2[:, None]
        new[id(b2)] *= f2
        if consumers:
            new[id(W2)] *= f1[None, :]
            new[id(W3)] *= f2[None, :]
        return new


# --------------------------------------------------------------------------- value / grad
@pytest.mark.parametrize("consumers", [True, False])
@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_value_and_loss_mode_gradient_match_autograd_of_the_written_penalty(consumers, rho):
    m = mlp()
    with torch.no_grad():
        m[0].weight[2] = 0  # a zero row: its group is not zero (bias, consumer column)
        m[0].bias[2] = 0
        m[2].weight[:, 2] = 0  # now group h1[2] is exactly zero: gradient 0, never NaN
    G = hidden_groups(m, consumers)
    rule = (
        tr.GroupLasso(0.3, groups=G, mode="loss")
        if rho == 0
        else tr.SparseGroupLasso(0.3, l1_ratio=rho, groups=G, mode="loss")
    )
    reg = tr.Regularizer(m, [rule])
    v = reg.penalty()
    w = written_penalty(m, 0.3, consumers, rho)
    assert torch.allclose(v, w, rtol=1e-13, atol=0)
    assert torch.allclose(reg.value(), w.detach(), rtol=1e-13, atol=0)
    names, params = covered(m, consumers)
    gv = torch.autograd.grad(v, params)
    gw = torch.autograd.grad(w, params)
    for n, a, b in zip(names, gv, gw):
        assert torch.isfinite(a).all(), n
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)
    assert float(gv[0][2].abs().max()) == 0.0  # the zero group contributes nothing
    # the single-tensor value: the group part on the grouping's first tensor (0 on the
    # others) plus each tensor's own L1 part; summed over the tensors, R
    l1 = [0.3 * rho * float(p.detach().abs().sum()) for p in params]
    with torch.no_grad():
        group_part = float(written_penalty(m, 0.3, consumers, 0.0)) * (1 - rho)
        assert float(rule.value(params[0])) == pytest.approx(group_part + l1[0], rel=1e-13)
        assert float(rule.value(params[1])) == pytest.approx(l1[1], rel=1e-13, abs=0)
        assert float(sum(rule.value(p) for p in params)) == pytest.approx(float(w), rel=1e-13)


@pytest.mark.parametrize("rho", [0.0, 0.4])
def test_grad_mode_and_single_tensor_grad_match_autograd(rho, impl_kw):
    m = mlp(1)
    G = hidden_groups(m)
    lam = 0.2
    rule = (
        tr.GroupLasso(lam, groups=G)
        if rho == 0
        else tr.SparseGroupLasso(lam, l1_ratio=rho, groups=G)
    )
    reg = tr.Regularizer(m, [rule], **impl_kw)
    names, params = covered(m)
    want = torch.autograd.grad(written_penalty(m, lam, rho=rho), params)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    reg.apply_grad()
    for n, p, w in zip(names, params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-14, msg=n)
        torch.testing.assert_close(rule.grad(p), w, rtol=1e-12, atol=1e-14, msg=n)
    assert float(m[4].bias.grad.abs().max()) == 0  # not covered, untouched


def test_fast_and_reference_paths_agree_for_every_mode():
    m = mlp(2)
    _names, params = covered(m)
    for make in (
        lambda: tr.GroupLasso(0.3, groups=hidden_groups(m)),
        lambda: tr.SparseGroupLasso(0.3, 0.25, groups=hidden_groups(m)),
    ):
        rule = make()
        tr.Regularizer(m, [rule])
        g_fast = [torch.randn_like(p) for p in params]
        g_ref = [g.clone() for g in g_fast]
        rule.grad_(params, g_fast, 0.3, 0.7)
        rule.grad_(params, g_ref, 0.3, 0.7, impl="reference")
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        for op in ("decay_", "prox_"):
            base = [p.detach().clone() for p in params]
            getattr(rule, op)(params, 0.3, 0.05)
            fast = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, b in zip(params, base):
                    p.copy_(b)
            getattr(rule, op)(params, 0.3, 0.05, impl="reference")
            for a, p in zip(fast, params):
                torch.testing.assert_close(a, p.detach(), rtol=1e-13, atol=1e-15)
            with torch.no_grad():
                for p, b in zip(params, base):
                    p.copy_(b)


# --------------------------------------------------------------------------- prox
@pytest.mark.parametrize("consumers", [False, True])
def test_prox_is_the_block_soft_threshold_of_the_whole_slice_set(consumers, impl_kw):
    m = mlp(3)
    with torch.no_grad():  # make some groups small enough to be zeroed whole
        m[0].weight[1].mul_(0.01)
        m[0].bias[1] = 1e-3
        m[2].weight[:, 1].mul_(0.01)
        m[2].weight[3].mul_(0.01)
        m[2].bias[3] = 0
        m[4].weight[:, 3].mul_(0.01)
    lam, lr = 0.05, 0.5
    want = block_soft_threshold(m, lam, lr, consumers)
    reg = tr.Regularizer(m, [tr.GroupLasso(lam, groups=hidden_groups(m, consumers), mode="prox")], **impl_kw)
    reg.apply_prox(lr=lr)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), want[id(p)], rtol=1e-13, atol=1e-15, msg=n)
    # whole coupled groups are exactly zero, every slice at once
    W1, b1, W2, b2, W3 = (p.detach() for p in m.parameters() if p is not m[4].bias)
    assert float(W1[1].abs().max()) == 0 and float(b1[1]) == 0
    assert float(W2[3].abs().max()) == 0 and float(b2[3]) == 0
    if consumers:
        assert float(W2[:, 1].abs().max()) == 0
        assert float(W3[:, 3].abs().max()) == 0
    st = reg.stats()
    assert st["grouplasso/zero_groups"] == 2.0
    assert st["grouplasso/zero_group_fraction"] == pytest.approx(2 / 13)
    assert st["grouplasso/value"] == pytest.approx(float(written_penalty(m, lam, consumers).detach()), rel=1e-12)


def test_sparse_group_lasso_prox_is_soft_threshold_then_block_threshold():
    m = mlp(4)
    lam, rho, lr = 0.1, 0.3, 0.2
    t1 = lr * lam * rho
    ref = mlp(4)
    with torch.no_grad():
        for p in ref.parameters():
            p.sub_(torch.clamp(p, -t1, t1))
    G = hidden_groups(ref, consumers=False)
    want = block_soft_threshold(ref, lam * (1 - rho), lr, consumers=False)
    reg = tr.Regularizer(m, [tr.SparseGroupLasso(lam, rho, groups=hidden_groups(m, False), mode="prox")])
    reg.apply_prox(lr=lr)
    refp = dict(ref.named_parameters())
    for n, p in m.named_parameters():
        if n in G.names:
            torch.testing.assert_close(p.detach(), want[id(refp[n])], rtol=1e-13, atol=1e-15, msg=n)


def test_decoupled_is_a_gradient_step_with_the_norms_before_it():
    m = mlp(5)
    lam, lr = 0.2, 0.1
    names, params = covered(m)
    grads = torch.autograd.grad(written_penalty(m, lam), params)
    want = [p.detach() - lr * g for p, g in zip(params, grads)]
    reg = tr.Regularizer(m, [tr.GroupLasso(lam, groups=hidden_groups(m), mode="decoupled")])
    reg.apply_decoupled(lr=lr)
    for n, p, w in zip(names, params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-13, atol=1e-15, msg=n)


def test_tensor_step_size_matches_float_and_zero_step_changes_no_bit():
    m = mlp(6)
    _names, params = covered(m)
    rule = tr.SparseGroupLasso(0.1, 0.5, groups=hidden_groups(m))
    tr.Regularizer(m, [rule])
    base = [p.detach().clone() for p in params]
    rule.prox_(params, 0.1, 0.3)
    by_float = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, base):
            p.copy_(b)
    rule.prox_(params, 0.1, torch.tensor(0.3, dtype=D))
    for a, p in zip(by_float, params):
        torch.testing.assert_close(p.detach(), a, rtol=1e-14, atol=1e-16)
    snap = [p.detach().clone() for p in params]
    for op in (rule.prox_, rule.decay_):  # a step GradScaler skipped: η = 0 on device
        op(params, 0.1, torch.tensor(0.0, dtype=D))
        for a, p in zip(snap, params):
            assert torch.equal(a, p.detach())
    g = [torch.randn_like(p) for p in params]
    g0 = [x.clone() for x in g]
    rule.grad_(params, g, 0.1, torch.tensor(0.0, dtype=D))
    assert all(torch.equal(a, b) for a, b in zip(g, g0))


# --------------------------------------------------------------------------- split buckets
def _two_group_optimizer(m, lr_bn=None, lr=0.05):
    decay = [m[0].weight, m[2].weight, m[4].weight]
    rest = [m[0].bias, m[2].bias, m[4].bias]
    return torch.optim.SGD(
        [{"params": decay}, {"params": rest, "lr": lr if lr_bn is None else lr_bn}], lr=lr
    )


@pytest.mark.parametrize("mode", ["prox", "decoupled", "grad"])
@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_a_group_split_over_two_param_groups_is_one_update(mode, rho, impl_kw):
    """Weights and biases in two param groups (two buckets, two calls): the same result as
    one param group, every step."""
    x = torch.randn(32, 6, dtype=D)
    results = []
    for split in (False, True):
        m = mlp(7)
        G = hidden_groups(m)
        rule = (
            tr.GroupLasso(0.02, groups=G, mode=mode)
            if rho == 0
            else tr.SparseGroupLasso(0.02, rho, groups=G, mode=mode)
        )
        opt = _two_group_optimizer(m) if split else torch.optim.SGD(m.parameters(), lr=0.05)
        reg = tr.Regularizer(m, [rule], **impl_kw)
        reg.attach(opt)
        for _ in range(15):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_prox_in_two_calls_equals_one_call():
    m = mlp(8)
    _names, params = covered(m)
    rule = tr.GroupLasso(0.2, groups=hidden_groups(m))
    tr.Regularizer(m, [rule])
    base = [p.detach().clone() for p in params]
    rule.prox_(params, 0.2, 0.4)
    one = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, base):
            p.copy_(b)
    rule.prox_(params[::2], 0.2, 0.4)
    rule.prox_(params[1::2], 0.2, 0.4)
    for a, p in zip(one, params):
        torch.testing.assert_close(p.detach(), a, rtol=1e-14, atol=1e-16)
    # a later call of the same tensors starts a new update (no stale norms)
    rule.prox_(params[::2], 0.2, 0.4)
    rule.prox_(params[::2], 0.2, 0.4)


# --------------------------------------------------------------------------- training
def test_prox_training_zeroes_whole_coupled_groups():
    torch.manual_seed(0)
    m = mlp(9)
    x = torch.randn(64, 6, dtype=D)
    y = x[:, :3] @ torch.randn(3, 3, dtype=D)
    G = hidden_groups(m)
    reg = tr.Regularizer(m, [tr.GroupLasso(0.05, groups=G, mode="prox")])
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    reg.attach(opt)
    for _ in range(300):
        opt.zero_grad()
        (m(x) - y).pow(2).mean().backward()
        opt.step()
    norms = G.group_norms(m)
    zero = [(lab, g) for lab, n in norms.items() for g in range(len(n)) if n[g] == 0]
    assert zero, "expected some coupled groups to be exactly zero"
    params = dict(m.named_parameters())
    for lab, g in zero:  # every slice of a zero group is zero: bias entries and columns too
        for name, dim, idx in G[lab].slices(g):
            assert float(params[name].detach().index_select(dim, torch.tensor(idx)).abs().max()) == 0
    st = reg.stats()
    assert st["grouplasso/zero_groups"] == len(zero)


def test_low_precision_parameters_use_fp32_math():
    m = mlp(10, dtype=torch.bfloat16)
    G = hidden_groups(m)
    reg = tr.Regularizer(m, [tr.GroupLasso(0.5, groups=G, mode="prox")])
    reg.apply_prox(lr=1.0)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert reg.stats()["grouplasso/zero_groups"] > 0
    assert reg.value().dtype == torch.float32


# --------------------------------------------------------------------------- errors
def test_groups_argument_errors():
    m = mlp()
    G = hidden_groups(m)
    with pytest.raises(ValueError, match="exclusive"):
        tr.GroupLasso(0.1, dim=0, groups=G)
    with pytest.raises(TypeError, match="CoupledGroups"):
        tr.GroupLasso(0.1, groups={"h1": [("0.weight", 0)]})
    with pytest.raises(ValueError, match="stochastic_rounding"):
        tr.GroupLasso(0.1, groups=G, mode="prox", stochastic_rounding=True)
    with pytest.raises(ValueError, match="exactly the parameters"):
        tr.Regularizer(m, [tr.GroupLasso(0.1, groups=G, on=tr.select.all)])
    with pytest.raises(ValueError, match="not bound"):
        tr.GroupLasso(0.1, groups=G).value(m[0].weight)
    rule = tr.GroupLasso(0.1, groups=G, mode="prox")
    tr.Regularizer(m, [rule])
    with pytest.raises(ValueError, match="single-tensor prox"):
        rule.prox(m[0].weight, 0.1)
    with pytest.raises(ValueError, match="not one of the grouping"):
        rule.grad_([torch.zeros(8, 6, dtype=D)], [torch.zeros(8, 6, dtype=D)], 0.1)
    assert "groups=CoupledGroups" in repr(rule)
    # the default on= is exactly the covered parameters
    assert [n for n, _ in rule.on.resolve(m)] == list(G.names)


def test_one_rule_instance_in_two_regularizers_binds_each_its_own_model():
    a, b = mlp(0), mlp(1)
    rule = tr.GroupLasso(0.1, groups=hidden_groups(a), mode="loss")
    ra, rb = tr.Regularizer(a, [rule]), tr.Regularizer(b, [rule])  # b binds a copy
    assert float(ra.value()) == pytest.approx(float(written_penalty(a, 0.1).detach()), rel=1e-13)
    assert float(rb.value()) == pytest.approx(float(written_penalty(b, 0.1).detach()), rel=1e-13)


def test_channel_groups_without_torch_pruning_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=r"torch-regularizers\[prune\]"):
        tr.prune.channel_groups(mlp(), torch.zeros(1, 6, dtype=D))
    with pytest.raises(ImportError, match="torch-pruning"):
        tr.prune.shrink(mlp(), torch.zeros(1, 6, dtype=D))


def test_parameters_replaced_by_other_shapes_raise_naming_them():
    m = mlp()
    reg = tr.Regularizer(m, [tr.GroupLasso(0.1, groups=hidden_groups(m), mode="prox")])
    m[0].weight = nn.Parameter(torch.zeros(7, 6, dtype=D))
    with pytest.raises(ValueError, match=r"0\.weight \(grouping \(8, 6\), parameter \(7, 6\)\)"):
        reg.stats()


@pytest.mark.parametrize(
    "sets, match",
    [
        ({"a": [("nope", 0)]}, "no parameter named"),
        ({"a": [("0.weight", 2)]}, "not a dim"),
        ({"a": [("0.weight", 0, [0, 9])]}, "has size 8"),
        ({"a": [("0.weight", 0, [0, 0])]}, "listed twice"),
        ({"a": [("0.weight", 0, [0, 1], [0, 2])]}, "group 1 has no slice"),
        ({"a": [("0.weight", 0), ("0.weight", 0)]}, "appears twice"),
        ({"a": []}, "non-empty list"),
    ],
)
def test_coupled_groups_validation(sets, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tr.prune.CoupledGroups(mlp(), sets)


def test_coupled_groups_description():
    m = mlp()
    G = hidden_groups(m)
    assert G.n_groups == len(G) == 13
    assert G.sizes("h1") == [6 + 1 + 5] * 8
    assert G["h2"].slices(4) == [("2.weight", 0, [4]), ("2.bias", 0, [4]), ("4.weight", 1, [4])]
    norms = G.group_norms(m)
    w = torch.cat([m[0].weight[3], m[0].bias[3:4], m[2].weight[:, 3]]).detach().norm()
    assert float(norms["h1"][3]) == pytest.approx(float(w), rel=1e-14)
    # explicit indices and shared group ids: two units in one group
    G2 = tr.prune.CoupledGroups(m, {"pair": [("0.weight", 0, [0, 1, 2, 3], [0, 0, 1, 1])]})
    assert G2.sizes("pair") == [12, 12]


# --------------------------------------------------------------------------- NM
def nm_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))


def holds(w, n=2, m=4):
    return bool(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())


def test_nm_projection_is_top_n_of_every_block():
    rule = tr.NM(2, 4, on=tr.select.all)
    w = torch.tensor([[4.0, -1.0, 3.0, 0.5, 1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0, -5.0, 6.0, -7.0, 8.0]])
    want = torch.tensor([[4.0, 0.0, 3.0, 0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 0.0, 0.0, -7.0, 8.0]])
    out = rule.project(w)
    assert torch.equal(out, want)  # ties keep the lower index; fewer nonzeros stay
    assert torch.equal(rule.project(out), out)  # idempotent
    torch.manual_seed(0)
    x = torch.randn(5, 24)
    y = tr.NM(1, 3, on=tr.select.all).project(x)
    blocks = x.reshape(5, 8, 3)
    keep = blocks.abs().argmax(-1, keepdim=True)
    assert torch.equal(y.reshape(5, 8, 3), torch.zeros_like(blocks).scatter(-1, keep, blocks.gather(-1, keep)))


def test_nm_pattern_holds_after_every_step_of_training():
    m = nm_model()
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    reg = tr.Regularizer(m, [tr.NM(2, 4), tr.L2(1e-4)])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    reg.attach(opt)
    for _ in range(25):
        opt.zero_grad()
        (m(x) - y).pow(2).mean().backward()
        opt.step()
        for lin in (m[0], m[2], m[4]):
            assert holds(lin.weight), lin
            assert float((lin.weight == 0).float().mean()) >= 0.5
    st = reg.stats()
    assert st["nm/nm_blocks_ok"] == 1.0 and st["nm/sparsity"] >= 0.5
    masks = tr.prune.nm_mask(m)
    assert set(masks) == {"0.weight", "2.weight", "4.weight"}
    for name, mask in masks.items():
        p = dict(m.named_parameters())[name]
        assert mask.dtype == torch.bool and mask.shape == p.shape
        assert torch.equal(p * mask, p)
        assert int(mask.sum()) == p.numel() // 2
    assert tr.prune.pattern_holds(m[0].weight)


def test_nm_conv_layout_and_errors():
    conv = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Conv2d(6, 4, 2))
    rule = tr.NM(2, 4, on=tr.select.modules(nn.Conv2d) & tr.select.weights)
    tr.Regularizer(conv, [rule])
    w = rule.project(conv[0].weight)
    assert holds(w.reshape(6, -1))  # blocks along in·kh·kw
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        tr.Regularizer(nn.Linear(6, 3), [tr.NM(2, 4)])
    with pytest.raises(ValueError, match="1 <= n < m"):
        tr.NM(4, 4)
    with pytest.raises(TypeError):
        tr.NM(2.0, 4)


def test_nm_hf_conv1d_blocks_run_along_dim_0():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(6, 8)  # weight (in=8, out=6)
    model = nn.Sequential(layer)
    rule = tr.NM(2, 4, on=tr.select.all - tr.select.biases)
    tr.Regularizer(model, [rule])
    w = rule.project(layer.weight)
    assert holds(w.t())


def test_nm_config_round_trip():
    m = nm_model()
    reg = tr.Regularizer(m, [tr.NM(1, 4, name="sparse")])
    again = tr.Regularizer.from_config(m, reg.to_config())
    rule = again.rules["sparse"]
    assert isinstance(rule, tr.NM) and (rule.n, rule.m) == (1, 4)
    assert [n for n, _ in rule.on.resolve(m)] == ["0.weight", "2.weight", "4.weight"]
