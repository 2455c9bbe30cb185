"""Config errors a person can act on: the closest valid key for a typo, YAML/JSON syntax
errors with their line and column on one line."""

from __future__ import annotations

import pytest
from torch import nn

import torch_regularizers as tr


def _model():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def _error(cfg) -> str:
    with pytest.raises(ValueError) as ei:
        tr.Regularizer.from_config(_model(), cfg)
    return str(ei.value)


@pytest.mark.parametrize(
    "cfg, where, suggestion",
    [
        ({"rules": [{"type": "L2", "strenght": 1e-4}]}, "rules[0].strenght", "strength"),
        ({"rules": [{"type": "L2", "strength": 1e-4, "lr_couplng": "none"}]}, "rules[0].lr_couplng", "lr_coupling"),
        ({"rules": [{"type": "GroupLaso", "strength": 1e-3}]}, "rules[0].type", "GroupLasso"),
        ({"rules": [{"type": "elastic_nett", "alpha": 1e-3}]}, "rules[0].type", "ElasticNet"),
        ({"rule": [{"type": "L2"}]}, "rule", "rules"),
        ({"rules": [{"type": "L2", "strength": 1e-4, "on": "weight"}]}, "rules[0].on", "weights"),
        ({"rules": [{"type": "L2", "strength": 1e-4, "on": {"names": "0.*"}}]}, "rules[0].on.names", "name"),
        ({"rules": [{"type": "L2", "strength": 1e-4, "on": {"modules": "Linaer"}}]}, "rules[0].on.modules", "Linear"),
        ({"rules": [{"type": "ActivityL1", "strength": 1e-4, "on": {"module": "ReLU"}}]}, "rules[0].on.module", "modules"),
    ],
)
def test_typo_suggests_the_closest_valid_key(cfg, where, suggestion):
    msg = _error(cfg)
    assert msg.startswith(where + ":"), msg
    assert f"did you mean {suggestion!r}?" in msg, msg


def test_no_suggestion_when_nothing_is_close():
    msg = _error({"rules": [{"type": "L2", "zzzzqqq": 1}]})
    assert "did you mean" not in msg and "expected one of" in msg, msg


def test_yaml_syntax_error_one_line_with_line_and_column(tmp_path):
    path = tmp_path / "reg.yaml"
    path.write_text("rules:\n  - type: L2\n    strength: 1.0e-4\n   mode: prox\n")
    msg = _error(path)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: invalid YAML at line 4, column 4: "), msg
    assert "<unicode string>" not in msg
    assert "(while parsing a block collection at line 2, column 3)" in msg, msg
    assert "line 4 reads 'mode: prox'" in msg, msg


def test_json_syntax_error_one_line_with_line_and_column(tmp_path):
    path = tmp_path / "reg.json"
    path.write_text('{"rules": [\n  {"type": "L2", "strength": 1e-4,}\n]}')
    msg = _error(path)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: invalid JSON at line 2, column 35: "), msg
