"""Every script in examples/ runs (``--quick``) so the docs never rot.

Each example checks its own claim against an independent reference and prints ``ok``
(exit 0) or ``FAILED`` (exit 1), in ``--quick`` mode too: the penalty is applied once per
real optimizer step (bit-identical to a twin regularized by hand with torch's AdamW decay)
and the GradScaler-skipped step leaves the parameters unchanged, the pruned network
removed hidden units and computes the same outputs as the full one, the DDP replicas are
identical, equal a single-process run without DDP and differ from a run without the
rules, ... Wall times are measured by ``benchmarks/quick_runs.py``, not asserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def check(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    assert p.stdout.strip().splitlines()[-1] == "ok", p.stdout[-2000:]


@pytest.mark.parametrize(
    "name",
    ["train_loop", "grad_accum_amp", "finetune_l2sp", "structured_pruning", "ddp_torchrun", "muon_adamw"],
)
def test_example_quick(name):
    check(run_example([str(EXAMPLES / f"{name}.py"), "--quick"]))


def test_every_example_is_tested():
    tested = {"train_loop", "grad_accum_amp", "finetune_l2sp", "structured_pruning", "ddp_torchrun", "muon_adamw"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_ddp_example_with_two_processes():
    """``torchrun --nproc_per_node=2`` on CPU/gloo: replicas identical, equal to 1 process.
    (Its wall time is measured by ``benchmarks/quick_runs.py``, not asserted here.)"""
    p = run_example(
        [
            "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(EXAMPLES / "ddp_torchrun.py"), "--quick",
        ]
    )
    check(p)
    assert "world size 2" in p.stdout and "replicas identical on 2 rank(s): True" in p.stdout
    assert "module." not in p.stdout  # the summary shows bare-model names through DDP
