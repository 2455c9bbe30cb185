"""The benchmark's interface (``torch_regularizers.bench.main``): structure of its JSON and
tables, argument handling. No timing is asserted — only that the numbers are there."""

from __future__ import annotations

import json
import math

import pytest
import torch

from torch_regularizers import bench

QUICK = ["--quick", "--reps", "1", "--rounds", "1", "--threads", "1"]


def run_json(capsys, *extra: str) -> dict:
    rc = bench.main([*QUICK, "--json", *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_json_structure_micro(capsys):
    threads = torch.get_num_threads()
    out = run_json(capsys, "--sets", "tiny,transformer", "--no-e2e")
    assert torch.get_num_threads() == threads  # --threads is restored afterwards
    assert set(out) >= {"machine", "command", "settings", "micro", "e2e", "seconds"}
    m = out["machine"]
    assert {"cpu", "cores", "torch", "threads", "kernels_backend", "native_kernels"} <= set(m)
    assert m["torch"] == torch.__version__ and m["threads"] == 1
    assert out["command"].startswith("python -m torch_regularizers bench")
    assert out["e2e"] == []
    rows = out["micro"]
    # every penalty × mode that applies, on each requested set
    cases = {(r["set"], r["penalty"], r["mode"]) for r in rows}
    for s in ("tiny", "transformer"):
        for kind in ("l2", "l1", "elasticnet"):
            for mode in ("grad", "decoupled", "prox"):
                assert (s, kind, mode) in cases
    for r in rows:
        assert r["tensors"] > 0 and r["numel"] > 0 and positive(r["floor_ms"])
        methods = r["methods"]
        assert "library[aten]" in methods and "Regularizer" in methods
        for v in methods.values():
            assert set(v) == {"ms", "min_ms", "ratio", "ratio_min"}
            assert all(positive(x) for x in v.values())
        if r["penalty"] in ("l2", "l1", "elasticnet"):
            assert "hook loop" in methods and "naive foreach" in methods
            assert ("loss+backward" in methods) == (r["mode"] == "grad")
        if r["penalty"] == "l2" and r["mode"] in ("grad", "decoupled"):
            assert "torch weight_decay" in methods


def test_json_structure_e2e(capsys):
    out = run_json(capsys, "--no-micro", "--models", "transformer")
    assert out["micro"] == []
    (row,) = out["e2e"]
    assert row["model"] == "transformer" and row["params"] > 0 and positive(row["step_ms"])
    v = row["variants"]
    assert {"none", "L2 decoupled", "L1 prox", "ElasticNet prox", "loss L2 (hand-written)", "loss L1 (hand-written)"} <= set(v)
    assert v["none"]["overhead_pct"] == 0.0
    for x in v.values():
        assert set(x) == {"ms", "overhead_pct", "overhead_pct_min"}
        assert positive(x["ms"]) and math.isfinite(x["overhead_pct"])


def test_selection_flags(capsys):
    out = run_json(capsys, "--sets", "large", "--penalties", "l1", "--modes", "prox", "--no-e2e", "--no-alternatives")
    (row,) = out["micro"]
    assert (row["set"], row["penalty"], row["mode"]) == ("large", "l1", "prox")
    assert set(row["methods"]) <= {"library[aten]", "library[native]", "Regularizer", "Regularizer[aten]"}


def test_table_output(capsys):
    rc = bench.main([*QUICK, "--sets", "tiny", "--penalties", "l2,l1", "--models", "transformer"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "floor" in text and "library[aten]" in text
    assert "tiny" in text and "l1" in text and "x" in text
    assert "End to end" in text and "overhead" in text and "%" in text


def test_markdown_output(capsys):
    rc = bench.main([*QUICK, "--markdown", "--sets", "tiny", "--penalties", "l1", "--models", "transformer"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| set | penalty | mode | floor ms |" in text
    assert "|---|" in text and "**transformer**" in text and "Command: `" in text


@pytest.mark.parametrize("bad", [["--sets", "huge"], ["--penalties", "l3"], ["--stat", "mean"]])
def test_bad_arguments_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(bad)
    assert e.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_cuda_device_without_cuda_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    assert bench.main([*QUICK, "--device", "cuda", "--no-e2e"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_default_backends():
    assert bench.default_backends("cpu")[0] == "aten"
    assert "triton" not in bench.default_backends("cpu")
    assert "native" not in bench.default_backends("cuda")


def test_gpu_code_path_dry_run_on_cpu(capsys, monkeypatch):
    """What ``bench --device cuda`` runs — every rule with the aten (foreach) and triton
    backends, and the end-to-end variants once per backend — on the CPU through Triton's
    interpreter (tiny sizes: the interpreter runs each program in Python)."""
    pytest.importorskip("triton")
    from torch_regularizers import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    make_set = bench.make_set
    monkeypatch.setattr(bench, "make_set", lambda *a, **k: make_set(*a, **k)[:24])

    def small_transformer(quick, device="cpu"):
        layer = torch.nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).to(device)
        x = torch.randn(2, 4, 16, device=device)
        return model, lambda: torch.nn.functional.mse_loss(model(x), x)

    monkeypatch.setattr(bench, "_transformer", small_transformer)
    old = kernels.get_backend()
    out = run_json(
        capsys,
        "--device", "cpu", "--backends", "aten,triton", "--sets", "tiny",
        "--penalties", "l1,grouplasso,maxnorm", "--modes", "grad,prox", "--models", "transformer",
    )
    assert kernels.get_backend() == old
    assert out["settings"]["backends"] == ["aten", "triton"]
    assert {(r["penalty"], r["mode"]) for r in out["micro"]} == {
        ("l1", "grad"), ("l1", "prox"), ("grouplasso", "prox"), ("maxnorm", "constraint")
    }
    for r in out["micro"]:
        assert {"library[aten]", "library[triton]", "Regularizer"} <= set(r["methods"])
        assert all(positive(v["ratio"]) for v in r["methods"].values())
    (row,) = out["e2e"]
    for name in ("L1 prox", "L2 grad", "GroupLasso prox"):
        assert {f"{name} [aten]", f"{name} [triton]"} <= set(row["variants"])
