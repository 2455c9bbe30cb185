"""Invalid arguments raise early, with messages naming the argument / parameters,
and a failed construction or attach leaves the model and optimizer untouched."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import torch_regularizers as tr


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def model_fingerprint(model):
    """Everything a failed construction/attach must leave alone."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "hooks": [
            (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
                len(m._state_dict_hooks),
                len(m._load_state_dict_pre_hooks),
            )
            for m in model.modules()
        ],
        "param_hooks": [
            len(getattr(p, "_backward_hooks", None) or {})
            + len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
            for p in model.parameters()
        ],
        "n_params": len(list(model.parameters())),
        "n_buffers": len(list(model.buffers())),
    }


def assert_fingerprint_equal(a, b):
    assert a.keys() == b.keys()
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), n
    for key in ("requires_grad", "grads", "hooks", "param_hooks", "n_params", "n_buffers"):
        assert a[key] == b[key], key


def optimizer_hook_counts(opt):
    return (
        len(opt._optimizer_step_pre_hooks),
        len(opt._optimizer_step_post_hooks),
    )


# --------------------------------------------------------------------------- penalty arguments


@pytest.mark.parametrize("cls", [tr.L1, tr.L2])
@pytest.mark.parametrize("bad", [-1.0, -1e-12, math.nan, float("nan")])
def test_negative_or_nan_strength_raises_at_construction(cls, bad):
    with pytest.raises(ValueError, match="strength"):
        cls(bad)


@pytest.mark.parametrize("bad", [-0.1, math.nan])
def test_elasticnet_bad_alpha(bad):
    with pytest.raises(ValueError, match="alpha"):
        tr.ElasticNet(bad)


@pytest.mark.parametrize("bad", [-0.01, 1.01, 1.5, math.nan])
def test_elasticnet_l1_ratio_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="l1_ratio"):
        tr.ElasticNet(0.1, l1_ratio=bad)


@pytest.mark.parametrize("ok", [0.0, 1.0, 0.5])
def test_elasticnet_l1_ratio_bounds_accepted(ok):
    tr.ElasticNet(0.1, l1_ratio=ok)


def test_zero_strength_is_valid():
    tr.L1(0.0)
    tr.L2(0.0)


@pytest.mark.parametrize("cls", [tr.L1, tr.L2])
def test_unknown_mode(cls):
    with pytest.raises(ValueError, match="mode"):
        cls(0.1, mode="sideways")


def test_unknown_mode_elasticnet():
    with pytest.raises(ValueError, match="mode"):
        tr.ElasticNet(0.1, mode="decoupledd")


@pytest.mark.parametrize("cls", [tr.L1, tr.L2])
def test_unknown_lr_coupling(cls):
    with pytest.raises(ValueError, match="lr_coupling"):
        cls(0.1, mode="decoupled", lr_coupling="sqrt")


@pytest.mark.parametrize("cls", [tr.L1, tr.L2])
def test_strength_of_wrong_type(cls):
    with pytest.raises(TypeError, match="strength"):
        cls("0.1")


# --------------------------------------------------------------------------- Regularizer construction


def test_selector_matching_nothing_names_the_rule():
    model = make_model()
    before = model_fingerprint(model)
    with pytest.raises(ValueError, match="my_typo_rule"):
        tr.Regularizer(model, [tr.L1(0.1, on=tr.select.name("encoder.*"), name="my_typo_rule")])
    assert_fingerprint_equal(model_fingerprint(model), before)


def test_selector_matching_nothing_default_name():
    model = make_model()
    with pytest.raises(ValueError, match="l2"):
        tr.Regularizer(
            model,
            [tr.L1(0.1), tr.L2(0.1, on=tr.select.name("nothing_here"))],
        )


def test_selector_matching_nothing_allowed_with_allow_empty():
    model = make_model()
    reg = tr.Regularizer(model, [tr.L1(0.1, on=tr.select.name("encoder.*"))], allow_empty=True)
    assert float(reg.value()) == 0.0
    # and it does nothing when attached
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    reg.attach(opt)
    x = torch.randn(4, 5)
    for m, o in ((model, opt), (ref, opt_ref)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_two_prox_rules_on_one_parameter_names_it():
    model = make_model()
    before = model_fingerprint(model)
    with pytest.raises(ValueError, match=r"0\.weight") as exc:
        tr.Regularizer(
            model,
            [
                tr.L1(0.1, on=tr.select.name("0.weight"), mode="prox"),
                tr.L2(0.1, on=tr.select.name("0.*"), mode="prox"),
            ],
        )
    assert "prox" in str(exc.value)
    assert_fingerprint_equal(model_fingerprint(model), before)


def test_two_prox_rules_on_disjoint_parameters_are_fine():
    model = make_model()
    tr.Regularizer(
        model,
        [
            tr.L1(0.1, on=tr.select.name("0.weight"), mode="prox"),
            tr.L2(0.1, on=tr.select.name("2.weight"), mode="prox"),
            tr.L2(0.1, on=tr.select.name("0.weight"), mode="grad"),  # non-prox overlap is fine
        ],
    )


def test_regularizer_rejects_non_rules():
    model = make_model()
    with pytest.raises(TypeError):
        tr.Regularizer(model, [tr.L1(0.1), "l2"])


def test_regularizer_rejects_non_module():
    with pytest.raises(TypeError):
        tr.Regularizer([nn.Parameter(torch.zeros(2, 2))], [tr.L1(0.1)])


# --------------------------------------------------------------------------- attach


def test_attach_with_uncovered_selected_params_lists_their_names():
    model = make_model()
    before = model_fingerprint(model)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    reg = tr.Regularizer(model, [tr.L2(0.1, on=tr.select.all)])
    hooks_before = optimizer_hook_counts(opt)
    with pytest.raises(ValueError, match=r"2\.weight") as exc:
        reg.attach(opt)
    msg = str(exc.value)
    assert "2.bias" in msg
    assert "0.weight" not in msg and "0.bias" not in msg
    # nothing was hooked: the optimizer is still the plain one
    assert optimizer_hook_counts(opt) == hooks_before
    assert_fingerprint_equal(model_fingerprint(model), before)
    ref = copy.deepcopy(model)
    opt_ref = torch.optim.SGD(ref[0].parameters(), lr=0.1)
    x = torch.randn(4, 5)
    for m, o in ((model, opt), (ref, opt_ref)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_attach_ignores_frozen_params_outside_optimizers():
    model = make_model()
    model[2].requires_grad_(False)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    reg = tr.Regularizer(model, [tr.L2(0.1, on=tr.select.all)])
    reg.attach(opt)  # 2.weight / 2.bias are not trainable: no error
    reg.detach()


def test_attach_covered_by_two_optimizers_is_fine():
    model = make_model()
    reg = tr.Regularizer(model, [tr.L2(0.1, on=tr.select.all)])
    opt_a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"0\.weight"):
        reg.attach(opt_b)
    reg.attach(opt_a, opt_b)
    reg.detach()


def test_attach_rejects_non_optimizer():
    model = make_model()
    reg = tr.Regularizer(model, [tr.L2(0.1)])
    with pytest.raises(TypeError):
        reg.attach("sgd")


@pytest.mark.parametrize("mode", ["decoupled", "prox"])
def test_lbfgs_with_decoupled_or_prox_raises(mode):
    model = make_model().double()
    opt = torch.optim.LBFGS(model.parameters())
    reg = tr.Regularizer(model, [tr.L2(0.1, mode=mode)])
    before = model_fingerprint(model)
    x = torch.randn(4, 5, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        return loss

    # raising at attach is preferred; raising at the first step is acceptable,
    # but it must raise before changing anything
    with pytest.raises(ValueError, match=r"(?i)lbfgs|grad|loss"):
        reg.attach(opt)
        opt.step(closure)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before["params"][n]), n


@pytest.mark.parametrize("mode", ["grad", "loss"])
def test_lbfgs_with_grad_or_loss_mode_is_accepted(mode):
    model = make_model().double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=2)
    reg = tr.Regularizer(model, [tr.L2(0.1, mode=mode)])
    reg.attach(opt)
    x = torch.randn(4, 5, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum() + reg.penalty()
        loss.backward()
        return loss

    opt.step(closure)
    reg.detach()
