"""Regularizer life cycle: optimizers that change after attach, detach/re-attach, tensor lr,
schedules after skipped fused steps. References are written out by hand."""

import pytest
import torch
from torch import nn

import torch_regularizers as tr


def _zero_grads(m):
    for p in m.parameters():
        p.grad = torch.zeros_like(p)


def test_param_group_added_after_attach_is_regularized():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    for p in m[1].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(m[0].parameters(), lr=0.1)
    tr.Regularizer(m, [tr.L2(1.0, mode="decoupled")]).attach(opt)
    for p in m[1].parameters():  # progressive unfreezing
        p.requires_grad_(True)
    opt.add_param_group({"params": list(m[1].parameters()), "lr": 0.2})
    _zero_grads(m)
    w0, w1, b1 = m[0].weight.detach().clone(), m[1].weight.detach().clone(), m[1].bias.detach().clone()
    opt.step()
    # AdamW-style decay θ·(1 − lr·λ) with each group's own lr; the bias is not selected
    assert torch.equal(m[0].weight, w0 * (1 - 0.1))
    assert torch.equal(m[1].weight, w1 * (1 - 0.2))
    assert torch.equal(m[1].bias, b1)


def test_detach_keeps_step_count_for_schedules():
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    seen = []

    def schedule(k):
        seen.append(k)
        return 0.1

    reg = tr.Regularizer(m, [tr.L1(schedule, mode="prox")])
    for _ in range(3):  # an epoch loop with a context manager
        with reg.attached(opt):
            for _ in range(2):
                opt.zero_grad()
                m(torch.ones(1, 3)).sum().backward()
                opt.step()
        opt.step()  # detached: not applied, not counted
    assert seen == [0, 1, 2, 3, 4, 5]
    assert reg.step == 6
    assert reg.state_dict()["optimizers"][0]["steps"] == 6


def test_detached_regularizer_applies_nothing():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    reg = tr.Regularizer(a, [tr.L2(0.5, mode="decoupled"), tr.L1(0.1, mode="grad")]).attach(oa)
    reg.detach()
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad()
        m(torch.ones(4, 3)).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_lr_ratio_with_tensor_lr_changed_in_place():
    m = nn.Linear(3, 2, bias=False)
    opt = torch.optim.SGD(m.parameters(), lr=torch.tensor(0.1))
    tr.Regularizer(m, [tr.L2(0.4, mode="decoupled", lr_coupling="lr_ratio")]).attach(opt)
    opt.param_groups[0]["lr"].fill_(0.05)  # the usual way to change a tensor lr
    _zero_grads(m)
    w = m.weight.detach().clone()
    opt.step()
    # η = lr/initial_lr = 0.5: θ ← θ − 0.5·0.4·θ
    torch.testing.assert_close(m.weight, w * (1 - 0.5 * 0.4), rtol=1e-6, atol=0)


def test_schedule_set_after_skipped_fused_steps_sees_applied_count():
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    opt = torch.optim.Adam(m.parameters(), lr=0.01, fused=True)
    reg = tr.Regularizer(m, [tr.L1(0.01, mode="prox")]).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 4)
    for i in range(3):
        opt.zero_grad()
        loss = m(x).pow(2).mean() * (float("inf") if i in (1, 2) else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    seen = []
    reg.set_strength("l1", lambda k: seen.append(k) or 0.01)
    opt.zero_grad()
    scaler.scale(m(x).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert seen and seen[0] == 1  # one applied step before this one; the two skips don't count
    assert reg.step == 2


@pytest.mark.parametrize("impl", ["foreach", "reference"])
def test_optimizer_load_state_dict_after_attach_uses_new_groups(impl):
    torch.manual_seed(0)
    m = nn.Linear(3, 2, bias=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    tr.Regularizer(m, [tr.L2(1.0, mode="decoupled")], impl=impl).attach(opt)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.3
    opt.load_state_dict(sd)
    _zero_grads(m)
    w = m.weight.detach().clone()
    opt.step()
    assert torch.equal(m.weight, w * (1 - 0.3))
