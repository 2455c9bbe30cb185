"""Regularizer.from_config / to_config: dict, YAML and JSON; selectors in config; errors
name the key path; configs never import code; to_config round-trips."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_regularizers as tr
from torch_regularizers import schedules as S


class TinyRMSNorm(nn.Module):  # a model's own norm class, found by name, never imported
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.weight


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = TinyRMSNorm(8)

    def forward(self, x):
        return self.norm(torch.relu(self.fc(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.encoder = nn.Sequential(Block(), Block())
        self.ln = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, idx):
        h = self.ln(self.encoder(self.emb(idx)))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h).mean(1)


def net(seed=0):
    torch.manual_seed(seed)
    return Net()


def selected(reg, rule):
    return sorted(p["name"] for p in reg.summary(as_dict=True)["params"] if any(r["rule"] == rule for r in p["rules"]))


# --------------------------------------------------------------------------- building


def test_dict_config_equals_hand_built_and_trains_identically():
    cfg = {
        "rules": [
            {"type": "L2", "strength": 1e-2, "mode": "decoupled"},
            {
                "type": "l1",
                "name": "head_l1",
                "strength": {"type": "cosine", "value": 1e-2, "total_steps": 20},
                "mode": "prox",
                "on": {"name": "head.*"},
                "exclude": "biases",
            },
            {"type": "elastic_net", "alpha": 1e-3, "l1_ratio": 0.25, "on": {"modules": "Conv1d"}},
            {"type": "MaxNorm", "max_value": 2.0, "dim": 1, "on": {"within": "encoder.0", "preset": "weights"}},
        ]
    }
    m1, m2 = net(), net()
    r1 = tr.Regularizer.from_config(m1, cfg)
    r2 = tr.Regularizer(
        m2,
        [
            tr.L2(1e-2, mode="decoupled"),
            tr.L1(S.cosine(1e-2, 20), mode="prox", on=tr.select.name("head.*") - tr.select.biases, name="head_l1"),
            tr.ElasticNet(1e-3, 0.25, on=tr.select.modules(nn.Conv1d)),
            tr.MaxNorm(2.0, dim=1, on=tr.select.within(m2.encoder[0]) & tr.select.weights),
        ],
    )
    assert list(r1.rules) == list(r2.rules) == ["l2", "head_l1", "elasticnet", "maxnorm"]
    assert selected(r1, "head_l1") == ["head.weight"]
    assert selected(r1, "elasticnet") == sorted(["conv.weight", "conv.bias"])
    assert selected(r1, "maxnorm") == ["encoder.0.fc.weight"]
    o1 = torch.optim.Adam(m1.parameters(), lr=1e-2)
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    r1.attach(o1)
    r2.attach(o2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = torch.randint(0, 10, (4, 3), generator=g)
        y = torch.randn(4, 4, generator=g)
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            ((m(idx) - y) ** 2).mean().backward()
            o.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_selectors_in_config():
    m = net()

    def names(on, **extra):
        reg = tr.Regularizer.from_config(m, {"rules": [{"type": "L2", "strength": 0.1, "on": on, **extra}]})
        return selected(reg, "l2")

    assert names("weights") == sorted(["encoder.0.fc.weight", "encoder.1.fc.weight", "conv.weight", "head.weight"])
    assert names("norms") == sorted(["encoder.0.norm.weight", "encoder.1.norm.weight", "ln.weight", "ln.bias"])
    assert names({"modules": "TinyRMSNorm"}) == sorted(["encoder.0.norm.weight", "encoder.1.norm.weight"])
    assert names({"modules": ["nn.Embedding", "torch.nn.LayerNorm"]}) == sorted(["emb.weight", "ln.weight", "ln.bias"])
    assert names({"regex": r"^encoder\.\d\.fc\.bias$"}) == sorted(["encoder.0.fc.bias", "encoder.1.fc.bias"])
    assert names({"name": ["head.*", "conv.bias"]}) == sorted(["head.weight", "head.bias", "conv.bias"])
    assert names(["embeddings", {"name": "head.bias"}]) == sorted(["emb.weight", "head.bias"])
    assert names({"modules": "Linear", "name": "encoder.*"}) == sorted(  # keys intersect
        ["encoder.0.fc.weight", "encoder.0.fc.bias", "encoder.1.fc.weight", "encoder.1.fc.bias"]
    )
    assert names({"all": ["biases", {"not": {"within": "encoder"}}]}) == sorted(["ln.bias", "conv.bias", "head.bias"])
    assert names({"any": ["tokens", {"preset": "embeddings"}]}) == ["emb.weight"]
    assert names("all", exclude=["weights", "norms"]) == sorted(
        ["emb.weight", "encoder.0.fc.bias", "encoder.1.fc.bias", "conv.bias", "head.bias"]
    )


def test_yaml_and_json_files(tmp_path):
    yaml = pytest.importorskip("yaml")
    text = """
rules:
  - type: L2
    strength: 1e-4          # YAML 1.1 reads this as a string
    mode: decoupled
  - type: L1
    strength: {type: linear_warmup, value: 2e-3, warmup_steps: 10}
    mode: prox
    on: {name: "head.*"}
    exclude: biases
allow_empty: false
"""
    assert yaml.safe_load(text)["rules"][0]["strength"] == "1e-4"
    p = tmp_path / "reg.yaml"
    p.write_text(text)
    m = net()
    reg = tr.Regularizer.from_config(m, p)
    assert reg.rules["l2"].strength == 1e-4
    assert reg.rules["l1"].strength == S.linear_warmup(2e-3, 10)
    cfg = reg.to_config()
    j = tmp_path / "reg.json"
    j.write_text(json.dumps(cfg))
    assert tr.Regularizer.from_config(m, str(j)).to_config() == cfg
    y = tmp_path / "reg.yml"
    y.write_text(yaml.safe_dump(cfg))
    assert tr.Regularizer.from_config(m, y).to_config() == cfg
    assert tr.Regularizer.from_config(m, cfg["rules"]).to_config() == cfg  # a bare list of rules


def test_round_trip_every_rule_type():
    m = net()
    cfg = {
        "rules": [
            {"type": "L2", "name": "a", "strength": 0.1, "mode": "grad", "lr_coupling": "lr_ratio"},
            {"type": "L1", "name": "b", "strength": 0.1, "mode": "prox", "on": {"name": "head.weight"}, "metric": "adaptive"},
            {"type": "ElasticNet", "name": "c", "alpha": 0.1, "l1_ratio": 0.3, "mode": "decoupled", "on": {"name": "conv.weight"}},
            {"type": "GroupLasso", "name": "d", "strength": 0.1, "dim": [1, 2], "mode": "prox", "on": {"name": "conv.weight"}},
            {"type": "SparseGroupLasso", "name": "e", "strength": 0.1, "l1_ratio": 0.2, "mode": "grad"},
            {"type": "L2SP", "name": "f", "strength": {"type": "step", "value": 0.1, "step_size": 5, "gamma": 0.5}, "mode": "loss"},
            {"type": "Orthogonal", "name": "g", "strength": 0.01, "mode": "grad", "on": {"modules": "Linear"}, "exclude": "biases"},
            {"type": "MaxNorm", "name": "h", "max_value": 3.0, "dim": 1, "mode": "constraint"},
            {"type": "UnitNorm", "name": "i", "dim": 1, "mode": "constraint", "on": {"name": "encoder.0.fc.weight"}},
            {"type": "NonNeg", "name": "j", "mode": "constraint", "on": "norms"},
            {"type": "ActivityL2", "name": "k", "strength": 0.01, "mode": "loss", "on": {"modules": ["ReLU", "TinyRMSNorm"], "name": "ln"}},
        ]
    }
    reg = tr.Regularizer.from_config(m, cfg)
    out = reg.to_config()
    back = tr.Regularizer.from_config(m, out)
    assert back.to_config() == out
    assert [r["type"] for r in out["rules"]] == [r["type"] for r in cfg["rules"]]
    assert out["rules"][3]["dim"] == [1, 2]
    assert out["rules"][6]["exclude"] == "biases"
    for a, b in zip(reg.rules.values(), back.rules.values()):
        assert repr(a) == repr(b)


def test_to_config_of_code_built_regularizer():
    m = net()
    reg = tr.Regularizer(
        m,
        [
            tr.L2(1e-3),
            tr.L2(1e-2, on=(tr.select.biases | tr.select.within(m.head)) & ~tr.select.norms, mode="decoupled"),
            tr.L1(S.multistep(0.1, [3, 6]), on=tr.select.regex("conv"), mode="prox"),
        ],
    )
    cfg = reg.to_config()
    assert [r["name"] for r in cfg["rules"]] == ["l2", "l2_1", "l1"]
    json.dumps(cfg)  # plain data
    back = tr.Regularizer.from_config(m, cfg)
    for name in ("l2", "l2_1", "l1"):
        assert selected(back, name) == selected(reg, name)
    assert back.to_config() == cfg


def test_to_config_refuses_what_a_config_cannot_hold():
    m = net()
    with pytest.raises(ValueError, match=r"rules\[0\]\.on.*where"):
        tr.Regularizer(m, [tr.L2(0.1, on=tr.select.where(lambda n, p, mod: True))]).to_config()
    with pytest.raises(ValueError, match=r"rules\[0\]\.strength.*callable"):
        tr.Regularizer(m, [tr.L2(lambda k: 0.1)]).to_config()
    with pytest.raises(ValueError, match=r"rules\[0\]\.reference.*tensor"):
        tr.Regularizer(m, [tr.L2SP(0.1, reference=net(1))]).to_config()
    with pytest.raises(ValueError, match=r"rules\[0\]"):
        tr.Regularizer(m, [tr.Penalty.from_fn(lambda p: p.sum())]).to_config()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "cfg, path",
    [
        ({"rules": [], "foo": 1}, r"^foo: unknown key"),
        ({"rule": []}, r"^rule: unknown key"),
        ({"rules": {"type": "L2"}}, r"^rules: expected a list"),
        ({"rules": [{"type": "L2", "strength": 0.1}, {"type": "L1", "strenght": 0.1}]}, r"^rules\[1\]\.strenght: unknown key"),
        ({"rules": [{"type": "L3", "strength": 0.1}]}, r"^rules\[0\]\.type: unknown rule type 'L3'"),
        ({"rules": [{"strength": 0.1}]}, r"^rules\[0\]\.type"),
        ({"rules": [{"type": "L2", "strength": 0.1}, {"type": "L1", "strength": -1}]}, r"^rules\[1\]\.strength"),
        ({"rules": [{"type": "L1", "strength": "lots"}]}, r"^rules\[0\]\.strength"),
        ({"rules": [{"type": "L1", "strength": float("nan")}]}, r"^rules\[0\]\.strength"),
        ({"rules": [{"type": "L1"}]}, r"^rules\[0\]\.strength: required"),
        ({"rules": [{"type": "L1", "strength": {"type": "cosine", "value": 1, "total_steps": 0}}]}, r"^rules\[0\]\.strength\.total_steps"),
        ({"rules": [{"type": "L1", "strength": {"type": "cos", "value": 1}}]}, r"^rules\[0\]\.strength\.type"),
        ({"rules": [{"type": "L1", "strength": 0.1, "mode": "proximal"}]}, r"^rules\[0\]\.mode"),
        ({"rules": [{"type": "ElasticNet", "alpha": 0.1, "l1_ratio": 2}]}, r"^rules\[0\]\.l1_ratio"),
        ({"rules": [{"type": "L1", "strength": 0.1, "on": "weight"}]}, r"^rules\[0\]\.on: unknown selector preset 'weight'"),
        ({"rules": [{"type": "L1", "strength": 0.1, "on": {"modules": ["Linear", "Lineer"]}}]}, r"^rules\[0\]\.on\.modules\[1\]: unknown module type"),
        ({"rules": [{"type": "L1", "strength": 0.1, "on": {"regex": "("}}]}, r"^rules\[0\]\.on\.regex: invalid regex"),
        ({"rules": [{"type": "L1", "strength": 0.1, "on": {"within": "decoder"}}]}, r"^rules\[0\]\.on\.within: .*no submodule 'decoder'"),
        ({"rules": [{"type": "L1", "strength": 0.1, "on": {"names": "x"}}]}, r"^rules\[0\]\.on\.names: unknown selector key"),
        ({"rules": [{"type": "L1", "strength": 0.1, "on": {"name": "decoder.*"}}]}, r"^rules\[0\]\.on: .*selects no parameter"),
        ({"rules": [{"type": "L1", "strength": 0.1, "exclude": "bias"}]}, r"^rules\[0\]\.exclude: unknown selector preset"),
        ({"rules": [{"type": "MaxNorm", "max_value": 1.0, "strength": 1.0}]}, r"^rules\[0\]\.strength: unknown key for MaxNorm"),
        ({"rules": [{"type": "L1", "strength": 0.1}], "allow_empty": "yes"}, r"^allow_empty"),
        ({"rules": [{"type": "L1", "strength": 0.1}], "impl": "fast"}, r"^impl"),
        ({"rules": [{"type": "FnPenalty", "fn": "os.system"}]}, r"^rules\[0\]\.type: unknown rule type"),
    ],
)
def test_errors_name_the_key_path(cfg, path):
    with pytest.raises(ValueError, match=path):
        tr.Regularizer.from_config(net(), cfg)


def test_config_never_imports_code():
    before = set(sys.modules)
    cfg = {"rules": [{"type": "L1", "strength": 0.1, "on": {"modules": "xml.dom.minidom.Document"}}]}
    with pytest.raises(ValueError, match=r"rules\[0\]\.on\.modules: unknown module type"):
        tr.Regularizer.from_config(net(), cfg)
    assert "xml.dom.minidom" not in set(sys.modules) - before


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        tr.Regularizer.from_config(net(), tmp_path / "missing.yaml")
    bad = tmp_path / "reg.toml"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        tr.Regularizer.from_config(net(), bad)
    broken = tmp_path / "reg.json"
    broken.write_text("{rules: ")
    with pytest.raises(ValueError, match="invalid JSON"):
        tr.Regularizer.from_config(net(), broken)


# --------------------------------------------------------------------------- property: round trip

presets = st.sampled_from(["weights", "biases", "norms", "all", "embeddings"])
name_sel = st.sampled_from(["head.*", "encoder.*", "*.weight", "conv.*"]).map(lambda p: {"name": p})
mod_sel = st.sampled_from(["Linear", "LayerNorm", "TinyRMSNorm", "Conv1d"]).map(lambda t: {"modules": t})
selector = st.one_of(presets, name_sel, mod_sel, st.lists(st.one_of(presets, name_sel), min_size=2, max_size=3))
strength = st.one_of(
    st.floats(0, 1),
    st.builds(lambda v, t: {"type": "cosine", "value": v, "total_steps": t}, st.floats(0, 1), st.integers(1, 100)),
    st.builds(lambda v, ms: {"type": "multistep", "value": v, "milestones": ms}, st.floats(0, 1),
              st.lists(st.integers(1, 50), min_size=1, max_size=3, unique=True).map(sorted)),
)
rule = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["L1", "L2"]),
        "strength": strength,
        "mode": st.sampled_from(["grad", "decoupled", "loss"]),
        "on": selector,
    }
)


@settings(deadline=None, max_examples=30)
@given(rules=st.lists(rule, min_size=1, max_size=4))
def test_round_trip_property(rules):
    m = net()
    reg = tr.Regularizer.from_config(m, {"rules": rules, "allow_empty": True})
    cfg = reg.to_config()
    back = tr.Regularizer.from_config(m, cfg)
    assert back.to_config() == cfg
    for name in reg.rules:
        assert selected(back, name) == selected(reg, name)
        assert back.rules[name].strength == reg.rules[name].strength
