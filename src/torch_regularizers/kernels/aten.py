"""The ``"aten"`` backend: stock ATen ops only, never a temporary the size of the model.

CPU: big tensors (``SMALL`` elements or more) go through a reused scratch buffer of at most
``CHUNK`` elements (``torch.sign(θ_chunk, out=scratch)`` then ``add_``); small tensors are
gathered (``torch.cat``) into flat scratch in batches of at most ``BATCH`` elements, updated
there with a few ops, and scattered back with one ``_foreach_add_``/``_foreach_copy_``
through cached views (:mod:`._batching`), so the per-tensor cost is about that of the floor
itself; soft-thresholding is one in-place ``softshrink``; L2's ``mul_``/``div_`` take a 0-d
tensor operand (a Python scalar costs a wrapped-scalar allocation per tensor).

Other devices (CUDA): the plain ``torch._foreach_*`` sequences (multi-tensor kernels, whose
temporaries come from the caching allocator) — the "foreach" column of the CUDA benchmark.

Every function here takes a non-empty list of one dtype (the dispatcher splits mixed lists).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._precision import LOW_PRECISION
from . import _batching as B

NATIVE_DTYPES = (torch.float32, torch.float64)


def scalar_like(x: float, p: Tensor) -> Any:
    """``x`` as a 0-d tensor operand for ``_foreach_mul_``/``_foreach_div_`` on ``p``'s list.

    float32/float64 on CPU: a 0-d CPU tensor of ``p``'s dtype, the fastest operand (a Python
    scalar allocates a wrapped tensor per tensor of the list) and bit-identical to it.
    bf16/fp16 (any device): a 0-d **fp32** tensor, so the factor keeps fp32 precision —
    ``torch._foreach_mul_(bf16_list, 0.997)`` rounds the scalar itself to bf16 (0.99609375,
    a 30 % error in the decay lr·λ = 3e-3), while ``p.mul_(0.997)`` does not; the fp32
    operand gives the single-tensor (fp32-math) result on every path.
    Other devices: the Python scalar.
    """
    if p.dtype in LOW_PRECISION:
        return torch.tensor(x, dtype=torch.float32, device=p.device)
    return torch.tensor(x, dtype=p.dtype) if p.device.type == "cpu" else x


def apply(op: str, ps: list[Tensor], gs: list[Tensor] | None, c: tuple, scratch: Tensor | None) -> None:
    """``op`` (see :mod:`torch_regularizers.kernels`) on a one-dtype list."""
    if op == "l2_grad":  # the floor itself: one multi-tensor add
        torch._foreach_add_(gs, ps, alpha=c[0])
        return
    if op == "l2_decay":
        torch._foreach_mul_(ps, scalar_like(c[0], ps[0]))
        return
    if op == "l2_prox":
        p0 = ps[0]
        if p0.dtype in NATIVE_DTYPES or p0.dtype in LOW_PRECISION:
            torch._foreach_div_(ps, scalar_like(c[0], p0))
        else:
            torch._foreach_div_(ps, c[0])
        return
    if ps[0].device.type != "cpu":
        foreach(op, ps, gs, c)
        return
    split = B.Split(ps) if gs is None else B.Split(ps, gs)
    for idx, numels in split.batches:
        _batch(op, B.pick(ps, idx), None if gs is None else B.pick(gs, idx), numels, c)
    if op == "soft":  # in place, no scratch: one op (two with the division) per tensor
        for i in split.chunked + split.loose:
            flat(op, ps[i], None, None, c)
        return
    for i in split.chunked:
        p = ps[i].view(-1)
        g = None if gs is None else gs[i].view(-1)
        buf = _buf(scratch, p)
        for lo, hi in B.chunks(p.numel()):
            flat(op, p[lo:hi], None if g is None else g[lo:hi], buf[: hi - lo], c)
    for i in split.loose:
        flat(op, ps[i], None if gs is None else gs[i], None, c)


# The per-op math, two ways: on whole lists (``_foreach_*``, other devices) and on one flat
# buffer or chunk (``flat``). ``p``/``g``: θ and gradient; ``s``: scratch.
def foreach(op: str, ps: list[Tensor], gs: list[Tensor] | None, c: tuple) -> None:
    if op == "l1_grad":
        torch._foreach_add_(gs, torch._foreach_sign(ps), alpha=c[0])
    elif op == "en_grad":
        torch._foreach_add_(gs, torch._foreach_sign(ps), alpha=c[0])
        torch._foreach_add_(gs, ps, alpha=c[1])
    elif op == "l1_decay":
        torch._foreach_add_(ps, torch._foreach_sign(ps), alpha=c[0])
    elif op == "en_decay":
        signs = torch._foreach_sign(ps)
        torch._foreach_mul_(ps, scalar_like(c[0], ps[0]))
        torch._foreach_add_(ps, signs, alpha=c[1])
    else:  # soft
        clipped = torch._foreach_clamp_max(ps, c[0])
        torch._foreach_clamp_min_(clipped, -c[0])
        torch._foreach_sub_(ps, clipped)
        if c[1] != 1.0:
            apply("l2_prox", ps, None, (c[1],), None)


def flat(op: str, p: Tensor, g: Tensor | None, s: Tensor | None, c: tuple) -> None:
    """The same math on one tensor: a contiguous 1-D slice with ``s`` a scratch of the same
    length, or (``s=None``) any tensor, with a ``sign`` temporary."""
    if op == "soft":
        torch._C._nn.softshrink(p, c[0], out=p)
        if c[1] != 1.0:
            p.div_(c[1])
        return
    if s is None:
        s = torch.sign(p)
    else:
        torch.sign(p, out=s)
    if op == "l1_grad":
        g.add_(s, alpha=c[0])
    elif op == "en_grad":
        g.add_(s, alpha=c[0])
        g.add_(p, alpha=c[1])
    elif op == "l1_decay":
        p.add_(s, alpha=c[0])
    else:  # en_decay
        p.mul_(c[0])
        p.add_(s, alpha=c[1])


def _batch(op: str, ps: list[Tensor], gs: list[Tensor] | None, numels: list[int], c: tuple) -> None:
    """Small CPU tensors of one dtype: gather θ (and g) into flat scratch, do the math on
    the flat buffers (a handful of ops whatever the number of tensors), scatter back."""
    if op == "l1_grad":  # θ → flat, sign in place, one multi-tensor add into the grads
        pl = B.plan(ps, numels, 1)
        pl.load(0, ps).sign_()
        torch._foreach_add_(gs, pl.views[0], alpha=c[0])
    elif op == "en_grad":  # θ and g → flat, both adds on the flat g, copy g back
        pl = B.plan(ps, numels, 3)
        p, g, s = pl.load(0, ps), pl.load(1, gs), pl.flat[2]
        flat(op, p, g, s, c)
        torch._foreach_copy_(gs, pl.views[1])
    else:  # decoupled / prox: θ → flat, update the flat θ, copy θ back
        pl = B.plan(ps, numels, 1 if op == "soft" else 2)
        p = pl.load(0, ps)
        flat(op, p, None, None if op == "soft" else pl.flat[1], c)
        torch._foreach_copy_(ps, pl.views[0])


def _buf(scratch: Tensor | None, p: Tensor) -> Tensor:
    n = min(p.numel(), B.CHUNK)
    if (
        scratch is not None
        and scratch.dtype == p.dtype
        and scratch.device == p.device
        and scratch.numel() >= n
        and scratch.is_contiguous()
    ):
        return scratch.view(-1)
    return B.scratch(n, p)
