"""What bounds the stock-ATen paths: the cost of single elementwise passes vs the floor.

Times, interleaved with the floor ``torch._foreach_add_(grads, params, alpha=0)`` on the
same tensors, the individual passes the ATen kernels are made of: ``sign`` into a reused
buffer, ``add_`` of a buffer, in-place ``softshrink``, ``clamp`` into a buffer, and, for
the tiny-tensor set, gathering with ``torch.cat`` and scattering with
``torch._foreach_copy_``/``_foreach_add_`` through views of a flat buffer::

    python benchmarks/passes.py [--reps 30] [--threads 1] [--json]

If each pass costs about one floor, a two-pass update (L1 grad: sign, add) cannot be
much under 2x the floor with stock ops; the fused native kernels do it in one pass.
"""

from __future__ import annotations

import argparse
import json

import torch

from torch_regularizers import bench


def run(reps: int) -> dict:
    out = {}
    for name in ("large", "transformer", "tiny"):
        ps = bench.make_set(name)
        gs = [torch.randn_like(p) for p in ps]
        n = max(p.numel() for p in ps)
        buf = torch.empty(n)
        fns = {"floor": lambda ps=ps, gs=gs: torch._foreach_add_(gs, ps, alpha=0)}

        def per_tensor(f, ps=ps, gs=gs, buf=buf):
            def go():
                for p, g in zip(ps, gs):
                    f(p, g, buf[: p.numel()].view(p.shape))

            return go

        fns["sign -> buffer (loop)"] = per_tensor(lambda p, g, s: torch.sign(p, out=s))
        fns["add_ buffer (loop)"] = per_tensor(lambda p, g, s: g.add_(s, alpha=1e-5))
        fns["clamp -> buffer (loop)"] = per_tensor(lambda p, g, s: torch.clamp(p, -1e-9, 1e-9, out=s))
        fns["softshrink in place (loop)"] = per_tensor(lambda p, g, s: torch._C._nn.softshrink(p, 1e-12, out=p))
        fns["_foreach_sign (allocates)"] = lambda ps=ps: torch._foreach_sign(ps)
        if name == "tiny":
            flat = torch.empty(sum(p.numel() for p in ps))
            views = [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in ps]), ps)]
            fns["cat -> flat"] = lambda ps=ps, flat=flat: torch.cat(ps, out=flat)
            fns["_foreach_add_ from flat views"] = lambda gs=gs, views=views: torch._foreach_add_(gs, views, alpha=1e-5)
            fns["_foreach_copy_ from flat views"] = lambda gs=gs, views=views: torch._foreach_copy_(gs, views)
        times = bench.interleaved(fns, reps)
        out[name] = bench.summarize(times, "floor")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args.reps)
    if args.json:
        print(json.dumps({"machine": bench.machine_info(), "passes": res}, indent=1))
        return 0
    m = bench.machine_info()
    print(f"# {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads")
    for name, summ in res.items():
        print(f"\n{name}: floor {summ['floor']['ms']:.3f} ms")
        for k, v in summ.items():
            if k != "floor":
                print(f"  {k:<34} {v['ratio']:5.2f}x  (min-ratio {v['ratio_min']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
