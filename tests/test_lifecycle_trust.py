"""A whole training life without silent wrong results (issue 11).

Each test names the item it covers. References are written out by hand (θ·(1 − lr·λ),
soft-thresholds, torch's own SGD weight_decay), never taken from the library's output.
"""

import copy
import gc
import math
import weakref

import pytest
import torch
from _hooks import FailOnce
from torch import nn

import torch_regularizers as tr
from torch_regularizers import schedules as S


def _grads(m, value=0.0):
    for p in m.parameters():
        p.grad = torch.full_like(p, value)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


# ------------------------------------------------------------------ 1. weak optimizers, state identity
def test_item1_detached_optimizer_is_not_kept_alive():
    m = _model()
    reg = tr.Regularizer(m, [tr.L2(0.1, mode="decoupled")])
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    reg.attach(opt)
    _grads(m, 1.0)
    opt.step()
    reg.detach()
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None


def test_item1_dropped_attached_optimizer_is_freed_and_forgotten_at_next_attach():
    m = _model()
    reg = tr.Regularizer(m, [tr.L2(0.1, mode="decoupled")])
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    reg.attach(opt)
    for _ in range(3):
        _grads(m)
        opt.step()
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    assert reg.step == 3  # the count stays readable until the next attach
    opt2 = torch.optim.SGD(m.parameters(), lr=0.1)
    reg.attach(opt2)
    assert reg.step == 0
    assert len(reg.state_dict()["optimizers"]) == 1


def _phase_run(m, reg, opt, n):
    for _ in range(n):
        _grads(m)
        opt.step()


def test_item1_fresh_optimizer_after_finished_phase_resumes_its_own_count():
    """SGD phase of 5 steps, then Adam for 3; resume must give Adam its own 3 steps."""
    sched = S.step(0.1, 4, gamma=1e-3)  # 0.1 for steps 0..3, 1e-4 from step 4 on
    m = _model()
    reg = tr.Regularizer(m, [tr.L2(sched, mode="decoupled")])
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    reg.attach(sgd)
    _phase_run(m, reg, sgd, 5)
    reg.detach()
    adam = torch.optim.Adam(m.parameters(), lr=0.1)
    reg.attach(adam)
    _phase_run(m, reg, adam, 3)
    sd = reg.state_dict()
    assert [e["steps"] for e in sd["optimizers"]] == [3]  # the detached SGD phase is dropped

    m2 = _model(1)
    reg2 = tr.Regularizer(m2, [tr.L2(sched, mode="decoupled")])
    adam2 = torch.optim.Adam(m2.parameters(), lr=0.1)
    reg2.attach(adam2)
    reg2.load_state_dict(sd)
    assert reg2.step == 3
    # step 3 of the schedule: λ = 0.1, Adam with zero grads does not move: θ·(1 − 0.1·0.1)
    w = m2[0].weight.detach().clone()
    _grads(m2)
    adam2.step()
    assert torch.equal(m2[0].weight, w * (1 - 0.1 * 0.1))


def test_item1_named_optimizers_match_by_name_whatever_the_order():
    m = _model()
    gen, disc = m[0], m[1]
    reg = tr.Regularizer(m, [tr.L2(0.1, mode="decoupled")])
    og = torch.optim.SGD(gen.parameters(), lr=0.1)
    od = torch.optim.SGD(disc.parameters(), lr=0.1)
    reg.attach(og, od, names=("gen", "disc"))
    for _ in range(2):
        _grads(m)
        og.step()
    _grads(m)
    od.step()
    sd = reg.state_dict()
    m2 = _model()
    reg2 = tr.Regularizer(m2, [tr.L2(0.1, mode="decoupled")])
    od2 = torch.optim.SGD(m2[1].parameters(), lr=0.1)
    og2 = torch.optim.SGD(m2[0].parameters(), lr=0.1)
    reg2.attach(od2, og2, names=["disc", "gen"])  # other order
    reg2.load_state_dict(sd)
    counts = {e["name"]: e["steps"] for e in reg2.state_dict()["optimizers"]}
    assert counts == {"disc": 1, "gen": 2}


# ------------------------------------------------------------------ 2. lr_ratio from lr 0
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_item2_lr_ratio_with_zero_lr_at_attach(tensor_lr):
    m = _model()
    lr0 = torch.tensor(0.0) if tensor_lr else 0.0
    opt = torch.optim.Adam(m.parameters(), lr=lr0)
    reg = tr.Regularizer(m, [tr.L2(0.5, mode="decoupled", lr_coupling="lr_ratio")]).attach(opt)
    w = m[0].weight.detach().clone()
    _grads(m)
    opt.step()  # lr 0: no reference yet, ratio 0: nothing applied, never inf
    assert torch.equal(m[0].weight, w)
    for lr, ratio in [(0.2, 1.0), (0.1, 0.5), (0.2, 1.0)]:  # reference = first nonzero lr
        if tensor_lr:
            opt.param_groups[0]["lr"].fill_(lr)
        else:
            opt.param_groups[0]["lr"] = lr
        w = m[0].weight.detach().clone()
        _grads(m)
        opt.step()
        assert torch.isfinite(m[0].weight).all()
        expect = w * (1 - ratio * 0.5)
        assert torch.allclose(m[0].weight, expect, rtol=0, atol=1e-7), (lr, ratio)
    assert reg.step == 4


def test_item2_lr_ratio_uses_the_schedulers_initial_lr_during_warmup_from_zero():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.4)
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: k / 4)  # lr 0 at attach
    tr.Regularizer(m, [tr.L2(0.5, mode="decoupled", lr_coupling="lr_ratio")]).attach(opt)
    for k in range(4):
        w = m[0].weight.detach().clone()
        _grads(m)
        opt.step()
        assert torch.allclose(m[0].weight, w * (1 - (k / 4) * 0.5), rtol=0, atol=1e-7)
        lrs.step()


# ------------------------------------------------------------------ 3. replaced parameters
def test_item3_parameter_replaced_by_assignment_gets_the_loss_penalty():
    m = _model()
    reg = tr.Regularizer(m, [tr.L2(0.5, mode="loss", on=tr.select.name("0.weight"))])
    m[0].weight = nn.Parameter(torch.randn(3, 4))
    reg.penalty().backward()
    assert m[0].weight.grad is not None
    assert torch.allclose(m[0].weight.grad, 0.5 * m[0].weight.detach())  # ∇ ½λ‖θ‖² = λθ


def test_item3_meta_init_then_to_empty():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    reg = tr.Regularizer(m, [tr.L2(0.1, mode="decoupled")])
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    for p in m.parameters():
        nn.init.normal_(p)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    reg.attach(opt)  # used to blame the optimizer: the bound tensors were the meta ones
    w = m[0].weight.detach().clone()
    _grads(m)
    opt.step()
    assert torch.equal(m[0].weight, w * (1 - 0.5 * 0.1))


def test_item3_load_state_dict_assign():
    m = _model()
    reg = tr.Regularizer(m, [tr.L1(0.1, mode="prox")])
    src = _model(5).state_dict()
    m.load_state_dict(src, assign=True)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    reg.attach(opt)
    w = m[1].weight.detach().clone()
    _grads(m)
    opt.step()
    expect = torch.sign(w) * torch.clamp(w.abs() - 0.1, min=0)
    assert torch.equal(m[1].weight, expect)


# ------------------------------------------------------------------ 4. two regularizers, one optimizer
def test_item4_second_regularizer_on_the_same_parameters_raises():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    tr.Regularizer(m, [tr.L2(0.1, mode="decoupled", name="first_wd")]).attach(opt)
    with pytest.raises(ValueError, match=r"first_wd.*0\.weight"):
        tr.Regularizer(m, [tr.L2(0.1, mode="decoupled")]).attach(opt)
    w = m[0].weight.detach().clone()
    _grads(m)
    opt.step()
    assert torch.equal(m[0].weight, w * (1 - 0.1 * 0.1))  # once, not 0.9801


def test_item4_disjoint_regularizers_may_share_an_optimizer():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    tr.Regularizer(m, [tr.L2(0.1, mode="decoupled", on=tr.select.name("0.weight"))]).attach(opt)
    tr.Regularizer(m, [tr.L2(0.2, mode="decoupled", on=tr.select.name("1.weight"))]).attach(opt)
    w0, w1 = m[0].weight.detach().clone(), m[1].weight.detach().clone()
    _grads(m)
    opt.step()
    assert torch.equal(m[0].weight, w0 * (1 - 0.1 * 0.1))
    assert torch.equal(m[1].weight, w1 * (1 - 0.1 * 0.2))


# ------------------------------------------------------------------ 5. failed step, retried
@pytest.mark.parametrize("mode", ["grad", "decoupled"])
def test_item5_retried_step_equals_one_step(mode):
    torch.manual_seed(0)
    m = nn.Linear(5, 4)
    ref = copy.deepcopy(m)
    x = torch.randn(8, 5)
    if mode == "grad":  # torch's own coupled weight decay, bit for bit
        opt_ref = torch.optim.SGD(
            [{"params": [ref.weight], "weight_decay": 0.1}, {"params": [ref.bias]}], lr=0.1, foreach=True
        )
    else:
        opt_ref = torch.optim.AdamW(
            [{"params": [ref.weight], "weight_decay": 0.1}, {"params": [ref.bias], "weight_decay": 0.0}],
            lr=0.1,
            foreach=True,
        )
    opt = (
        torch.optim.SGD(m.parameters(), lr=0.1, foreach=True)
        if mode == "grad"
        else torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.0, foreach=True)
    )
    tr.Regularizer(m, [tr.L2(0.1, mode=mode)]).attach(opt)
    opt.register_step_pre_hook(FailOnce())  # runs after ours, before the update
    for net, o in ((ref, opt_ref), (m, opt)):
        o.zero_grad()
        net(x).square().sum().backward()
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    opt.step()  # the retry
    opt_ref.step()
    assert torch.equal(m.weight, ref.weight)
    assert torch.equal(m.bias, ref.bias)


# ------------------------------------------------------------------ 6. schedule error before the update
def test_item6_prox_schedule_error_is_raised_before_the_optimizer_moves():
    def bad_at_2(k):
        return float("nan") if k == 2 else 0.01

    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    reg = tr.Regularizer(m, [tr.L1(bad_at_2, mode="prox")]).attach(opt)
    for _ in range(2):
        _grads(m, 1.0)
        opt.step()
    before = [p.detach().clone() for p in m.parameters()]
    _grads(m, 1.0)
    with pytest.raises(ValueError, match=r"step 2"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert reg.step == 2


# ------------------------------------------------------------------ 7. manual use after zero_grad
def test_item7_manual_prox_and_constraints_act_without_gradients():
    m = _model()
    with torch.no_grad():
        m[0].weight.mul_(10)
    reg = tr.Regularizer(m, [tr.L1(0.3, mode="prox"), tr.MaxNorm(1.0, dim=1)])
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    reg.attach(opt)
    opt.zero_grad()  # grads are None
    w = m[0].weight.detach().clone()
    reg.apply_prox()
    st = torch.sign(w) * torch.clamp(w.abs() - 0.3, min=0)
    n = st.norm(dim=1, keepdim=True)
    expect = torch.where(n > 1.0, st / n, st)
    assert torch.allclose(m[0].weight, expect, rtol=0, atol=1e-6)
    assert (m[0].weight.norm(dim=1) <= 1.0 + 1e-6).all()


def test_item7_manual_decoupled_acts_without_gradients():
    m = _model()
    reg = tr.Regularizer(m, [tr.L2(0.5, mode="decoupled")])
    w = m[0].weight.detach().clone()
    reg.apply_decoupled(lr=0.1)
    assert torch.equal(m[0].weight, w * (1 - 0.1 * 0.5))


# ------------------------------------------------------------------ 10. a rule in two regularizers
def test_item10_reused_rule_instance_keeps_both_regularizers_working():
    a, b = _model(0), _model(1)
    rule = tr.L2SP(1.0, mode="loss")
    reg_a = tr.Regularizer(a, [rule])
    reg_b = tr.Regularizer(b, [rule])
    with torch.no_grad():
        for m in (a, b):
            for p in m.parameters():
                p.add_(1.0)
    # each reference is its own model's weights at its construction: every weight moved by 1
    n_a = sum(p.numel() for n, p in a.named_parameters() if n.endswith("weight"))
    assert math.isclose(reg_a.value().item(), 0.5 * n_a, rel_tol=1e-6)
    assert math.isclose(reg_b.value().item(), 0.5 * n_a, rel_tol=1e-6)


# ------------------------------------------------------------------ 11. numerical guards
def test_item11_strength_overflowing_the_dtype_raises_at_that_step():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    tr.Regularizer(m, [tr.L1(S.step(0.1, 1, gamma=10.0), mode="prox")]).attach(opt)
    with pytest.raises(ValueError, match=r"rule 'l1' at step 40"):  # λ = 0.1·10^40 > float32 max
        for _ in range(60):
            _grads(m)
            opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("rule", [tr.L1(0.1, mode="prox"), tr.L2(0.1, mode="prox"), tr.L2(0.1, mode="decoupled")])
def test_item11_negative_lr_raises_and_leaves_the_weights(rule):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    tr.Regularizer(m, [rule]).attach(opt)
    opt.param_groups[0]["lr"] = -0.1
    before = [p.detach().clone() for p in m.parameters()]
    _grads(m)
    with pytest.raises(ValueError, match=r"learning rate is -0\.1"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))


def test_item11_zero_strength_loss_mode_is_an_exact_zero():
    m = _model()
    reg = tr.Regularizer(m, [tr.Penalty.from_fn(lambda p: p.sum() * float("inf"), 0.0, mode="loss")])
    v = reg.penalty()
    assert v.item() == 0.0 and not torch.isnan(v)


# ------------------------------------------------------------------ 12. sparse gradients
def test_item12_sparse_embedding_in_grad_mode_raises_at_construction():
    m = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"sparse.*0\.weight"):
        tr.Regularizer(m, [tr.L2(0.1, on=tr.select.embeddings)])
    tr.Regularizer(m, [tr.L2(0.1, on=tr.select.embeddings, mode="decoupled")])  # dense θ: fine


# ------------------------------------------------------------------ 13. smaller
@pytest.mark.parametrize(
    ("rules", "exc", "msg"),
    [
        (tr.L2, TypeError, r"class tr\.L2, not an instance"),
        (0.1, TypeError, r"rules must be a penalty"),
        ([], ValueError, r"rules is empty"),
        ([tr.L2], TypeError, r"rules\[0\]: got the class"),
    ],
)
def test_item13_bad_rules_argument(rules, exc, msg):
    with pytest.raises(exc, match=msg):
        tr.Regularizer(_model(), rules)


class _NoLrOpt(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {"rho": 0.1})

    def step(self, closure=None):
        pass


def test_item13_optimizer_without_lr_raises_at_attach():
    m = _model()
    reg = tr.Regularizer(m, [tr.L2(0.1, mode="decoupled")])
    with pytest.raises(ValueError, match=r"without an 'lr'"):
        reg.attach(_NoLrOpt(m.parameters()))
    tr.Regularizer(m, [tr.L2(0.1, mode="decoupled", lr_coupling="none")]).attach(_NoLrOpt(m.parameters()))


def _saved():
    m = _model()
    reg = tr.Regularizer(m, [tr.L2SP(0.1, name="sp")])
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    reg.attach(opt)
    _grads(m)
    opt.step()
    return reg.state_dict()


@pytest.mark.parametrize(
    ("edit", "msg"),
    [
        (lambda sd: sd["optimizers"][0].update(steps=-5), r"optimizers\[0\]\.steps must be an int >= 0"),
        (lambda sd: sd["optimizers"][0].update(steps="abc"), r"optimizers\[0\]\.steps"),
        (lambda sd: sd.update(version=99), r"unknown state version 99"),
        (lambda sd: sd["rules"]["sp"]["reference"]["0.weight"].fill_(float("nan")), r"NaN or inf"),
        (lambda sd: sd["kinds"].update(sp="L1"), r"saved as a L1"),
    ],
)
def test_item13_load_state_dict_validates_before_changing_anything(edit, msg):
    sd = _saved()
    edit(sd)
    m = _model()
    reg = tr.Regularizer(m, [tr.L2SP(0.1, name="sp")])
    ref_before = reg.rules["sp"].rule_state_dict()["reference"]["0.weight"].clone()
    with pytest.raises(ValueError, match=msg):
        reg.load_state_dict(sd)
    assert reg.step == 0
    assert torch.equal(reg.rules["sp"].rule_state_dict()["reference"]["0.weight"], ref_before)


def test_item13_state_saved_by_another_rule_type_under_the_same_name():
    m = _model()
    sd = tr.Regularizer(m, [tr.L1(0.1, name="r")]).state_dict()
    with pytest.raises(ValueError, match=r"rule 'r' was saved as a L1 and is a L2"):
        tr.Regularizer(_model(), [tr.L2(0.1, name="r")]).load_state_dict(sd)


def test_item13_attach_is_all_or_nothing():
    m = _model()
    reg = tr.Regularizer(m, [tr.L1(0.1, mode="prox", metric="adaptive")])
    o1 = torch.optim.Adam(m[0].parameters(), lr=0.1)
    o2 = torch.optim.SGD(m[1].parameters(), lr=0.1)  # no adaptive metric: refused
    with pytest.raises(ValueError, match="metric='adaptive'"):
        reg.attach(o1, o2)
    w = m[0].weight.detach().clone()
    _grads(m, 0.0)
    o1.step()
    o1.step()
    assert torch.equal(m[0].weight, w)  # o1 was not attached: no prox
    assert reg.summary(as_dict=True)["params"][0]["lr"] is None


def test_item3_l2sp_reference_survives_a_replaced_parameter():
    """θ₀ = the weights at construction, also after load_state_dict(assign=True)."""
    m = _model(0)
    w0 = m[0].weight.detach().clone()
    reg = tr.Regularizer(m, [tr.L2SP(1.0, mode="loss", on=tr.select.name("0.weight"))])
    new = _model(7).state_dict()
    m.load_state_dict(new, assign=True)
    expect = 0.5 * (new["0.weight"] - w0).square().sum()
    assert torch.allclose(reg.penalty(), expect, rtol=1e-6)


def test_item3_l2sp_default_reference_of_meta_weights_is_refused():
    """θ₀ would be read from uninitialized memory after to_empty(): refuse, say what to do."""
    with torch.device("meta"):
        m = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"meta device.*weight.*after to_empty"):
        tr.Regularizer(m, [tr.L2SP(1.0, mode="loss")])
    tr.Regularizer(m, [tr.L2SP(1.0, mode="loss", reference={"weight": torch.zeros(3, 4)})])


# ------------------------------------------------------------------ found by the adversarial review
@pytest.mark.parametrize("mode", ["grad", "decoupled"])
def test_item5_retry_with_two_rules_on_one_parameter(mode):
    """L2 + L1 on the same weight: the retry must not re-apply the first rule (its record
    is per tensor after the whole phase, not per rule)."""
    torch.manual_seed(0)
    w0 = torch.randn(3, 4)
    lr, l2, l1 = 0.1, 0.5, 0.2

    def run(fail):
        m = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            m.weight.copy_(w0)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        tr.Regularizer(m, [tr.L2(l2, mode=mode), tr.L1(l1, mode=mode)]).attach(opt)
        if fail:
            opt.register_step_pre_hook(FailOnce())
        m.weight.grad = torch.zeros_like(w0)
        if fail:
            with pytest.raises(RuntimeError):
                opt.step()
        opt.step()
        return m.weight.detach()

    # written out: grad mode θ − lr(λ₂θ + λ₁ sign θ); decoupled θ − lr·λ₂θ − lr·λ₁ sign(θ')
    if mode == "grad":
        expect = w0 - lr * (l2 * w0 + l1 * torch.sign(w0))
    else:
        a = w0 - lr * l2 * w0
        expect = a - lr * l1 * torch.sign(a)
    assert torch.allclose(run(False), expect, rtol=0, atol=1e-6)  # the L1 term alone is 0.02
    assert torch.equal(run(True), run(False))


def test_same_optimizer_twice_in_one_attach_applies_once():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    reg = tr.Regularizer(m, [tr.L2(0.1, mode="decoupled")])
    reg.attach(opt, opt)
    w = m[0].weight.detach().clone()
    _grads(m)
    opt.step()
    assert torch.equal(m[0].weight, w * (1 - 0.1 * 0.1))
    assert len(reg.state_dict()["optimizers"]) == 1


def test_failed_load_changes_nothing():
    m = _model()
    reg = tr.Regularizer(m, [tr.L2(0.1, name="l2"), tr.L2SP(0.1, name="sp")])
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    reg.attach(opt)
    _grads(m)
    opt.step()
    sd = reg.state_dict()
    sd["optimizers"][0]["steps"] = 77
    sd["strengths"]["l2"] = 0.5
    sd["rules"]["sp"]["reference"] = {"0.weight": torch.zeros(2, 2), "1.weight": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"rules\['sp'\].*shape"):
        reg.load_state_dict(sd)
    assert reg.step == 1 and reg.rules["l2"].strength == 0.1


@pytest.mark.parametrize(("key", "value"), [("strengths", {"l2": "abc"}), ("strengths", {"l2": {"schedule": {"kind": "nope"}}})])
def test_bad_saved_strength_is_a_value_error_naming_the_rule(key, value):
    m = _model()
    reg = tr.Regularizer(m, [tr.L2(0.1, name="l2")])
    sd = reg.state_dict()
    sd[key] = value
    with pytest.raises(ValueError, match=r"strengths\['l2'\]"):
        reg.load_state_dict(sd)
    assert reg.rules["l2"].strength == 0.1


def test_unknown_top_level_key_in_state_raises():
    reg = tr.Regularizer(_model(), [tr.L2(0.1)])
    sd = reg.state_dict()
    sd["stpes"] = 3
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stpes'\]"):
        reg.load_state_dict(sd)


def test_loaded_count_wins_when_the_detached_optimizer_is_attached_again():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    reg = tr.Regularizer(m, [tr.L2(0.1, mode="decoupled")]).attach(opt)
    for _ in range(3):
        _grads(m)
        opt.step()
    sd = reg.state_dict()
    sd["optimizers"][0]["steps"] = 100
    reg.detach()
    reg.load_state_dict(sd)
    reg.attach(opt)
    assert reg.step == 100
    assert [e["steps"] for e in reg.state_dict()["optimizers"]] == [100]


def test_switching_optimizers_without_detach_raises():
    m = _model()
    reg = tr.Regularizer(m, [tr.L2(0.1, mode="decoupled")])
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    reg.attach(sgd)
    adam = torch.optim.Adam(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"detach\(\) first"):
        reg.attach(adam)
    reg.detach()
    reg.attach(adam)
    assert reg.step == 0


def test_rewired_param_groups_are_followed():
    m = nn.Linear(4, 3, bias=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    tr.Regularizer(m, [tr.L2(0.1, mode="decoupled")]).attach(opt)
    m.load_state_dict({"weight": torch.ones(3, 4)}, assign=True)
    opt.param_groups[0]["params"] = list(m.parameters())
    m.weight.grad = torch.zeros(3, 4)
    opt.step()
    assert torch.equal(m.weight.detach(), torch.full((3, 4), 1 - 0.5 * 0.1))


def test_param_group_added_after_attach_counts_for_the_overlap_check():
    m = _model()
    m[1].requires_grad_(False)
    opt = torch.optim.SGD(m[0].parameters(), lr=0.1)
    a = tr.Regularizer(m, [tr.L2(0.1, mode="decoupled", on=tr.select.all)]).attach(opt)
    m[1].requires_grad_(True)  # progressive unfreezing
    opt.add_param_group({"params": list(m[1].parameters())})
    with pytest.raises(ValueError, match="another Regularizer"):
        tr.Regularizer(m, [tr.L2(0.1, mode="decoupled", on=tr.select.name("1.weight"))]).attach(opt)
    w = m[1].weight.detach().clone()
    _grads(m)
    opt.step()
    assert torch.equal(m[1].weight, w * (1 - 0.1 * 0.1))  # once, by the first regularizer
    assert a.step == 1


@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_negative_or_nan_tensor_lr_applies_nothing_and_stays_finite(bad):
    m = nn.Linear(4, 3, bias=False)
    opt = torch.optim.SGD(m.parameters(), lr=torch.tensor(0.1))
    reg = tr.Regularizer(m, [tr.L2(2.0, mode="prox")]).attach(opt)
    w = m.weight.detach().clone()
    reg.apply_prox(lr=torch.tensor(bad))  # 1/(1 + lr·λ) with lr = −0.5, λ = 2 would be inf
    assert torch.equal(m.weight.detach(), w)


def test_manual_apply_leaves_frozen_parameters_alone():
    m = _model()
    m[0].weight.requires_grad_(False)
    reg = tr.Regularizer(m, [tr.L2(0.5, mode="decoupled")])
    w0, w1 = m[0].weight.detach().clone(), m[1].weight.detach().clone()
    reg.apply_decoupled(lr=0.1)
    assert torch.equal(m[0].weight, w0)
    assert torch.equal(m[1].weight, w1 * (1 - 0.1 * 0.5))


def test_resume_under_another_name_warns():
    m = _model()
    reg = tr.Regularizer(m, [tr.L2(0.1)])
    reg.attach(torch.optim.SGD(m.parameters(), lr=0.1))
    sd = reg.state_dict()
    reg2 = tr.Regularizer(_model(), [tr.L2(0.1)])
    reg2.load_state_dict(sd)
    with pytest.warns(UserWarning, match=r"none for this SGD \(name 'main'\)"):
        reg2.attach(torch.optim.SGD(reg2.model.parameters(), lr=0.1), names="main")


def test_same_rule_instance_twice_in_one_list_raises():
    r = tr.L2(0.1)
    with pytest.raises(ValueError, match=r"rules\[0\] and rules\[1\] are the same L2 instance"):
        tr.Regularizer(_model(), [r, r])


def test_optimizer_of_replaced_parameters_is_dropped_at_the_next_attach():
    m = _model()
    reg = tr.Regularizer(m, [tr.L2(0.1, mode="decoupled")])
    old = torch.optim.SGD(m.parameters(), lr=0.1)
    reg.attach(old)
    for _ in range(4):
        _grads(m)
        old.step()
    m.load_state_dict(_model(3).state_dict(), assign=True)
    new = torch.optim.SGD(m.parameters(), lr=0.1)
    reg.attach(new)  # the old optimizer steps tensors the model no longer has
    assert reg.step == 0
    assert len(reg.state_dict()["optimizers"]) == 1


# ------------------------------------------------------------------ hints (issue 15 item 8)
def test_euclidean_prox_with_adam_hints_once_and_adaptive_does_not():
    m = _model()
    reg = tr.Regularizer(m, [tr.L1(1e-3, mode="prox")])
    with pytest.warns(UserWarning, match=r"metric='euclidean' with Adam"):
        reg.attach(torch.optim.Adam(m.parameters(), lr=0.1))
    import warnings as _w

    reg.detach()
    with _w.catch_warnings():
        _w.simplefilter("error")
        reg.attach(torch.optim.Adam(m.parameters(), lr=0.1))  # once per rule
        m2 = _model()
        tr.Regularizer(m2, [tr.L1(1e-3, mode="prox", metric="adaptive")]).attach(torch.optim.Adam(m2.parameters()))
        m3 = _model()
        tr.Regularizer(m3, [tr.L1(1e-3, mode="prox")]).attach(torch.optim.SGD(m3.parameters(), lr=0.1))


def test_prox_rule_that_zeroes_a_whole_tensor_says_so_once():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    tr.Regularizer(m, [tr.L1(100.0, mode="prox")]).attach(opt)
    _grads(m)
    with pytest.warns(UserWarning, match=r"set every entry of 0\.weight, 1\.weight to exactly 0"):
        opt.step()
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        for _ in range(3):
            _grads(m)
            opt.step()
