"""summary() with scheduled strengths: the schedule is shown, not a value that reads as "off".

A linear warm-up is 0 at step 0, so before training ``λ=0`` would say "this rule does
nothing". The text shows the schedule itself; the dict keeps ``strength`` as the float in
effect now and adds ``strength_text``, the text the table prints.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import torch_regularizers as tr
from torch_regularizers import schedules as S


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def _entries(reg, param="0.weight"):
    d = reg.summary(as_dict=True)
    return {r["rule"]: r for r in next(p for p in d["params"] if p["name"] == param)["rules"]}


def _row(reg, param="0.weight"):
    return next(ln for ln in reg.summary().splitlines() if ln.startswith(param + " "))


def _advance(reg, steps):
    for _ in range(steps):  # manual use: counts steps as an attached optimizer's would
        reg.advance()


def test_linear_warmup_before_training_shows_the_schedule_not_zero():
    model = _model()
    reg = tr.Regularizer(model, [tr.L1(S.LinearWarmup(1e-3, 10), mode="prox")])
    row = _row(reg)
    assert "l1:prox λ=linear_warmup(0→0.001, 10 steps)" in row, row
    assert not re.search(r"λ=0(?![.\d→])", row), row  # no bare "λ=0"
    e = _entries(reg)["l1"]
    assert e["strength"] == 0.0 and isinstance(e["strength"], float)  # the value in effect now
    assert e["strength_text"] == "linear_warmup(0→0.001, 10 steps)"


def test_scheduled_strength_after_some_steps_shows_schedule_and_current_value():
    model = _model()
    reg = tr.Regularizer(model, [tr.L2(S.LinearWarmup(1e-3, 10))])
    _advance(reg, 5)
    assert reg.step == 5
    e = _entries(reg)["l2"]
    assert e["strength"] == pytest.approx(5e-4)
    assert e["strength_text"] == "linear_warmup(0→0.001, 10 steps) = 0.0005 at step 5"
    assert "l2:grad λ=linear_warmup(0→0.001, 10 steps) = 0.0005 at step 5" in _row(reg)


@pytest.mark.parametrize(
    "strength, text",
    [
        (S.Cosine(1e-2, 1000, final=1e-4), "cosine(0.01→0.0001, 1000 steps)"),
        (S.Step(1e-2, 100, gamma=0.5), "step(0.01, ×0.5 every 100 steps)"),
        (S.MultiStep(1e-2, [30, 60]), "multistep(0.01, ×0.1 at steps 30, 60)"),
        (S.MultiStep(1e-2, [1, 2, 3, 4, 5, 6]), "multistep(0.01, ×0.1 at steps 1, 2, 3, 4, …)"),
        (S.LinearWarmup(1e-3, 10, start=1e-5), "linear_warmup(1e-05→0.001, 10 steps)"),
        (S.LinearWarmup(S.Cosine(1e-3, 10_000), 500), "linear_warmup(0→cosine(0.001→0, 10000 steps), 500 steps)"),
        (S.Constant(3e-4), "0.0003"),
        (2.5e-4, "0.00025"),
    ],
)
def test_each_schedule_is_described(strength, text):
    reg = tr.Regularizer(_model(), [tr.L2(strength, mode="decoupled")])
    e = _entries(reg)["l2"]
    assert e["strength_text"] == text
    assert f"l2:decoupled λ={text}" in _row(reg)
    assert isinstance(e["strength"], float)


def test_plain_callable_shows_its_name_and_value():
    def ramp(step):
        return 1e-4 * step

    reg = tr.Regularizer(_model(), [tr.L2(ramp)])
    e = _entries(reg)["l2"]
    assert e["strength"] == 0.0
    # opaque code: its name, and the value it gives now, said as such
    assert e["strength_text"] == "ramp(step) = 0 at step 0"


def test_constant_strengths_and_caps_read_as_before():
    reg = tr.Regularizer(_model(), [tr.L2(1e-4), tr.MaxNorm(3.0)])
    row = _row(reg)
    assert "l2:grad λ=0.0001" in row and "maxnorm:constraint cap=3" in row, row
    e = _entries(reg)
    assert e["l2"]["strength"] == 1e-4 and e["l2"]["strength_text"] == "0.0001"
    assert e["maxnorm"]["strength"] == 3.0
