"""Issue 11, item 13 (config part): nesting depth is bounded.

A config nested 5000 deep (or one that contains itself through a YAML alias) raises
``ValueError`` naming the key path where the bound (64 containers) is crossed — never a
``RecursionError`` — and ``python -m torch_regularizers inspect`` exits 2 with one line.
The expected key paths are written out here from the nesting the test builds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from torch import nn

import torch_regularizers as tr

ROOT = Path(__file__).resolve().parents[1]
DEEP = 5000
# root mapping (1) > rules list (2) > rules[0] (3) > on (4) > 61 x not (5..65): the 65th
# container, the first one over the bound of 64, sits at this key path
NOT_PATH = "rules[0].on(.not x 61)"


def _model():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))


def _not_chain_dict(n):
    on = "weights"
    for _ in range(n):
        on = {"not": on}
    return {"rules": [{"type": "L2", "strength": 1e-4, "on": on}]}


def _not_chain_json(n):  # text, not json.dumps (which itself recurses per level)
    return '{"rules": [{"type": "L2", "strength": 1e-4, "on": ' + '{"not": ' * n + '"weights"' + "}" * n + "}]}"


def _not_chain_yaml(n, block):
    if not block:
        return "rules:\n  - type: L2\n    strength: 1.0e-4\n    on: " + "{not: " * n + "weights" + "}" * n + "\n"
    lines, ind = ["rules:", "  - type: L2", "    strength: 1.0e-4", "    on:"], "      "
    for _ in range(n - 1):
        lines.append(ind + "not:")
        ind += "  "
    lines.append(ind + "not: weights")
    return "\n".join(lines) + "\n"


def test_deep_dict_config_raises_value_error_naming_the_key_path():
    with pytest.raises(ValueError) as e:
        tr.Regularizer.from_config(_model(), _not_chain_dict(DEEP))
    assert NOT_PATH in str(e.value) and "64" in str(e.value)


def test_depth_bound_is_exact_and_a_deep_legal_config_still_builds():
    # 61 nots: the innermost is the 64th container -> allowed; 61 x ~ of weights = the biases
    reg = tr.Regularizer.from_config(_model(), _not_chain_dict(61))
    names = [p["name"] for p in reg.summary(as_dict=True)["params"] if p["rules"]]
    assert names == ["0.bias", "2.bias"]
    with pytest.raises(ValueError, match=r"rules\[0\]\.on\(\.not x 61\): .*64"):
        tr.Regularizer.from_config(_model(), _not_chain_dict(62))


@pytest.mark.parametrize(
    "fname, text",
    [
        ("deep.json", _not_chain_json(DEEP)),
        ("deep.yaml", _not_chain_yaml(DEEP, block=False)),
        ("deep_block.yaml", _not_chain_yaml(3000, block=True)),
        # a YAML alias to its own anchor: shallow text, endless nesting once loaded
        ("cycle.yaml", "rules:\n  - type: L2\n    strength: 1.0e-4\n    on: &s {not: *s}\n"),
    ],
)
def test_deep_config_file_raises_value_error_naming_the_key_path(tmp_path, fname, text):
    if fname.endswith(".yaml"):
        pytest.importorskip("yaml")
    path = tmp_path / fname
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        tr.Regularizer.from_config(_model(), str(path))
    assert NOT_PATH in str(e.value) and fname in str(e.value)


def test_deep_json_without_keys_is_a_value_error(tmp_path):
    path = tmp_path / "brackets.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"\(\[0\] x 64\).*nested more than 64"):
        tr.Regularizer.from_config(_model(), str(path))


FACTORY = """\
from torch import nn
def make():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
"""


@pytest.mark.parametrize("fname", ["deep.json", "deep.yaml", "brackets.json"])
def test_cli_inspect_deep_config_exits_2_with_one_line(tmp_path, fname):
    if fname.endswith(".yaml"):
        pytest.importorskip("yaml")
    (tmp_path / "factory.py").write_text(FACTORY)
    if fname == "brackets.json":
        text, needle = "[" * 100_000 + "]" * 100_000, "nested more than 64"
    elif fname.endswith(".json"):
        text, needle = _not_chain_json(DEEP), NOT_PATH
    else:
        text, needle = _not_chain_yaml(DEEP, block=False), NOT_PATH
    (tmp_path / fname).write_text(text)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run(
        [sys.executable, "-m", "torch_regularizers", "inspect", "factory.py:make", "--config", fname],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert lines[0].startswith("torch-regularizers: error: ") and needle in lines[0], lines[0]


def test_shared_subtrees_are_not_walked_exponentially():
    # 60 levels, each holding the next level twice: 2^60 paths, 60 distinct containers
    node = "weights"
    for _ in range(58):
        node = [node, node]
    cfg = {"rules": [{"type": "L2", "strength": 1e-4, "on": node}]}
    from torch_regularizers.config import check_depth

    # in a daemon thread, so a walk that never finishes fails the test instead of hanging it
    t = threading.Thread(target=check_depth, args=(cfg,), daemon=True)
    t.start()
    t.join(timeout=30)  # returns in milliseconds; a naive walk takes 2^58 visits
    assert not t.is_alive(), "check_depth walks shared subtrees once per path"
