"""Triton kernels of the ``"triton"`` backend (loaded by :mod:`.triton`, never imported
directly: it is executed once per mode — compiled, or under ``TRITON_INTERPRET=1`` — so
that ``@triton.jit`` sees the mode in force when the kernels are first needed).

Conventions of both kernels:

* tensors come through device tables of int64: data pointers (cast to typed pointers in
  the kernel), element counts, work items; one launch covers a whole list;
* ``DT`` is 0 (float32), 1 (bfloat16) or 2 (float16); the math is fp32. bf16 is loaded and
  stored as raw 16-bit words and converted here, exactly (widening) and with
  round-to-nearest-even (narrowing, NaN kept NaN) — the same as ``Tensor.to`` — so that the
  compiled kernels and the interpreter round the same way;
* divisions are IEEE (``div_rn``), multiply-adds that ATen fuses are explicit ``fma``,
  and the launch disables fp-contraction, so each op rounds as in the reference;
* only builtins of ``triton.language`` are used (``tl.full``, ``tl.reduce``), not its own
  ``@jit`` helpers (``tl.zeros``, ``tl.sum``): those are defined when ``triton`` is
  imported, in the mode of that moment, so they would break the interpreter whenever
  ``triton`` was imported before ``TRITON_INTERPRET=1`` was set.
"""

import triton
import triton.language as tl

# ops of the elementwise kernel (see kernels/triton.py: OPS)
L2_GRAD = tl.constexpr(0)
L1_GRAD = tl.constexpr(1)
EN_GRAD = tl.constexpr(2)
L2_DECAY = tl.constexpr(3)
L1_DECAY = tl.constexpr(4)
EN_DECAY = tl.constexpr(5)
L2_PROX = tl.constexpr(6)
SOFT = tl.constexpr(7)
SOFT_DIV = tl.constexpr(8)

# group factors of the row-group kernel
SHRINK = tl.constexpr(0)  # GroupLasso prox: max(0, 1 - thr / max(n, tiny))
MAXNORM = tl.constexpr(1)  # n > m ? m / (n + eps) : 1
UNITNORM = tl.constexpr(2)  # 1 / (n + eps)


@triton.jit
def _load(ptr_word, offs, mask, DT: tl.constexpr):
    """Elements ``offs`` of a tensor whose address is ``ptr_word`` (int64), as fp32."""
    if DT == 0:
        x = tl.load(ptr_word.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif DT == 1:
        h = tl.load(ptr_word.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        x = (h.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr_word.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0)
        x = x.to(tl.float32)
    return x


@triton.jit
def _store(ptr_word, offs, x, mask, DT: tl.constexpr):
    """Store fp32 ``x`` rounded to nearest even in the tensor's dtype."""
    if DT == 0:
        tl.store(ptr_word.to(tl.pointer_type(tl.float32)) + offs, x, mask=mask)
    elif DT == 1:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, (u >> 16) | 0x40, r)  # NaN: keep it a (quiet) NaN
        tl.store(ptr_word.to(tl.pointer_type(tl.uint16)) + offs, r.to(tl.uint16), mask=mask)
    else:
        tl.store(ptr_word.to(tl.pointer_type(tl.float16)) + offs, x.to(tl.float16), mask=mask)


@triton.jit
def _sign(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def elementwise_kernel(
    p_tab,  # int64[n]: θ data pointers
    g_tab,  # int64[n]: gradient data pointers (grad ops), else p_tab
    numel_tab,  # int64[n]
    chunk_tensor,  # int64[chunks]: tensor of each chunk
    chunk_start,  # int64[chunks]: first element of each chunk in its tensor
    c0,
    c1,
    OP: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    n = tl.load(numel_tab + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    pw = tl.load(p_tab + t)
    x = _load(pw, offs, mask, DT)
    if OP <= EN_GRAD:  # g ← ...: θ read-only
        gw = tl.load(g_tab + t)
        g = _load(gw, offs, mask, DT)
        if OP == L2_GRAD:
            g = tl.fma(x, c0, g)
        elif OP == L1_GRAD:
            g = tl.fma(_sign(x), c0, g)
        else:
            g = tl.fma(x, c1, tl.fma(_sign(x), c0, g))
        _store(gw, offs, g, mask, DT)
    else:
        if OP == L2_DECAY:
            y = x * c0
        elif OP == L1_DECAY:
            y = tl.fma(_sign(x), c0, x)
        elif OP == EN_DECAY:
            y = tl.fma(_sign(x), c1, x * c0)
        elif OP == L2_PROX:
            y = tl.div_rn(x, tl.full([BLOCK], 0.0, tl.float32) + c0)
        else:  # SOFT / SOFT_DIV: x - clamp(x, -t, t) (NaN propagates), then / d
            clipped = tl.where(x < -c0, -c0, tl.where(x > c0, c0, x))
            y = x - clipped
            if OP == SOFT_DIV:
                y = tl.div_rn(y, tl.full([BLOCK], 0.0, tl.float32) + c1)
        _store(pw, offs, y, mask, DT)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _f64(hi, lo):
    """The float64 whose bit pattern is ``hi << 32 | lo`` (two int32 kernel arguments)."""
    bits = (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)
    return bits.to(tl.float64, bitcast=True)


@triton.jit(do_not_specialize=["a_hi", "a_lo", "b_hi", "b_lo"])
def row_group_kernel(
    p_tab,  # int64[n]: data pointers
    cols_tab,  # int64[n]: elements per group of each tensor
    sq_tab,  # int64[n]: bits of float64 sqrt(group size) of each tensor (SHRINK)
    group_tensor,  # int64[groups]
    group_start,  # int64[groups]: first element of each group in its tensor
    a_hi,
    a_lo,  # SHRINK: λ (float64 bits); MAXNORM: unused
    b_hi,
    b_lo,  # SHRINK: η (float64 bits)
    m,  # MAXNORM: the max norm (fp32)
    eps,  # MAXNORM / UNITNORM: ε (fp32)
    tiny,  # SHRINK: the clamp floor of the norm (fp32 tiny)
    KIND: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per group: the group's L2 norm (squares summed in float64, then rounded
    to fp32, like the fp32 norm the reference computes but without its rounding error),
    the group's fp32 factor with the reference's op sequence, then θ_g ← θ_g · factor."""
    pid = tl.program_id(0)
    t = tl.load(group_tensor + pid)
    start = tl.load(group_start + pid)
    cols = tl.load(cols_tab + t)
    pw = tl.load(p_tab + t)
    acc = tl.full([BLOCK], 0.0, tl.float64)
    for s in range(0, cols, BLOCK):
        o = s + tl.arange(0, BLOCK).to(tl.int64)
        msk = o < cols
        x = _load(pw, start + o, msk, DT).to(tl.float64)
        acc += x * x
    n = tl.sqrt(tl.reduce(acc, 0, _add)).to(tl.float32)
    nv = tl.full([BLOCK], 0.0, tl.float32) + n
    one = tl.full([BLOCK], 1.0, tl.float32)
    if KIND == SHRINK:
        # thr = η·(λ·√size) in float64 as in Python, rounded to fp32 by the multiplication
        sq = tl.load(sq_tab + t).to(tl.float64, bitcast=True)
        thr = (_f64(b_hi, b_lo) * (_f64(a_hi, a_lo) * sq)).to(tl.float32)
        nc = tl.where(nv < tiny, tiny, nv)  # clamp_min(tiny), NaN propagates
        f = one - tl.div_rn(one, nc) * thr  # 1 - reciprocal(n)·thr
        f = tl.where(f < 0.0, 0.0, f)  # clamp_min_(0)
    elif KIND == MAXNORM:
        f = tl.where(nv > m, tl.div_rn(one, nv + eps) * m, one)
    else:
        f = tl.div_rn(one, nv + eps)
    for s in range(0, cols, BLOCK):
        o = s + tl.arange(0, BLOCK).to(tl.int64)
        msk = o < cols
        x = _load(pw, start + o, msk, DT)
        _store(pw, start + o, x * f, msk, DT)
