"""The command line, run as a user runs it: ``python -m torch_regularizers ...`` in a subprocess.

* ``demo --quick`` exits 0, prints the table with every method, writes a valid PNG;
* ``inspect MODULE:FACTORY [--config]`` prints what each parameter gets; the expected names
  come from the model itself (``named_parameters``), not from the summary code;
* bad input exits 2 with one line on stderr, never a traceback; a typo'd config key gets the
  closest valid key, a YAML syntax error its line and column;
* notes go to stderr, tables to stdout; a stdout closed early (``| head``) ends quietly;
* progress bars only on a terminal unless asked;
* (``TR_FRESH_VENV=1``, a step of ``.ci/run`` of its own) a fresh virtual environment runs the
  README's two commands as written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import torch_regularizers as tr
from torch_regularizers import cli, demo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
METHOD_NAMES = [m.name for m in demo.METHODS]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "torch_regularizers", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    line = lines[0]
    assert line.startswith("torch-regularizers: error: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


# --------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    p = run_cli("demo", "--quick", "--seed", "0", "--out", str(out))
    return p, out, time.perf_counter() - t0


def test_demo_quick_exits_0_and_prints_every_method(quick_demo):
    p = quick_demo[0]
    assert p.returncode == 0, p.stderr
    table = p.stdout[p.stdout.index("method "):].split("\n\n")[0]  # the main table only
    header = table.splitlines()[0].split()
    for col in ("test", "acc", "zero", "weights", "units", "time", "overhead"):
        assert col in header
    for name in METHOD_NAMES:
        if name == "group lasso prox" and not hasattr(tr, "GroupLasso"):
            assert "skipped group lasso prox" in p.stdout
            continue
        row = [ln for ln in table.splitlines() if ln.startswith(name + " ")]
        assert len(row) == 1, (name, table)
        assert re.search(r"\d+\.\d%\s+\d+\.\d%\s+\d+/512\s+\d+\.\d+s", row[0]), row[0]
    # stderr is a pipe here, not a terminal: no progress bars (see test_demo_progress_bars_*)
    assert "\r" not in p.stderr and "100%" not in p.stderr, p.stderr[-500:]


def _bars(text: str) -> bool:
    """tqdm's bars: a percentage, a step count and its carriage-return redraws."""
    return "100%" in text and "step" in text


def test_demo_progress_bars_when_asked_with_stderr_not_a_terminal(tmp_path):
    p = run_cli("demo", "--epochs", "1", "--progress", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert _bars(p.stderr), p.stderr[-500:]
    assert not _bars(p.stdout)  # never on stdout, the table's stream


def _run_with_stderr_on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe); returns rc, stdout, stderr."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, cols
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch_regularizers", *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=slave, text=True,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                return
            if not b:
                return
            chunks.append(b)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    out = proc.stdout.read()
    rc = proc.wait(timeout=300)
    t.join(timeout=30)
    os.close(master)
    return rc, out, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminal test: Linux")
def test_demo_progress_bars_by_default_only_on_a_terminal(tmp_path):
    rc, out, err = _run_with_stderr_on_a_terminal("demo", "--epochs", "1", "--out", str(tmp_path))
    assert rc == 0, err[-2000:]
    assert _bars(err), err[-500:]
    assert "method " in out and not _bars(out)
    rc, out, err = _run_with_stderr_on_a_terminal(
        "demo", "--epochs", "1", "--no-progress", "--out", str(tmp_path)
    )
    assert rc == 0, err[-2000:]
    assert not _bars(err), err[-500:]


def test_demo_progress_default_follows_stderr():
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert demo._show_progress(None, Tty()) is True
    assert demo._show_progress(None, io.StringIO()) is False
    assert demo._show_progress(True, io.StringIO()) is True
    assert demo._show_progress(False, Tty()) is False


def test_demo_quick_writes_a_valid_png(quick_demo):
    from PIL import Image

    p, out, _ = quick_demo
    png = out / "demo.png"
    assert f"figure: {png.resolve()}" in p.stdout
    assert png.stat().st_size > 20_000
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= 800 and h >= 400
        # not a blank canvas: many distinct colours
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50


def test_demo_results_json_matches_table(quick_demo):
    p, out, _ = quick_demo
    s = json.loads((out / "results.json").read_text())
    assert s["seed"] == 0 and s["epochs"] == demo.QUICK_EPOCHS
    for r in s["results"]:
        row = next(ln for ln in p.stdout.splitlines() if ln.startswith(r["method"] + " "))
        assert f"{100 * r['test_accuracy']:.1f}%" in row
        assert f"{100 * r['zero_fraction']:.1f}%" in row
    none = next(r for r in s["results"] if r["method"] == "none")
    assert none["zero_fraction"] == 0.0 and none["zero_units"] == 0


def _count_zeros_numpy(model) -> tuple[float, int]:
    """Independent count: numpy over the state dict, not demo.zero_fraction/zero_units."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    mats = [v for k, v in sd.items() if v.ndim == 2]
    frac = sum(int((m == 0).sum()) for m in mats) / sum(m.size for m in mats)
    units = sum(int((sd[k] == 0).all(axis=1).sum()) for k in ("fc1.weight", "fc2.weight"))
    return frac, units


def test_demo_run_is_deterministic_and_counts_zeros_right(tmp_path):
    methods = [m for m in demo.METHODS if m.name in ("none", "l1 prox", "group lasso prox")]
    kw = dict(epochs=4, seed=3, out=tmp_path, plot=False, progress=False, methods=methods)
    a = demo.run(**kw)
    b = demo.run(**kw)
    for ra, rb in zip(a["results"], b["results"]):
        ma, mb = a["models"][ra["method"]], b["models"][rb["method"]]
        for (n, pa), (_, pb) in zip(ma.named_parameters(), mb.named_parameters()):
            assert torch.equal(pa, pb), (ra["method"], n)
        frac, units = _count_zeros_numpy(ma)
        assert ra["zero_fraction"] == pytest.approx(frac, abs=0)
        assert ra["zero_units"] == units
    l1 = next(r for r in a["results"] if r["method"] == "l1 prox")
    assert l1["zero_fraction"] > 0  # prox gives exact zeros even after 4 epochs
    # another seed gives another run
    c = demo.run(**{**kw, "seed": 4, "methods": methods[:1]})
    assert not torch.equal(c["models"]["none"].fc1.weight, a["models"]["none"].fc1.weight)


def test_demo_bad_device_exits_2(tmp_path):
    assert_one_line_error(run_cli("demo", "--quick", "--device", "nonsense", "--out", str(tmp_path)), "--device")


# --------------------------------------------------------------------------- inspect


def _rows(summary: str) -> dict[str, str]:
    """parameter name -> its summary row."""
    rows = {}
    for ln in summary.splitlines():
        parts = ln.split()
        if parts:
            rows.setdefault(parts[0], ln)
    return rows


def _unselected(summary: str) -> list[str]:
    ln = next(ln for ln in summary.splitlines() if ln.startswith("not regularized"))
    return [s.strip() for s in ln.split(":", 1)[1].split(",")]


def _load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_ex_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("example", ["structured_pruning", "train_loop"])
def test_inspect_example_factory_default_config(example):
    p = run_cli("inspect", f"examples/{example}.py:make_model")
    assert p.returncode == 0, p.stderr
    model = _load_example(example).make_model()
    # reference: the default rule is L2 on weights = matrices (these models have no
    # embeddings/norm weights of ndim ≥ 2); everything else is listed as not regularized
    expected_on = [n for n, q in model.named_parameters() if q.dim() >= 2]
    expected_off = [n for n, q in model.named_parameters() if q.dim() < 2]
    rows = _rows(p.stdout)
    for n in expected_on:
        assert n in rows and "l2:grad" in rows[n] and "λ=0.0001" in rows[n], p.stdout
    assert sorted(_unselected(p.stdout)) == sorted(expected_off)


def test_inspect_dotted_module_path_and_module_instance(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            class Block(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.proj = nn.Linear(4, 8)
                    self.norm = nn.LayerNorm(8)
                    self.emb = nn.Embedding(10, 4)

            def build():
                return Block()

            INSTANCE = nn.Linear(3, 2)
            """
        )
    )
    p = run_cli("inspect", "mymodels:build", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = _rows(p.stdout)
    assert "l2:grad" in rows["proj.weight"]
    assert sorted(_unselected(p.stdout)) == sorted(["proj.bias", "norm.weight", "norm.bias", "emb.weight"])
    p = run_cli("inspect", "mymodels:INSTANCE", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "l2:grad" in _rows(p.stdout)["weight"]


needs_from_config = pytest.mark.skipif(
    not hasattr(tr.Regularizer, "from_config"), reason="tr.Regularizer.from_config not available"
)


@needs_from_config
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_inspect_with_config(tmp_path, fmt):
    cfg = {
        "rules": [
            {"type": "L2", "strength": 1e-4, "mode": "decoupled"},
            {"type": "L1", "strength": 1e-3, "mode": "prox", "on": {"name": "fc1.weight"}},
        ]
    }
    path = tmp_path / f"reg.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(cfg))
    else:
        path.write_text(
            "rules:\n"
            "  - type: L2\n    strength: 1.0e-4\n    mode: decoupled\n"
            "  - type: L1\n    strength: 1.0e-3\n    mode: prox\n    on: {name: fc1.weight}\n"
        )
    p = run_cli("inspect", "examples/structured_pruning.py:make_model", "--config", str(path))
    assert p.returncode == 0, p.stderr
    rows = _rows(p.stdout)
    assert "l2:decoupled" in rows["fc1.weight"] and "l1:prox" in rows["fc1.weight"]
    assert "l2:decoupled" in rows["fc2.weight"] and "l1:prox" not in rows["fc2.weight"]
    assert "l2:decoupled" in rows["out.weight"]
    assert sorted(_unselected(p.stdout)) == ["fc1.bias", "fc2.bias", "out.bias"]


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_models(tmp_path):
    (tmp_path / "badmods.py").write_text(
        textwrap.dedent(
            """
            def raises():
                raise RuntimeError("boom\\nsecond line")

            def not_a_model():
                return 42

            def needs_args(width):
                return None

            CONSTANT = 3
            """
        )
    )
    (tmp_path / "broken.py").write_text("def f(:\n    pass\n")
    (tmp_path / "imports_missing.py").write_text("import surely_not_a_module_xyz\n")
    return tmp_path


@pytest.mark.parametrize(
    "target, needles",
    [
        ("surely_not_a_module_xyz:make", ["no module named 'surely_not_a_module_xyz'"]),
        ("badmods:nope", ["no attribute 'nope'"]),
        ("badmods.py:nope", ["no attribute 'nope'"]),
        ("missing_file.py:make", ["no such file"]),
        ("badmods", ["expected MODULE:FACTORY"]),
        ("badmods:", ["expected MODULE:FACTORY"]),
        ("badmods:raises", ["RuntimeError: boom second line"]),
        ("badmods:not_a_model", ["returned int"]),
        ("badmods:needs_args", ["TypeError"]),
        ("badmods:CONSTANT", ["not a callable"]),
        ("broken.py:f", ["SyntaxError"]),
        ("broken:f", ["SyntaxError"]),
        ("imports_missing:f", ["surely_not_a_module_xyz"]),
    ],
)
def test_inspect_bad_target_exits_2_with_one_line(bad_models, target, needles):
    assert_one_line_error(run_cli("inspect", target, cwd=bad_models), *needles)


def _bad_configs():
    cases = [
        ("missing.yaml", None, ["config file not found"]),
        ("bad.yaml", "rules: [\n  - {type: L2\n", ["invalid YAML"]),
        ("bad.json", "{rules: ", ["invalid JSON"]),
        ("empty.yaml", "", ["empty"]),
    ]
    if hasattr(tr.Regularizer, "from_config"):
        cases += [
            ("typo.yaml", "rules:\n  - type: L2\n    strenght: 1.0e-4\n", ["strenght"]),
            ("unknown.json", json.dumps({"rules": [{"type": "NoSuchPenalty"}]}), ["NoSuchPenalty"]),
            ("nomatch.json", json.dumps({"rules": [{"type": "L1", "strength": 1e-3, "on": {"name": "zzz*"}}]}), ["zzz"]),
        ]
    return cases


@pytest.mark.parametrize("fname, text, needles", _bad_configs(), ids=lambda v: v if isinstance(v, str) else None)
def test_inspect_bad_config_exits_2_with_one_line(tmp_path, fname, text, needles):
    if text is not None:
        (tmp_path / fname).write_text(text)
    p = run_cli("inspect", "examples/train_loop.py:make_model", "--config", str(tmp_path / fname))
    assert_one_line_error(p, *needles)


def test_inspect_typo_in_a_config_key_suggests_the_closest_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("rules:\n  - type: L2\n    strenght: 1.0e-4\n")
    line = assert_one_line_error(
        run_cli("inspect", "examples/train_loop.py:make_model", "--config", str(path)),
        "rules[0].strenght", "did you mean 'strength'?",
    )
    assert line.index("did you mean") < line.index("expected one of")  # before the long list
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"rules": [{"type": "GroupLaso", "strength": 1e-3}]}))
    assert_one_line_error(
        run_cli("inspect", "examples/train_loop.py:make_model", "--config", str(path)),
        "rules[0].type", "'GroupLaso'", "did you mean 'GroupLasso'?",
    )


@pytest.mark.parametrize(
    "text, where, problem",
    [
        ("rules: [\n  - {type: L2\n", "at line 2, column 3", "expected the node content"),
        ("rules:\n  - type: L2\n    strength: 1.0e-4\n   mode: prox\n", "at line 4, column 4",
         "expected <block end>"),
    ],
)
def test_inspect_yaml_syntax_error_keeps_line_and_column_on_one_readable_line(tmp_path, text, where, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    p = run_cli("inspect", "examples/train_loop.py:make_model", "--config", str(path))
    line = assert_one_line_error(p, "invalid YAML", where, problem)
    # PyYAML's own layout (a caret under the source line, "<unicode string>") does not survive
    # being put on one line: the message names the file and quotes the line instead
    assert "<unicode string>" not in line and "^" not in line, line
    assert line.count(str(path)) == 1, line
    assert re.search(r"line \d+ reads '", line), line


def test_inspect_json_syntax_error_has_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"rules": [\n  {"type": "L2",}\n]}')
    line = assert_one_line_error(
        run_cli("inspect", "examples/train_loop.py:make_model", "--config", str(path)),
        "invalid JSON at line 2, column 17",
    )
    assert line.count(str(path)) == 1, line


def test_inspect_notes_go_to_stderr_and_the_table_to_stdout():
    p = run_cli("inspect", "examples/train_loop.py:make_model")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("Regularizer on "), p.stdout[:200]
    assert "(no --config" not in p.stdout
    assert "(no --config: showing the default tr.L2(1e-4)" in p.stderr


@needs_from_config
def test_inspect_shows_a_scheduled_strength_as_its_schedule(tmp_path):
    path = tmp_path / "warmup.json"
    path.write_text(json.dumps({"rules": [
        {"type": "L1", "mode": "prox",
         "strength": {"type": "linear_warmup", "value": 1e-3, "warmup_steps": 10}},
    ]}))
    p = run_cli("inspect", "examples/train_loop.py:make_model", "--config", str(path))
    assert p.returncode == 0, p.stderr
    rows = [r for n, r in _rows(p.stdout).items() if n.endswith(".weight")]
    assert rows
    for row in rows:
        assert "l1:prox λ=linear_warmup(0→0.001, 10 steps)" in row, row
        assert not re.search(r"λ=0(?![.\d→])", row), row  # not a bare λ=0, which reads as "off"


def _wide_model_file(tmp_path) -> Path:
    # 3000 layers: a summary of some 300 KB, more than a pipe holds, so the writer is still
    # writing when the reader goes away
    (tmp_path / "wide.py").write_text(
        "import torch.nn as nn\n\n\ndef make():\n    return nn.ModuleList(nn.Linear(2, 2) for _ in range(3000))\n"
    )
    return tmp_path


def test_inspect_into_a_pipe_closed_early_exits_quietly(tmp_path):
    """``inspect ... | head -3``: no BrokenPipeError traceback, exit 0, nothing on stderr but
    the note."""
    cwd = _wide_model_file(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch_regularizers", "inspect", "wide.py:make"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    head = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()  # what `head -3` does after its three lines
    err = proc.stderr.read()
    rc = proc.wait(timeout=300)
    assert head[0].startswith("Regularizer on ModuleList"), head
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert rc == 0, (rc, err)
    assert err.strip().splitlines() == ["(no --config: showing the default tr.L2(1e-4) on tr.select.weights)"]


@pytest.mark.skipif(shutil.which("head") is None or shutil.which("bash") is None, reason="needs bash and head")
def test_inspect_piped_to_head_in_a_shell(tmp_path):
    cwd = _wide_model_file(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m torch_regularizers inspect wide.py:make | head -3"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, (p.returncode, p.stderr)
    assert len(p.stdout.splitlines()) == 3
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_usage_and_help():
    p = run_cli("--help")
    assert p.returncode == 0
    for sub in ("demo", "bench", "inspect"):
        assert sub in p.stdout
    p = run_cli()
    assert p.returncode == 2  # argparse: a subcommand is required
    p = run_cli("--version")
    assert p.returncode == 0 and tr.__version__ in p.stdout


# --------------------------------------------------------------------------- bench delegation (in process)


def test_bench_delegates_argv(monkeypatch):
    import types

    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 7

    fake = types.ModuleType("torch_regularizers.bench")
    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "torch_regularizers.bench", fake)
    monkeypatch.setattr(tr, "bench", fake, raising=False)
    assert cli.main(["bench", "--quick", "--help"]) == 7
    assert seen["argv"] == ["--quick", "--help"]


def test_bench_missing_exits_2_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch_regularizers.bench", None)  # import raises ImportError
    monkeypatch.delattr(tr, "bench", raising=False)
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "benchmark is not available" in err[0]


# --------------------------------------------------------------------------- fresh venv (own CI step)


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    cmds = re.findall(r"```bash\n(pip install torch==2\.13\.0 .+?)\n```", text)
    assert len(cmds) >= 2, "the README must open with the two set-up commands"
    return cmds[:2]


def test_readme_opens_with_the_two_commands():
    demo_cmd, test_cmd = _readme_commands()
    assert demo_cmd == 'pip install torch==2.13.0 -e ".[demo]" && python -m torch_regularizers demo'
    assert test_cmd == 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q'


FRESH_VENV = "TR_FRESH_VENV"


def test_ci_runs_the_readme_test_command_then_the_fresh_venv_check_on_its_own():
    steps = [
        ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    test_cmd = _readme_commands()[1]
    assert test_cmd in steps  # verbatim, as a line of its own
    fresh = [i for i, ln in enumerate(steps) if f"{FRESH_VENV}=1" in ln and "fresh_venv" in ln]
    assert fresh and fresh[0] > steps.index(test_cmd), steps  # after the suite, a step of its own


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get(FRESH_VENV) != "1",
    reason=f"reinstalls everything and reruns the suite: .ci/run runs it as a step of its own "
    f"after the suite ({FRESH_VENV}=1 python -m pytest -q tests/test_cli.py -k fresh_venv)",
)
def test_readme_commands_in_a_fresh_venv(tmp_path):
    """A plain venv (no system site-packages), a copy of the repo, the README's commands verbatim.

    The test command runs the whole suite inside the venv, where this test skips itself
    (``TR_FRESH_VENV`` is not passed on). Packages come from the local wheel folder / index
    the machine's pip is configured with.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    repo = tmp_path / "repo"
    shutil.copytree(
        ROOT,
        repo,
        ignore=shutil.ignore_patterns(
            ".git", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
            "demo_out", ".venv", "build", "dist",
        ),
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", FRESH_VENV)
    }
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        MPLBACKEND="Agg",
    )
    times = {}
    for cmd in _readme_commands():
        t0 = time.perf_counter()
        p = subprocess.run(
            ["bash", "-c", cmd], cwd=repo, env=env, capture_output=True, text=True, timeout=1800
        )
        times[cmd] = time.perf_counter() - t0
        assert p.returncode == 0, f"{cmd}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}"
        if cmd.endswith("demo"):
            assert "figure:" in p.stdout and (repo / "demo_out" / "demo.png").is_file()
        else:
            assert re.search(r"\d+ passed", p.stdout), p.stdout[-2000:]
    # the venv really is fresh: its torch is its own, not the system's
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch; print(torch.__file__)"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert str(venv) in where
    print({c.split("&&")[1].strip(): f"{t:.0f}s" for c, t in times.items()})


def test_readme_quick_start_runs_as_written(capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.+?)\n```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README quick start", "exec"), ns)
    model, reg, opt = ns["model"], ns["reg"], ns["opt"]
    out = capsys.readouterr().out
    assert "0.weight" in out and "not regularized" in out and "0.bias" in out
    # the loop really is unchanged: one step, then the first layer has exact zeros
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    with torch.no_grad():
        model[0].weight.mul_(1e-3)  # small weights: the prox threshold lr·λ = 1e-5 zeroes some
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert reg.stats()["l1/sparsity"] > 0
    assert (model[0].weight == 0).float().mean().item() == pytest.approx(reg.stats()["l1/sparsity"])
