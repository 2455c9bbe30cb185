"""Wall time of the CI-sized runs: ``demo --quick``, every ``examples/*.py --quick``, and the
2-process ``torchrun`` DDP example, against the budgets the test suite used to assert.

The tests check what these runs compute, not how long they take (a wall-time assert fails
on a loaded machine without saying anything about the code). The time is measured here::

    python benchmarks/quick_runs.py               # a table; always exits 0
    python benchmarks/quick_runs.py --strict      # exit 1 if a run fails or is over budget
    python benchmarks/quick_runs.py --only demo ddp_torchrun_2proc --json

Each run is a fresh subprocess with ``OMP_NUM_THREADS=1`` and ``PYTHONPATH=src``, as in
``tests/test_examples.py`` and ``tests/test_cli.py``; the time includes interpreter start
and imports. Budgets: ``demo --quick`` 90 s (imports, 6 short trainings, the figure, on a
loaded 2-core box) and the 2-process DDP run 120 s, the limits the tests asserted before;
60 s for each single-process example.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def runs(out_dir: str) -> dict[str, tuple[list[str], float]]:
    """name -> (argv after the interpreter, budget in seconds)."""
    out: dict[str, tuple[list[str], float]] = {
        "demo": (
            ["-m", "torch_regularizers", "demo", "--quick", "--seed", "0", "--out", out_dir],
            90.0,
        ),
    }
    for p in sorted(EXAMPLES.glob("*.py")):
        out[p.stem] = ([str(p), "--quick"], 60.0)
    out["ddp_torchrun_2proc"] = (
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(EXAMPLES / "ddp_torchrun.py"),
            "--quick",
        ],
        120.0,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these (default: all)")
    ap.add_argument("--strict", action="store_true", help="exit 1 on a failure or an overrun")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), MPLBACKEND="Agg")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        todo = runs(tmp)
        unknown = set(args.only or ()) - set(todo)
        if unknown:
            ap.error(f"unknown run(s) {sorted(unknown)}; known: {sorted(todo)}")
        for name, (cmd, budget) in todo.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            p = subprocess.run(
                [sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True
            )
            dt = time.perf_counter() - t0
            last = (p.stdout.strip().splitlines() or [""])[-1]
            passed = p.returncode == 0 and (name == "demo" or last == "ok")
            results.append(
                {
                    "run": name,
                    "seconds": round(dt, 2),
                    "budget": budget,
                    "passed": passed,
                    "within_budget": dt < budget,
                }
            )
    machine = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
    else:
        print(f"{'run':<22} {'seconds':>8} {'budget':>7}  result")
        for r in results:
            verdict = ("ok" if r["passed"] else "FAILED") + (
                "" if r["within_budget"] else "  OVER BUDGET"
            )
            print(f"{r['run']:<22} {r['seconds']:>8.1f} {r['budget']:>7.0f}  {verdict}")
        print(
            f"(python {machine['python']}, {machine['cpus']} CPUs, 1-min load {machine['load_1min']})"
        )
    bad = [r for r in results if not (r["passed"] and r["within_budget"])]
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
