"""reg.summary(): what each parameter gets, checked against the model itself."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torch_regularizers as tr


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, idx):
        return self.head(self.norm(torch.relu(self.fc1(self.emb(idx)))))


L2_STRENGTH = 1e-4
L1_STRENGTH = 0.003
L1B_STRENGTH = 0.25


def build():
    model = Net()
    reg = tr.Regularizer(
        model,
        [
            tr.L2(L2_STRENGTH, mode="decoupled"),  # default selector: fc1.weight, head.weight
            tr.L1(L1_STRENGTH, on=tr.select.name("head.*"), mode="prox"),  # head.weight, head.bias
            tr.L1(L1B_STRENGTH, on=tr.select.name("fc1.weight")),  # second L1 -> "l1_1"
        ],
    )
    return model, reg


# hand-listed expectations
SELECTED = {
    "fc1.weight": [("l2", "decoupled", L2_STRENGTH), ("l1_1", "grad", L1B_STRENGTH)],
    "head.weight": [("l2", "decoupled", L2_STRENGTH), ("l1", "prox", L1_STRENGTH)],
    "head.bias": [("l1", "prox", L1_STRENGTH)],
}
UNSELECTED = ["emb.weight", "fc1.bias", "norm.weight", "norm.bias"]


def strength_spellings(x):
    return {
        repr(x),
        str(x),
        f"{x:g}",
        f"{x:.0e}",
        f"{x:.1e}",
        f"{x:.2e}",
        f"{x:.3e}",
        f"{x:e}",
        f"{x:.3g}",
        f"{x:.4g}",
        f"{x:.6f}".rstrip("0"),
        f"{x:.0e}".replace("e-0", "e-"),
        f"{x:.1e}".replace("e-0", "e-"),
    }


def test_summary_text_lists_params_rules_modes_strengths_and_unselected():
    model, reg = build()
    text = reg.summary()
    assert isinstance(text, str)
    for name in SELECTED:
        assert name in text, name
    for name in UNSELECTED:
        assert name in text, name
    for rule in ("l2", "l1", "l1_1"):
        assert rule in text, rule
    for mode in ("decoupled", "prox", "grad"):
        assert mode in text, mode
    for s in (L2_STRENGTH, L1_STRENGTH, L1B_STRENGTH):
        assert any(sp in text for sp in strength_spellings(s)), (s, text)
    # shapes / numels of the selected parameters appear
    params = dict(model.named_parameters())
    for name in SELECTED:
        assert str(params[name].numel()) in text


def test_summary_text_unselected_after_selected():
    # "then the parameters no rule selects": every unselected name is listed
    # after the first selected one.
    _, reg = build()
    text = reg.summary()
    first_selected = min(text.index(n) for n in SELECTED)
    for name in UNSELECTED:
        assert text.rindex(name) > first_selected, name


def _entry_map(d):
    return {e["name"]: e for e in d["params"]}


def test_summary_dict_structure_and_content():
    model, reg = build()
    d = reg.summary(as_dict=True)
    assert set(d) >= {"params", "unselected", "rules"}
    params = dict(model.named_parameters())

    entries = _entry_map(d)
    for e in d["params"]:
        assert set(e) >= {"name", "shape", "numel", "rules", "lr"}
    selected_in_dict = {n for n, e in entries.items() if e["rules"]}
    assert selected_in_dict == set(SELECTED)

    for name, expected_rules in SELECTED.items():
        e = entries[name]
        assert tuple(e["shape"]) == tuple(params[name].shape)
        assert e["numel"] == params[name].numel()
        got = sorted((r["rule"], r["mode"], r["strength"]) for r in e["rules"])
        want = sorted(expected_rules)
        assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in want]
        for (_, _, gs), (_, _, ws) in zip(got, want):
            assert isinstance(gs, float)
            assert gs == ws  # exact: the strength given at construction

    assert sorted(d["unselected"]) == sorted(UNSELECTED)


def test_summary_dict_rule_totals_match_model():
    model, reg = build()
    d = reg.summary(as_dict=True)
    params = dict(model.named_parameters())
    expected = {}
    for name, rules in SELECTED.items():
        for rule, _, _ in rules:
            expected.setdefault(rule, []).append(name)
    assert set(d["rules"]) == set(expected)
    for rule, names in expected.items():
        tot = d["rules"][rule]
        assert tot["numel"] == sum(params[n].numel() for n in names), rule
        if isinstance(tot["params"], int):
            assert tot["params"] == len(names), rule
        else:
            assert sorted(tot["params"]) == sorted(names), rule


def test_summary_dict_lr_is_group_lr_when_attached():
    model, reg = build()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(
        [
            {"params": [params["fc1.weight"], params["fc1.bias"]], "lr": 0.05},
            {"params": [p for n, p in params.items() if not n.startswith("fc1.")], "lr": 0.2},
        ],
        lr=0.1,
    )
    reg.attach(opt)
    entries = _entry_map(reg.summary(as_dict=True))
    assert entries["fc1.weight"]["lr"] == pytest.approx(0.05)
    assert entries["head.weight"]["lr"] == pytest.approx(0.2)
    assert entries["head.bias"]["lr"] == pytest.approx(0.2)
    text = reg.summary()
    assert "0.05" in text and "0.2" in text
    reg.detach()


def test_summary_custom_names_and_repeat_numbering():
    model = Net()
    reg = tr.Regularizer(
        model,
        [
            tr.L1(0.1, on=tr.select.name("fc1.weight")),
            tr.L1(0.2, on=tr.select.name("head.weight")),
            tr.L1(0.3, on=tr.select.name("head.weight")),
            tr.L2(0.4, on=tr.select.name("fc1.weight"), name="ridge"),
            tr.ElasticNet(0.5, l1_ratio=0.2, on=tr.select.name("fc1.weight")),
        ],
    )
    d = reg.summary(as_dict=True)
    assert set(d["rules"]) == {"l1", "l1_1", "l1_2", "ridge", "elasticnet"}
    entries = _entry_map(d)
    fc1 = {r["rule"]: r for r in entries["fc1.weight"]["rules"]}
    assert set(fc1) == {"l1", "ridge", "elasticnet"}
    assert fc1["l1"]["strength"] == 0.1
    assert fc1["ridge"]["strength"] == 0.4
    assert fc1["elasticnet"]["strength"] == 0.5
    head = {r["rule"]: r["strength"] for r in entries["head.weight"]["rules"]}
    assert head == {"l1_1": 0.2, "l1_2": 0.3}
    assert "ridge" in reg.summary()


def test_summary_does_not_touch_the_model():
    model, reg = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg.summary()
    reg.summary(as_dict=True)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert p.grad is None


def test_value_matches_rules_for_summary_model():
    # value() with the same rules as the summary: an independent written-out sum
    model, reg = build()
    p = {n: q.detach() for n, q in model.named_parameters()}
    expected = (
        0.5 * L2_STRENGTH * ((p["fc1.weight"] ** 2).sum() + (p["head.weight"] ** 2).sum())
        + L1_STRENGTH * (p["head.weight"].abs().sum() + p["head.bias"].abs().sum())
        + L1B_STRENGTH * p["fc1.weight"].abs().sum()
    )
    assert math.isclose(float(reg.value()), float(expected), rel_tol=1e-5)
