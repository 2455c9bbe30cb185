"""Issue 11, items 8 and 9: activity rules under GradScaler, bounded pending terms, deepcopy.

References are written out by hand: R = λ·Σ|y|/B (ActivityL1) or ½·λ·Σy²/B (ActivityL2) on
the intermediate outputs of a forward computed step by step, B = the batch size.

* item 8: in ``"grad"`` mode the term joins the output gradient during the backward of
  ``scaler.scale(loss)``, which carries S·∂L/∂y, so it must be S·∂R/∂y: after ``unscale_``
  the gradients equal those of the run without a scaler;
* item 9: loss-mode terms of forwards that never reach ``penalty()`` do not pile up (only the
  latest forward's are kept), and ``copy.deepcopy(model)`` (which copies forward hooks, e.g. an
  EMA model) never feeds the original's penalty.
"""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import torch_regularizers as tr
from torch_regularizers.activity import ActivityHooks

L1, L2 = 0.1, 0.2
pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def data(seed=1, n=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def hand_l1(model, x):
    """λ·Σ|h|/B on the first Linear's output, computed without any hook."""
    with torch.no_grad():
        return L1 * torch.addmm(model[0].bias, x, model[0].weight.t()).abs().sum() / x.shape[0]


def hand_l2_tanh(model, x):
    with torch.no_grad():
        a = torch.tanh(torch.addmm(model[0].bias, x, model[0].weight.t()))
        return 0.5 * L2 * (a * a).sum() / x.shape[0]


# --------------------------------------------------------------------------- item 8: GradScaler
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("rule_cls", [tr.ActivityL1, tr.ActivityL2])
def test_grad_mode_under_grad_scaler_gives_the_unscaled_gradients(rule_cls, autocast):
    """Public API: ``attach(opt, scaler=...)``. Scale 2^10 growing every step (2^10, 2^11,
    2^12): a term left unscaled would come out 1/1024 of its size after unscale_. Under
    autocast the output (and its gradient) is bf16; the term is scaled in fp32."""
    x, t = data(dtype=torch.float32)

    def run(enabled, lam):
        model = make_model(dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1, enabled=enabled)
        tr.Regularizer(model, [rule_cls(lam, on=model[0], mode="grad")]).attach(opt, scaler=scaler)
        out = []
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = ((model(x).float() - t) ** 2).mean()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            out.append(([p.grad.clone() for p in model.parameters()], scaler.get_scale()))
            scaler.step(opt)
            scaler.update()
        return out

    lam = 0.5
    scaled, unscaled, plain = run(True, lam), run(False, lam), run(False, 0.0)
    assert [s for _, s in scaled] == [2.0**10, 2.0**11, 2.0**12]
    for (gs, _), (gu, _), (gp, _) in zip(scaled, unscaled, plain):
        for a, b in zip(gs, gu):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        # and the activity term matters at this size
        assert (gu[0] - gp[0]).abs().max() > 1e-2


@pytest.mark.parametrize("rule_cls", [tr.ActivityL1, tr.ActivityL2])
@pytest.mark.parametrize("scale", [None, 8.0, 3.0, "tensor"])
def test_activity_hooks_multiply_the_added_term_by_scale_fn(rule_cls, scale):
    """ActivityHooks alone: the term added to the output gradient is S·∂R/∂y, with S read
    from ``scale_fn`` during backward (a GradScaler creates its scale lazily, in scale())."""
    x, t = data()
    lam = 0.3
    lin = nn.Linear(5, 4).double()
    # reference: R written out, added to the (unscaled) loss
    y = lin(x)
    ref_r = lam * y.abs().sum() if rule_cls is tr.ActivityL1 else 0.5 * lam * (y * y).sum()
    (((y - t[:, :1]) ** 2).mean() + ref_r / x.shape[0]).backward()
    ref = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()

    box = {"s": None}
    hooks = ActivityHooks(rule_cls(lam, on=lin, mode="grad"), "act", [("lin", lin)], lambda: 0, scale_fn=lambda: box["s"])
    hooks.register()
    y = lin(x)
    s = torch.tensor(2.0**10) if scale == "tensor" else scale
    box["s"] = s  # set after the forward: only the backward may read it
    factor = 1.0 if s is None else float(s)
    (factor * ((y - t[:, :1]) ** 2).mean()).backward()
    for p, r in zip(lin.parameters(), ref):
        torch.testing.assert_close(p.grad / factor, r, rtol=1e-12, atol=1e-15)
    hooks.remove()


# --------------------------------------------------------------------------- item 9: bounded pending
def test_500_forwards_without_penalty_keep_one_forward_of_graph():
    """Public API: forwards with autograd on and no penalty()/step (a validation pass left
    with grad enabled) hold the graph of the latest forward only, not of all 500."""
    x, _ = data()
    model = make_model()
    reg = tr.Regularizer(model, [tr.ActivityL1(L1, on=model[0], mode="loss")])
    outs = []
    handle = model[0].register_forward_hook(lambda m, a, o: outs.append(weakref.ref(o)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(500):
            model(x)
    handle.remove()
    gc.collect()
    alive = sum(r() is not None for r in outs)
    assert alive <= 1, f"{alive} forwards' outputs are still held"
    torch.testing.assert_close(reg.penalty().detach(), hand_l1(model, x), rtol=1e-13, atol=0)
    assert float(reg.penalty()) == 0.0  # consumed


def test_pending_terms_count_is_bounded_by_the_modules():
    """ActivityHooks alone: after 500 forwards of two hooked modules, two pending terms."""
    x, _ = data()
    model = make_model()
    rule = tr.ActivityL2(L2, on=(nn.Linear,), mode="loss")
    hooks = ActivityHooks(rule, "act", [("0", model[0]), ("2", model[2])], lambda: 0)
    hooks.register()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(500):
            model(x)
    assert len(hooks.pending) == 2
    assert len(hooks.pop_pending()) == 2 and len(hooks.pending) == 0
    hooks.remove()


def test_penalty_is_the_latest_forwards_hand_written_term_and_warns_once():
    x1, _ = data(seed=1)
    x2, _ = data(seed=2)
    x3, _ = data(seed=3, n=5)
    model = make_model()
    reg = tr.Regularizer(model, [tr.ActivityL1(L1, on=model[0], mode="loss")])
    model(x1)
    torch.testing.assert_close(reg.penalty().detach(), hand_l1(model, x1), rtol=1e-13, atol=0)
    model(x1)
    with pytest.warns(UserWarning, match="latest forward"):
        model(x2)  # replaces x1's term, never adds to it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per rule, not per forward
        model(x3)
    p = reg.penalty()
    assert p.requires_grad
    torch.testing.assert_close(p.detach(), hand_l1(model, x3), rtol=1e-13, atol=0)
    # the term still differentiates to the hand-written gradient
    model.zero_grad()
    model(x2)
    reg.penalty().backward()
    w = model[0].weight.detach().clone().requires_grad_(True)
    (L1 * (x2 @ w.t() + model[0].bias.detach()).abs().sum() / x2.shape[0]).backward()
    torch.testing.assert_close(model[0].weight.grad, w.grad, rtol=1e-13, atol=1e-15)


class SharedAct(nn.Module):
    """One Tanh instance used twice in a forward (a common hand-written pattern)."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2, self.act = nn.Linear(5, 5), nn.Linear(5, 5), nn.Tanh()

    def forward(self, x):
        return self.act(self.lin2(self.act(self.lin1(x))))


def shared_hand(m, x):
    with torch.no_grad():
        a1 = torch.tanh(m.lin1(x))
        a2 = torch.tanh(m.lin2(a1))
        return 0.5 * L2 * ((a1 * a1).sum() + (a2 * a2).sum()) / x.shape[0]


def test_module_called_twice_in_one_forward_contributes_both_calls():
    """Public API (needs the Regularizer to pass ``root=`` its model to ActivityHooks): a
    shared module's calls within one forward of the model are summed; the next forward of the
    model replaces them."""
    torch.manual_seed(0)
    m = SharedAct().double()
    x1, _ = data(seed=1)
    x2, _ = data(seed=2)
    reg = tr.Regularizer(m, [tr.ActivityL2(L2, on=nn.Tanh, mode="loss")])
    m(x1)
    torch.testing.assert_close(reg.penalty().detach(), shared_hand(m, x1), rtol=1e-13, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(x1)
        m(x2)
    torch.testing.assert_close(reg.penalty().detach(), shared_hand(m, x2), rtol=1e-13, atol=0)


def test_activity_hooks_with_root_sum_calls_of_one_forward_and_replace_across_forwards():
    torch.manual_seed(0)
    m = SharedAct().double()
    x1, _ = data(seed=1)
    x2, _ = data(seed=2)
    rule = tr.ActivityL2(L2, on=nn.Tanh, mode="loss")
    hooks = ActivityHooks(rule, "act", [("act", m.act)], lambda: 0, root=m)
    hooks.register()
    m(x1)
    torch.testing.assert_close(sum(hooks.pop_pending()).detach(), shared_hand(m, x1), rtol=1e-13, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(x1)
        m(x2)
    assert len(hooks.pending) == 1
    torch.testing.assert_close(sum(hooks.last.values()), shared_hand(m, x2), rtol=1e-13, atol=0)
    # a forward of the model under no_grad (evaluation) does not drop the pending term
    with torch.no_grad():
        m(x1)
    # neither does a forward of a deep copy (which carries copies of the root hooks), and
    # deepcopy works while a term with its graph is pending
    ema = copy.deepcopy(m)
    ema(x1)
    ema.act(x1.clone().requires_grad_())
    torch.testing.assert_close(sum(hooks.pop_pending()).detach(), shared_hand(m, x2), rtol=1e-13, atol=0)
    # without a root forward (a submodule called directly) each call is its own forward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.act(x1.clone().requires_grad_())
        m.act(x2.clone().requires_grad_())
    want = 0.5 * L2 * (torch.tanh(x2) ** 2).sum() / x2.shape[0]
    torch.testing.assert_close(sum(hooks.pop_pending()).detach(), want, rtol=1e-13, atol=0)
    hooks.remove()
    assert not m._forward_hooks and not m._forward_pre_hooks and not m.act._forward_hooks


# --------------------------------------------------------------------------- item 9: deepcopy
def test_deepcopy_of_the_model_never_feeds_the_originals_penalty():
    x1, t = data(seed=1)
    x2, _ = data(seed=2)
    model = make_model()
    reg = tr.Regularizer(
        model,
        [tr.ActivityL1(L1, on=model[0], mode="loss"), tr.ActivityL2(L2, on=nn.Tanh, mode="grad")],
    )
    model(x1)
    ema = copy.deepcopy(model)  # copies the forward hooks with the modules (EMA, teacher, ...)
    ema.zero_grad()
    ((ema(x2) - t) ** 2).mean().backward()
    # the original's loss-mode penalty and reported values are those of model(x1) alone
    torch.testing.assert_close(reg.value(), hand_l1(model, x1) + hand_l2_tanh(model, x1), rtol=1e-13, atol=0)
    torch.testing.assert_close(reg.penalty().detach(), hand_l1(model, x1), rtol=1e-13, atol=0)
    # the copy's gradients carry no activity term of the original's rules
    plain = make_model()
    ((plain(x2) - t) ** 2).mean().backward()
    for a, b in zip(ema.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-13, atol=1e-15)
    # and the original keeps working
    model(x2)
    torch.testing.assert_close(reg.penalty().detach(), hand_l1(model, x2), rtol=1e-13, atol=0)


def test_data_parallel_replicas_act_like_the_module_but_deep_copies_do_not():
    """``nn.DataParallel`` runs shallow per-forward replicas that share the module's hook dict
    (``_replicate_for_data_parallel``, called here directly: no GPU needed); their outputs are
    the model's and must be penalized. A deep copy has its own hook dict and is not ours."""
    x, _ = data()
    model = make_model()
    reg = tr.Regularizer(model, [tr.ActivityL2(L2, on=nn.Tanh, mode="loss")])
    h = model[0](x)
    model[1]._replicate_for_data_parallel()(h)
    want = 0.5 * L2 * (torch.tanh(h.detach()) ** 2).sum() / x.shape[0]
    torch.testing.assert_close(reg.penalty().detach(), want, rtol=1e-13, atol=0)
    copy.deepcopy(model)[1](h)
    assert float(reg.penalty()) == 0.0
