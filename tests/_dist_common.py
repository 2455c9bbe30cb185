"""Shared by the multi-process tests (``test_distributed*.py``, ``test_deepspeed.py``).

* :func:`launch` starts ``world`` worker processes (gloo, file rendezvous: no port to race
  for), waits for them and returns what each rank saved (``{rank: {scenario: result}}``);
* :func:`reference`: every rule's math written out in plain torch on the *full* tensor
  (float64), from the formulas of DESIGN §1 — the ground truth the sharded results must
  meet. **New rules join here** (a branch in :func:`reference`) and in
  ``_dist_worker.rule_cases`` (the rule list every placement test runs); nothing else is
  needed for them to be checked under FSDP2, 2-D meshes and uneven shards.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import _dist_worker as W  # noqa: E402

import torch_regularizers as tr  # noqa: E402

LR = W.LR


# --------------------------------------------------------------------------- processes
def launch(
    worker: str,
    world: int,
    timeout: float = 180,
    python: str | None = None,
    env_extra: dict | None = None,
) -> dict:
    """Run ``python worker RANK WORLD INIT_FILE OUT_DIR`` for every rank; {rank: results}.

    A rank that saved nothing fails the calling fixture with the end of its log."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        src = os.path.join(os.path.dirname(HERE), "src")
        env["PYTHONPATH"] = os.pathsep.join([src, HERE, env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        env["OMP_NUM_THREADS"] = "1"
        env.update(env_extra or {})
        init = os.path.join(tmp, "rendezvous")
        logs = [open(os.path.join(tmp, f"log{r}"), "w+") for r in range(world)]
        procs = [
            subprocess.Popen(
                [
                    python or sys.executable,
                    os.path.join(HERE, worker),
                    str(r),
                    str(world),
                    init,
                    tmp,
                ],
                env=env,
                stdout=logs[r],
                stderr=subprocess.STDOUT,
            )
            for r in range(world)
        ]
        try:
            for p in procs:
                p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        out = {}
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pt")
            logs[r].seek(0)
            log = logs[r].read()
            logs[r].close()
            assert os.path.exists(path), (
                f"rank {r} of {worker} saved nothing (exit {procs[r].returncode}, timeout "
                f"{timeout}s: a hang?):\n{log[-4000:]}"
            )
            out[r] = torch.load(path, weights_only=False)
        return out


def scenario(runs, name: str, rank: int = 0):
    res = runs[rank][name]
    if isinstance(res, str) and res.startswith("ERROR"):
        pytest.fail(f"rank {rank}, scenario {name}:\n{res}")
    return res


def close(got, exp, rtol=2e-5, atol=2e-6, msg=""):
    torch.testing.assert_close(
        torch.as_tensor(got, dtype=torch.float64),
        torch.as_tensor(exp, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{msg}: {m}",
    )


# --------------------------------------------------------------------------- plain-torch references
def red_dims(w: torch.Tensor, dim) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(1, w.dim())) if w.dim() >= 2 else tuple(range(w.dim()))
    return (dim,) if isinstance(dim, int) else tuple(dim)


def gnorm(w, dim):
    return torch.linalg.vector_norm(w, dim=red_dims(w, dim), keepdim=True)


def gsize(w, dim):
    return math.prod(w.shape[d] for d in red_dims(w, dim))


def unit(w, n):
    """w / n per group, 0 for an all-zero group."""
    return torch.where(n > 0, w / n.clamp_min(1e-300), torch.zeros_like(w))


def soft(w, t):
    return torch.sign(w) * (w.abs() - t).clamp_min(0)


def gl_prox(w, dim, t):
    n = gnorm(w, dim)
    return w * (1 - t / n.clamp_min(1e-300)).clamp_min(0)


def _autograd(fn, w):
    x = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), x)
    return g


def orth_value(x, lam):
    m = x.reshape(x.shape[0], -1)
    out = m.shape[0]
    d = m @ m.T - torch.eye(out, dtype=x.dtype)
    return lam * (d * d).sum()


def reference(label: str, w: torch.Tensor, ref_w: torch.Tensor) -> dict:
    """value(w), grad(w) = ∇R(w), prox(w, t), project(w), stats(w) of a rule label of the
    worker (float64 in, float64 out)."""
    dim = None
    if "[" in label:
        inner = label[label.index("[") + 1 : -1]
        dim = None if inner == "None" else eval(inner)  # "0" or "(0, 2)"
    kind = label.split("[")[0]
    r: dict = {}
    if kind == "grouplasso":
        lam, rs = 0.3, math.sqrt(gsize(w, dim))
        r["value"] = lambda x: lam * rs * gnorm(x, dim).sum()
        r["grad"] = lambda x: lam * rs * unit(x, gnorm(x, dim))
        r["prox"] = lambda x, t: gl_prox(x, dim, t * lam * rs)
        r["stats"] = lambda x: {
            "value": r["value"](x),
            "sparsity": (x == 0).double().mean(),
            "zero_groups": (gnorm(x, dim) == 0).sum(),
            "zero_group_fraction": (gnorm(x, dim) == 0).double().mean(),
        }
    elif kind == "sgl":
        lam, rho, rs = 0.3, 0.4, math.sqrt(gsize(w, dim))
        r["value"] = lambda x: (
            lam * rho * x.abs().sum() + lam * (1 - rho) * rs * gnorm(x, dim).sum()
        )
        r["grad"] = lambda x: (
            lam * rho * torch.sign(x) + lam * (1 - rho) * rs * unit(x, gnorm(x, dim))
        )
        r["prox"] = lambda x, t: gl_prox(soft(x, t * lam * rho), dim, t * lam * (1 - rho) * rs)
        r["stats"] = lambda x: {
            "value": r["value"](x),
            "sparsity": (x == 0).double().mean(),
            "zero_groups": (gnorm(x, dim) == 0).sum(),
            "zero_group_fraction": (gnorm(x, dim) == 0).double().mean(),
        }
    elif kind == "maxnorm":

        def mx(x):
            n = gnorm(x, dim)
            return x * torch.where(n > 1.5, 1.5 / (n + 1e-7), torch.ones_like(n))

        r["project"] = mx
        r["stats"] = lambda x: {"max_norm": gnorm(x, dim).max()}
    elif kind == "unitnorm":
        r["project"] = lambda x: x / (gnorm(x, dim) + 1e-7)
        r["stats"] = lambda x: {"max_norm": gnorm(x, dim).max()}
    elif kind == "nonneg":
        r["project"] = lambda x: x.clamp_min(0)
        r["stats"] = lambda x: {"min": x.min()}
    elif kind == "l1":
        lam = 0.05
        r["value"] = lambda x: lam * x.abs().sum()
        r["grad"] = lambda x: lam * torch.sign(x)
        r["prox"] = lambda x, t: soft(x, t * lam)
        r["stats"] = lambda x: {"value": r["value"](x), "sparsity": (x == 0).double().mean()}
    elif kind == "l2":
        lam = 0.1
        r["value"] = lambda x: 0.5 * lam * (x * x).sum()
        r["grad"] = lambda x: lam * x
        r["prox"] = lambda x, t: x / (1 + t * lam)
        r["stats"] = lambda x: {"value": r["value"](x)}
    elif kind == "elasticnet":
        a, rho = 0.1, 0.3
        r["value"] = lambda x: a * rho * x.abs().sum() + 0.5 * a * (1 - rho) * (x * x).sum()
        r["grad"] = lambda x: a * rho * torch.sign(x) + a * (1 - rho) * x
        r["prox"] = lambda x, t: soft(x, t * a * rho) / (1 + t * a * (1 - rho))
        r["stats"] = lambda x: {"value": r["value"](x), "sparsity": (x == 0).double().mean()}
    elif kind == "l2sp":
        lam = 0.2
        r["value"] = lambda x: 0.5 * lam * ((x - ref_w) ** 2).sum()
        r["grad"] = lambda x: lam * (x - ref_w)
        r["prox"] = lambda x, t: ref_w + (x - ref_w) / (1 + t * lam)
        r["stats"] = lambda x: {"value": r["value"](x)}
    elif kind == "orthogonal":
        r["value"] = lambda x: orth_value(x, 0.05)
        r["grad"] = lambda x: _autograd(lambda y: orth_value(y, 0.05), x)
        r["stats"] = lambda x: {"value": r["value"](x)}
    elif kind == "fn":
        r["value"] = lambda x: 0.1 * W.row_sum_sq(x)
        r["grad"] = lambda x: _autograd(lambda y: 0.1 * W.row_sum_sq(y), x)
        r["stats"] = lambda x: {"value": r["value"](x)}
    else:
        raise AssertionError(label)
    return r


# --------------------------------------------------------------------------- one process
def single_process(rules, opt_cls=torch.optim.Adam, steps: int = 3, model=None, batch=None):
    """The reference run: the model, rules and optimizer in this process on the full batch."""
    torch.manual_seed(0)
    model = W.mlp() if model is None else model
    x, y = W.batch() if batch is None else batch
    reg = tr.Regularizer(model, rules)
    opt = opt_cls(model.parameters(), lr=LR)
    reg.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        (nn.functional.mse_loss(model(x), y) + reg.penalty()).backward()
        opt.step()
    return model, reg


def check_params(got: dict, model: nn.Module, what: str, atol=2e-6, rtol=1e-5):
    exp = dict(model.named_parameters())
    assert set(got) == set(exp), what
    for n, p in exp.items():
        close(got[n], p.detach(), rtol=rtol, atol=atol, msg=f"{what} {n}")
