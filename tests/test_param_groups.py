"""tr.param_groups: native weight-decay groups with the library's selectors, checked against
hand-built groups, against the decay set of the equivalent Regularizer, and by training
(bit-identical to the Regularizer doing the same decay); and the double-decay guard."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_regularizers as tr


class MyRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class LM(nn.Module):
    """Embedding tied to the output head, a cls token, norms, a frozen layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.fc1 = nn.Linear(8, 16)
        self.norm = MyRMSNorm(16)
        self.fc2 = nn.Linear(16, 8, bias=False)
        self.ln = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx):
        h = self.emb(idx) + self.cls_token
        h = self.ln(self.fc2(self.norm(torch.relu(self.fc1(h)))))
        return self.head(self.frozen(h))


def lm(seed=0):
    torch.manual_seed(seed)
    return LM()


def names_of(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def test_default_groups_by_hand():
    m = lm()
    groups = tr.param_groups(m, weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    assert len(groups) == 2
    decay, rest = groups
    assert names_of(m, decay["params"]) == ["fc1.weight", "fc2.weight"]
    assert names_of(m, rest["params"]) == ["cls_token", "emb.weight", "fc1.bias", "norm.weight", "ln.weight", "ln.bias"]
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert decay["lr"] == rest["lr"] == 1e-3 and decay["betas"] == rest["betas"] == (0.9, 0.95)
    # the tied embedding/head weight appears once; frozen parameters are left out
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == 8
    groups = tr.param_groups(m, 0.1, include_frozen=True)
    assert names_of(m, groups[0]["params"]) == ["fc1.weight", "fc2.weight", "frozen.weight"]
    assert "lr" not in groups[0]


def test_custom_no_decay_by_hand():
    m = lm()
    decay, rest = tr.param_groups(m, 0.05, no_decay=tr.select.biases | tr.select.norms)
    assert names_of(m, decay["params"]) == ["cls_token", "emb.weight", "fc1.weight", "fc2.weight"]
    assert names_of(m, rest["params"]) == ["fc1.bias", "norm.weight", "ln.weight", "ln.bias"]
    # nothing to leave out: the empty group is dropped
    (only,) = tr.param_groups(m, 0.05, no_decay=tr.select.name("nothing"))
    assert only["weight_decay"] == 0.05 and len(only["params"]) == 8


def test_bad_arguments():
    m = lm()
    with pytest.raises(TypeError, match="no_decay"):
        tr.param_groups(m, 0.1, no_decay=["bias"])
    with pytest.raises(TypeError, match="params"):
        tr.param_groups(m, 0.1, params=[])


selector_pool = [
    tr.select.biases,
    tr.select.norms,
    tr.select.embeddings,
    tr.select.tokens,
    tr.select.name("fc1.*"),
    tr.select.modules(nn.LayerNorm),
]


@settings(deadline=None, max_examples=30)
@given(picks=st.lists(st.sampled_from(range(len(selector_pool))), min_size=1, max_size=3, unique=True))
def test_decay_set_equals_equivalent_regularizer(picks):
    m = lm()
    no_decay = selector_pool[picks[0]]
    for i in picks[1:]:
        no_decay = no_decay | selector_pool[i]
    groups = tr.param_groups(m, 0.1, no_decay=no_decay)
    decay = [g for g in groups if g["weight_decay"] > 0]
    got = names_of(m, decay[0]["params"]) if decay else []
    reg = tr.Regularizer(m, [tr.L2(0.1, on=tr.select.all - no_decay)], allow_empty=True)
    want = [
        p["name"] for p in reg.summary(as_dict=True)["params"] if p["rules"] and p["trainable"]
    ]
    assert got == want


@pytest.mark.parametrize(
    "opt_cls, mode, kw",
    [
        (torch.optim.SGD, "grad", {"momentum": 0.9}),
        (torch.optim.Adam, "grad", {}),
        (torch.optim.AdamW, "decoupled", {}),
    ],
)
def test_training_equals_regularizer(opt_cls, mode, kw):
    """Optimizer weight_decay on param_groups == weight_decay=0 + the Regularizer, bit for bit."""
    m1, m2 = lm(), lm()
    o1 = opt_cls(tr.param_groups(m1, weight_decay=0.05, lr=0.01, **kw))
    o2 = opt_cls([p for p in m2.parameters() if p.requires_grad], lr=0.01, weight_decay=0.0, **kw)
    tr.Regularizer(m2, [tr.L2(0.05, mode=mode)]).attach(o2)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        idx = torch.randint(0, 12, (4, 5), generator=g)
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
            o.step()
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(m1.fc1.weight, lm().fc1.weight)


# --------------------------------------------------------------------------- double-decay guard


def test_double_decay_warns_once_naming_params_and_fix():
    m = lm()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)  # wd 0.01
    reg = tr.Regularizer(m, [tr.L2(1e-2, mode="decoupled"), tr.ElasticNet(1e-3, 0.5, name="en"), tr.L1(1e-3)])
    with pytest.warns(tr.DoubleDecayWarning) as rec:
        reg.attach(opt)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "weight_decay=0.01" in msg and "fc1.weight" in msg and "fc2.weight" in msg
    assert "'l2'" in msg and "'en'" in msg and "'l1'" not in msg
    assert "weight_decay=0" in msg and "tr.param_groups" in msg


def test_no_warning_when_the_optimizer_does_not_decay_those_params():
    m = lm()
    groups = tr.param_groups(m, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the optimizer decays only weights; the L2 rule is on the biases: no overlap
        tr.Regularizer(m, [tr.L2(1e-2, on=tr.select.biases)]).attach(torch.optim.AdamW(groups))
        # L1 only, with an optimizer that decays: not a double L2
        m2 = lm()
        tr.Regularizer(m2, [tr.L1(1e-3), tr.ElasticNet(1e-3, l1_ratio=1.0)]).attach(
            torch.optim.SGD([p for p in m2.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
        )
        m3 = lm()
        tr.Regularizer(m3, [tr.L2(1e-2)]).attach(torch.optim.AdamW(m3.parameters(), weight_decay=0.0))


def test_l2sp_with_optimizer_decay_warns():
    m = lm()
    reg = tr.Regularizer(m, [tr.L2SP(1e-2)])
    with pytest.warns(tr.DoubleDecayWarning, match="L2SP"):
        reg.attach(torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=1e-4))
