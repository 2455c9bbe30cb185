"""Fast kernels (``torch_regularizers.kernels``) against the single-tensor reference ops.

Every kernel is compared with the plain per-tensor ATen sequence it replaces (written
out here, independently of the library): bit for bit for float32/float64 — the raw bits,
so NaN, ±0 and subnormals count (the one documented exception: the ``"aten"`` backend's
soft-threshold leaves -0.0 where the reference leaves +0.0, checked with ``torch.equal``
and ``==``) — and for bfloat16 within one bf16 ulp at the scale of the op's operands (NaN
and ±inf exactly; see ``operand_scale``), far below each op's effect. bf16 L2 decay/prox
must also equal the fp32 result rounded once bit for bit, the soft-threshold to within one
ulp, and with the fixed coefficients each bf16 case checks that the op moved many entries
by more than the tolerance and that the kernel moved every one of them (a kernel that skips
bf16 tensors, or drops a term, fails). Each backend ("aten" and, where a
C++ toolchain exists, "native") and each internal path (gathered small tensors, chunked
big tensors, non-contiguous tensors, several batches/chunks) is exercised, the latter by
shrinking ``SMALL``/``CHUNK``.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_regularizers as tr
from torch_regularizers import kernels
from torch_regularizers.kernels import _batching
from torch_regularizers.kernels import native as _native

HYP = settings(deadline=None, max_examples=40)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


# --------------------------------------------------------------------------- fixtures
# native_mod, backend: tests/conftest.py
@pytest.fixture(params=["default", "shrunk"])
def sizes(request, monkeypatch):
    """Default thresholds, or tiny ones so that few elements hit every path (several
    gathered batches, several chunks per tensor)."""
    if request.param == "shrunk":
        monkeypatch.setattr(_batching, "SMALL", 16)
        monkeypatch.setattr(_batching, "CHUNK", 64)
        monkeypatch.setattr(_batching, "BATCH", 48)
    return request.param


# --------------------------------------------------------------------------- references
def ref(op: str, ps, gs, c):
    """The reference: per-tensor ATen ops (the penalties' ``_ref_*`` sequences)."""
    ps = [p.clone() for p in ps]
    gs = None if gs is None else [g.clone() for g in gs]
    for i, p in enumerate(ps):
        if op == "l1_grad":
            gs[i].add_(torch.sign(p), alpha=c[0])
        elif op == "en_grad":
            gs[i].add_(torch.sign(p), alpha=c[0])
            gs[i].add_(p, alpha=c[1])
        elif op == "l1_decay":
            p.add_(torch.sign(p), alpha=c[0])
        elif op == "en_decay":
            s = torch.sign(p)
            p.mul_(c[0])
            p.add_(s, alpha=c[1])
        elif op == "soft":
            p.sub_(torch.clamp(p, min=-c[0], max=c[0]))
            if c[1] != 1.0:
                p.div_(c[1])
        elif op == "l2_grad":
            gs[i].add_(p, alpha=c[0])
        elif op == "l2_decay":
            p.mul_(c[0])
        elif op == "l2_prox":
            p.div_(c[0])
    return ps, gs


def run(op: str, ps, gs, c):
    ps = [p.clone() for p in ps]
    gs = None if gs is None else [g.clone() for g in gs]
    fn = {
        "l1_grad": lambda: kernels.l1_grad_(ps, gs, *c),
        "en_grad": lambda: kernels.elastic_grad_(ps, gs, *c),
        "l1_decay": lambda: kernels.l1_decay_(ps, *c),
        "en_decay": lambda: kernels.elastic_decay_(ps, *c),
        "soft": lambda: kernels.soft_threshold_(ps, *c),
        "l2_grad": lambda: kernels.l2_grad_(ps, gs, *c),
        "l2_decay": lambda: kernels.l2_decay_(ps, *c),
        "l2_prox": lambda: kernels.l2_prox_(ps, *c),
    }[op]
    fn()
    return ps, gs


OPS = {
    "l1_grad": (0.3,),
    "en_grad": (0.3, -0.07),
    "l1_decay": (-0.013,),
    "en_decay": (0.9993, -0.0021),
    "soft": (0.25, 1.0),
    "soft_div": (0.25, 1.0 + 1 / 3),
    "l2_grad": (0.37,),
    "l2_decay": (1 - 1 / 7,),
    "l2_prox": (1 + 1 / 3,),
}
GRAD_OPS = {"l1_grad", "en_grad", "l2_grad"}


def op_name(key: str) -> str:
    return "soft" if key.startswith("soft") else key


def bits(t: torch.Tensor) -> torch.Tensor:
    view = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}
    return t.contiguous().view(view[t.dtype])


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 ulps (representable values between them; +0 and -0 are one value)."""

    def ordered(t):
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(a) - ordered(b)).abs()


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at magnitude ``|x|`` (float64): the gap to the next bf16 value up."""
    y = x.abs().to(torch.bfloat16)
    return torch.nextafter(y, torch.full_like(y, float("inf"))).double() - y.double()


def operand_scale(op: str, p, g, c, want) -> torch.Tensor:
    """Largest magnitude among the op's operands, intermediate terms and result (float64).

    ATen's bf16 sequence rounds the coefficient and each partial result to bf16, so where
    terms cancel (g ≈ −c·sign(θ)) the result's own ulp is no yardstick; one bf16 ulp at this
    scale is. It stays far below each op's effect (c·sign(θ), (1 − f)·θ, ...)."""
    p = p.double()
    s = torch.sign(p)
    g = None if g is None else g.double()
    terms = {
        "l1_grad": lambda: [g, c[0] * s],
        "en_grad": lambda: [g, c[0] * s, g + c[0] * s, c[1] * p],
        "l2_grad": lambda: [g, c[0] * p],
        "l1_decay": lambda: [p, c[0] * s],
        "en_decay": lambda: [p, c[0] * p, c[1] * s],
        "soft": lambda: [p],
        "l2_decay": lambda: [p],
        "l2_prox": lambda: [p],
    }[op]()
    return torch.stack([t.abs() for t in terms] + [want.double().abs()]).amax(0)


def assert_bf16_close(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """bf16 ``a`` within one bf16 ulp of ``b``: of ``b`` itself (``scale=None``: at most one
    representable value apart), or at magnitude ``scale`` (see :func:`operand_scale`).
    NaN exactly where ``b`` is NaN, ±inf exactly where ``b`` is infinite."""
    assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
    nan = torch.isnan(b)
    assert torch.equal(torch.isnan(a), nan)
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin)
    assert torch.equal(a[~fin & ~nan], b[~fin & ~nan])
    if not fin.any():
        return
    if scale is None:
        d = bf16_ulps(a[fin], b[fin]).double()
    else:
        d = (a[fin].double() - b[fin].double()).abs() / bf16_spacing(scale[fin])
    k = int(d.argmax())
    assert d.max() <= 1, (
        f"{d.max().item():.3g} bf16 ulps apart (at most 1{'' if scale is None else ' at the operands scale'}): "
        f"got {a[fin][k].item()!r}, want {b[fin][k].item()!r}"
    )


def assert_same(got, want, *, soft_aten: bool = False, scales=None):
    """Raw bits for float32/float64 (NaN by NaN-ness, and ±0 allowed to differ in sign
    only for the aten soft-threshold); bf16 within one bf16 ulp at the operands' scale
    (``scales[i]`` for tensor i), or bit for bit (NaN by NaN-ness) when no scale is given."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == torch.bfloat16 and scales is not None:
            assert_bf16_close(a, b, scales[i])
            continue
        nan = torch.isnan(b)
        assert torch.equal(torch.isnan(a), nan)
        if soft_aten:
            assert torch.equal(a[~nan], b[~nan])  # == semantics: -0.0 == +0.0
        else:
            assert torch.equal(bits(a)[~nan], bits(b)[~nan]), (a, b)


def special_values(p: torch.Tensor, seed: int) -> torch.Tensor:
    """Zeros, -0.0, values at the thresholds, NaN, ±inf, subnormals sprinkled in."""
    flat = p.view(-1)
    n = flat.numel()
    if n == 0:
        return p
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 9, (n,), generator=g)
    specials = torch.tensor(
        [0.0, -0.0, 0.25, -0.25, 1e-42, -1e-310, float("inf"), float("-inf"), float("nan")],
        dtype=torch.float64,
    )
    mask = torch.rand(n, generator=g) < 0.3
    flat[mask] = specials[k[mask]].to(p.dtype)
    return p


def make(specs, seed=0, specials=True, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    ps, gs = [], []
    for i, (shape, dtype) in enumerate(specs):
        p = torch.randn(shape, generator=g, dtype=torch.float64)
        q = torch.randn(shape, generator=g, dtype=torch.float64)
        p, q = p.to(dtype), q.to(dtype)
        if specials:
            special_values(p, seed * 1000 + i)
        if not contiguous and p.ndim == 2:
            p = p.t().contiguous().t()  # same values, transposed strides
            q = q.t().contiguous().t()
        ps.append(p)
        gs.append(q)
    return ps, gs


MIXED_SHAPES = [(), (1,), (0,), (7,), (3, 5), (2, 3, 4), (40, 30), (1200,), (3, 1, 5), (100, 17)]

#: ops whose bf16 result is also the fp32 result rounded once: bit for bit for the L2 scaling
#: ops (DESIGN §3: fp32 factor, one rounding), within one bf16 ulp for the soft-threshold.
#: The others follow ATen's bf16 sequence (a coefficient ``alpha`` rounded to bf16, each
#: partial result rounded), checked against it at the operands' scale.
ONCE_OPS = {"soft": 1, "l2_decay": 0, "l2_prox": 0}


def ref_fp32_once(op: str, ps, gs, c):
    """The op in fp32 on the upcast tensors, rounded once to each tensor's dtype."""
    up = ref(op, [p.float() for p in ps], None if gs is None else [g.float() for g in gs], c)
    out = up[1] if op in GRAD_OPS else up[0]
    return [t.to(x.dtype) for t, x in zip(out, gs if op in GRAD_OPS else ps)]


def check(op, c, ps, gs, got, want, *, soft_aten=False, effect=False):
    """The kernel's output (``got``) against the reference (``want``) for a case: the
    updated list as in :func:`assert_same`, θ bit for bit untouched by grad ops; for bf16
    tensors also the fp32-rounded-once result for ``ONCE_OPS``, and, with ``effect=True``
    (fixed coefficients that change every tensor), that the op changed each bf16 tensor
    and that the change is wider than the tolerance (so a kernel skipping bf16 fails)."""
    G = gs if op in GRAD_OPS else None
    i = 1 if op in GRAD_OPS else 0
    before = gs if op in GRAD_OPS else ps
    scales = [
        operand_scale(op, p, None if G is None else G[j], c, w) if p.dtype == torch.bfloat16 else None
        for j, (p, w) in enumerate(zip(ps, want[i]))
    ]
    assert_same(got[i], want[i], soft_aten=soft_aten, scales=scales)
    if op in GRAD_OPS:
        assert_same(got[0], ps)  # θ untouched in grad mode (bit for bit, bf16 too)
    if op in ONCE_OPS:
        for a, b in zip(got[i], ref_fp32_once(op, ps, G, c)):
            if a.dtype == torch.bfloat16:
                if ONCE_OPS[op]:
                    assert_bf16_close(a, b)
                else:
                    assert_same([a], [b])  # bit for bit (NaN by NaN-ness)
    if not effect:
        return
    moved = changed = total = 0
    for a, b, x, sc in zip(got[i], want[i], before, scales):
        if a.dtype != torch.bfloat16:
            continue
        fin = torch.isfinite(x) & torch.isfinite(b)
        m = (b[fin].double() - x[fin].double()).abs() > bf16_spacing(sc[fin])
        moved += int(m.sum())
        changed += int((a[fin] != x[fin])[m].sum())
        total += int(fin.sum())
    if total:
        # the reference moves many entries by more than the tolerance (else the check is
        # vacuous), and the kernel moved every one of them
        assert moved >= total // 10, f"{op}: only {moved} of {total} bf16 entries move beyond 1 ulp"
        assert changed == moved, f"{op}: {moved - changed} bf16 entries were not changed"


# --------------------------------------------------------------------------- every op, every path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", list(OPS))
def test_kernel_matches_reference(key, dtype, backend, sizes):
    op, c = op_name(key), OPS[key]
    specs = [(s, dtype) for s in MIXED_SHAPES]
    for contiguous in (True, False):
        ps, gs = make(specs, seed=sum(map(ord, key)), contiguous=contiguous)
        want = ref(op, ps, gs if op in GRAD_OPS else None, c)
        got = run(op, ps, gs if op in GRAD_OPS else None, c)
        # non-contiguous lists make the native backend fall back to aten for the call
        soft_aten = op == "soft" and (backend == "aten" or not contiguous)
        check(op, c, ps, gs, got, want, soft_aten=soft_aten, effect=True)


@pytest.mark.parametrize("key", ["l1_grad", "en_grad", "en_decay", "soft_div", "l1_decay"])
def test_many_tiny_tensors_several_batches(key, backend, monkeypatch):
    """300 tiny tensors split into several gathered batches (BATCH shrunk), 1-D and 2-D."""
    monkeypatch.setattr(_batching, "BATCH", 4096)
    op, c = op_name(key), OPS[key]
    for shape in [(50,), (5, 10)]:
        ps, gs = make([(shape, torch.float32)] * 300, seed=3)
        want = ref(op, ps, gs if op in GRAD_OPS else None, c)
        got = run(op, ps, gs if op in GRAD_OPS else None, c)
        i = 1 if op in GRAD_OPS else 0
        assert_same(got[i], want[i], soft_aten=op == "soft" and backend == "aten")


@pytest.mark.parametrize("key", list(OPS))
def test_big_tensor_several_chunks(key, backend):
    """A tensor bigger than the default CHUNK (chunked path with the real sizes)."""
    op, c = op_name(key), OPS[key]
    n = _batching.CHUNK + 1234
    ps, gs = make([((n,), torch.float32), ((_batching.SMALL + 3,), torch.float32)], seed=5)
    want = ref(op, ps, gs if op in GRAD_OPS else None, c)
    got = run(op, ps, gs if op in GRAD_OPS else None, c)
    i = 1 if op in GRAD_OPS else 0
    assert_same(got[i], want[i], soft_aten=op == "soft" and backend == "aten")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("key", ["l1_grad", "en_grad", "l2_decay", "soft_div", "l1_decay"])
def test_native_work_split_covers_every_element(key, threads, native_mod):
    """The native work split — big tensors sliced across threads, the small ones as one
    concatenated range — at 1, 2 and 3 threads: tensors at and around the big/small
    boundary (threads × 32768 elements), many tiny ones between them, every element equal
    to the reference."""
    op, c = op_name(key), OPS[key]
    sizes_ = [1, 65535, 7, 65536, 3 * 32768 + 7, 5, 98304, 200_001] + [3] * 40 + [32768]
    old_backend, old_threads = kernels.get_backend(), torch.get_num_threads()
    try:
        kernels.set_backend("native")
        torch.set_num_threads(threads)
        ps, gs = make([((n,), torch.float32) for n in sizes_], seed=11)
        want = ref(op, ps, gs if op in GRAD_OPS else None, c)
        got = run(op, ps, gs if op in GRAD_OPS else None, c)
    finally:
        torch.set_num_threads(old_threads)
        kernels.set_backend(old_backend)
    i = 1 if op in GRAD_OPS else 0
    assert_same(got[i], want[i], soft_aten=False)


def test_native_bitwise_equals_aten(native_mod):
    """The two backends agree bit for bit (besides the aten soft-threshold's -0.0)."""
    specs = [(s, torch.float32) for s in MIXED_SHAPES] + [((_batching.SMALL * 3,), torch.float32)]
    for key, c in OPS.items():
        op = op_name(key)
        ps, gs = make(specs, seed=11)
        out = {}
        for be in ("aten", "native"):
            kernels.set_backend(be)
            try:
                out[be] = run(op, ps, gs if op in GRAD_OPS else None, c)
            finally:
                kernels.set_backend("auto")
        i = 1 if op in GRAD_OPS else 0
        assert_same(out["native"][i], out["aten"][i], soft_aten=op == "soft")


# --------------------------------------------------------------------------- properties
@HYP
@given(
    shapes=st.lists(
        st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=8
    ),
    dtype=st.sampled_from(DTYPES),
    key=st.sampled_from(list(OPS)),
    coef=st.floats(-3.0, 3.0, allow_nan=False),
    seed=st.integers(0, 2**16),
    shrunk=st.booleans(),
    be=st.sampled_from(["aten", "native"]),
)
def test_property_kernels_match_reference(shapes, dtype, key, coef, seed, shrunk, be):
    op = op_name(key)
    if be == "native" and not _native.is_built():
        be = "aten"  # the fixture-based tests build it; here only use it when present
    c = list(OPS[key])
    if op == "soft":
        c[0] = abs(coef)
    elif op in ("l2_prox",):
        c[0] = 1 + abs(coef)
    else:
        c[-1] = coef
    old = (_batching.SMALL, _batching.CHUNK, _batching.BATCH)
    kernels.set_backend(be)
    try:
        if shrunk:
            _batching.SMALL, _batching.CHUNK, _batching.BATCH = 8, 32, 24
        ps, gs = make([(s, dtype) for s in shapes], seed=seed)
        want = ref(op, ps, gs if op in GRAD_OPS else None, tuple(c))
        got = run(op, ps, gs if op in GRAD_OPS else None, tuple(c))
    finally:
        _batching.SMALL, _batching.CHUNK, _batching.BATCH = old
        kernels.set_backend("auto")
    check(op, tuple(c), ps, gs, got, want, soft_aten=op == "soft" and be == "aten")


# --------------------------------------------------------------------------- behaviour
def test_soft_threshold_exact_zeros_and_nan(backend):
    p = torch.tensor([0.1, -0.1, 0.25, -0.25, 0.3, -0.3, float("nan"), float("inf"), 0.0])
    kernels.soft_threshold_([p], 0.25)
    assert (p[:6].abs() <= 0.05 + 1e-7).all()
    assert (p[:4] == 0).all() and (p[8] == 0)
    assert torch.isnan(p[6]) and p[7] == float("inf")
    torch.testing.assert_close(p[4:6], torch.tensor([0.05, -0.05]))


def test_negative_threshold_keeps_reference_semantics():
    ps, _ = make([((5, 3), torch.float64)], seed=2)
    want, _ = ref("soft", ps, None, (-0.5, 1.0))
    got, _ = run("soft", ps, None, (-0.5, 1.0))
    assert_same(got, want)


def test_mixed_dtypes_in_one_call(backend, sizes):
    specs = [((40,), torch.float32), ((40,), torch.float64), ((3, 4), torch.bfloat16), ((30,), torch.float32)]
    for key in ("l1_grad", "en_grad", "en_decay", "soft_div"):
        op, c = op_name(key), OPS[key]
        ps, gs = make(specs, seed=4)
        want = ref(op, ps, gs if op in GRAD_OPS else None, c)
        got = run(op, ps, gs if op in GRAD_OPS else None, c)
        check(op, c, ps, gs, got, want, soft_aten=op == "soft" and backend == "aten", effect=True)


def test_in_place_and_version_counter(backend):
    """Kernels write into the given tensors (same storage) and bump their version
    counters like ATen in-place ops, so autograd still detects the modification."""
    ps, gs = make([((300,), torch.float32), ((4, 5), torch.float32)], seed=6, specials=False)
    ptr_p, ptr_g = [p.data_ptr() for p in ps], [g.data_ptr() for g in gs]
    v_p, v_g = [p._version for p in ps], [g._version for g in gs]
    kernels.l1_grad_(ps, gs, 0.1)
    assert [g._version for g in gs] != v_g
    kernels.soft_threshold_(ps, 0.1)
    assert all(a > b for a, b in zip((p._version for p in ps), v_p))
    assert [p.data_ptr() for p in ps] == ptr_p and [g.data_ptr() for g in gs] == ptr_g


def test_leaf_parameters_requiring_grad(backend):
    """Kernels run under no_grad themselves: nn.Parameters can be passed directly."""
    w = torch.nn.Parameter(torch.randn(50, 3))
    w.grad = torch.zeros_like(w)
    kernels.l1_grad_([w], [w.grad], 0.5)
    assert torch.equal(w.grad, 0.5 * torch.sign(w.detach()))
    kernels.elastic_decay_([w], 0.5, -0.1)
    kernels.soft_threshold_([w], 0.01, 1.5)
    assert w.grad_fn is None and w.requires_grad


def test_plan_cache_survives_resized_data(backend):
    """A parameter whose .data is replaced by a tensor of another size between calls:
    the cached gather plan is rebuilt, results stay right."""
    ps = [torch.randn(10) for _ in range(20)]
    gs = [torch.zeros(10) for _ in range(20)]
    kernels.l1_grad_(ps, gs, 1.0)
    ps[3].data = torch.randn(17)
    gs[3] = torch.zeros(17)
    for g in gs:
        g.zero_()
    kernels.l1_grad_(ps, gs, 1.0)
    for p, g in zip(ps, gs):
        assert torch.equal(g, torch.sign(p))


@pytest.mark.parametrize("key", ["l1_grad", "en_grad", "l1_decay", "soft_div"])
def test_plan_cache_follows_same_size_reshapes_and_reused_ids(key, backend):
    """The gather plan of small tensors depends on their shapes: a ``.data`` reshaped to
    the same number of elements (same ids, same sizes), and new tensors of other shapes
    that may get the freed tensors' ids (a multi-process test hung when one rank raised
    on such stale views), give reference results."""
    op, c = op_name(key), OPS[key]
    for shapes in ([(4, 3)] * 6, [(3, 4)] * 6, [(12,)] * 6, [(2, 6)] * 3 + [(12,)] * 3):
        ps, gs = make([(sh, torch.float32) for sh in shapes], seed=2)
        want = ref(op, ps, gs if op in GRAD_OPS else None, c)
        got = run(op, ps, gs if op in GRAD_OPS else None, c)
        i = 1 if op in GRAD_OPS else 0
        assert_same(got[i], want[i], soft_aten=op == "soft" and backend == "aten")
    ps = [torch.randn(4, 3) for _ in range(6)]
    gs = [torch.zeros(4, 3) for _ in range(6)]
    kernels.l1_grad_(ps, gs, 1.0)
    for t in ps + gs:
        t.data = t.data.reshape(3, 4)  # same tensors, same sizes, another shape
    for g in gs:
        g.zero_()
    kernels.l1_grad_(ps, gs, 1.0)
    for p, g in zip(ps, gs):
        assert torch.equal(g, torch.sign(p))


def test_scratch_is_reused_not_model_sized(backend):
    """Repeated calls allocate nothing new: the per-thread scratch stays at most CHUNK
    (or BATCH) elements, however big the tensors."""
    ps, gs = make([((_batching.CHUNK * 2 + 5,), torch.float32)] + [((64,), torch.float32)] * 50, specials=False)
    kernels.elastic_grad_(ps, gs, 0.1, 0.2)
    bufs = _batching.state_bufs().bufs
    before = {k: [b.data_ptr() for b in v[1]] for k, v in bufs.items()}
    for _ in range(3):
        kernels.elastic_grad_(ps, gs, 0.1, 0.2)
        kernels.l1_decay_(ps, -0.01)
        kernels.soft_threshold_(ps, 1e-3, 1.01)
    after = {k: [b.data_ptr() for b in v[1]] for k, v in bufs.items()}
    assert before == {k: after[k] for k in before}
    for _, (_, bs) in bufs.items():
        assert all(b.numel() <= max(_batching.CHUNK, _batching.BATCH) for b in bs)


def test_threads_use_separate_scratch(backend):
    """Two threads running kernels at once get the same results as one after the other."""
    specs = [((300,), torch.float32)] * 40 + [((_batching.SMALL * 2,), torch.float32)]
    inputs = [make(specs, seed=s) for s in range(4)]
    want = [ref("en_grad", ps, gs, (0.3, -0.07))[1] for ps, gs in inputs]
    got: list = [None] * 4

    def work(i):
        ps, gs = inputs[i]
        gs = [g.clone() for g in gs]
        for _ in range(5):
            g2 = [g.clone() for g in gs]
            kernels.elastic_grad_(ps, g2, 0.3, -0.07)
        got[i] = g2

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, want):
        assert_same(a, b)


def test_set_backend_validates():
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("fast")
    assert kernels.get_backend() in kernels.BACKENDS


def test_native_unusable_tensors_fall_back(native_mod):
    """Native kernels decline what they cannot do (non-contiguous, mixed dtype, bf16) and
    the ATen path takes over, with the same result."""
    a = torch.randn(6, 8).t()
    assert not native_mod.sign_add_([a], [torch.zeros(8, 6)], 1.0)
    assert not native_mod.sign_add_([torch.randn(3)], [torch.zeros(3, dtype=torch.float64)], 1.0)
    assert not native_mod.soft_threshold_([torch.randn(3)], -1.0, 1.0)
    kernels.set_backend("native")
    try:
        g = torch.zeros(8, 6)
        kernels.l1_grad_([a], [g], 2.0)
        assert torch.equal(g, 2.0 * torch.sign(a))
    finally:
        kernels.set_backend("auto")


# --------------------------------------------------------------------------- through the penalties
PENALTIES = {
    "l1": lambda: tr.L1(1.0),
    "l2": lambda: tr.L2(1.0),
    "en": lambda: tr.ElasticNet(1.0, 0.3),
}


@pytest.mark.parametrize("kind", list(PENALTIES))
@pytest.mark.parametrize("method", ["grad_", "decay_", "prox_"])
def test_penalty_hot_path_matches_reference_loop(kind, method, backend, sizes):
    """Penalty.grad_/decay_/prox_ with impl="foreach" (the kernels) against impl="reference"
    (the penalty's own per-tensor loop), over tiny, mid and big tensors."""
    pen = PENALTIES[kind]()
    specs = [((s,), torch.float32) for s in (3, 100, 5000, _batching.SMALL + 7)] + [((4, 6, 2), torch.float64)]
    ps, gs = make(specs, seed=8)
    out = {}
    for impl in ("reference", "foreach"):
        p2, g2 = [p.clone() for p in ps], [g.clone() for g in gs]
        if method == "grad_":
            pen.grad_(p2, g2, 0.01, 0.5, impl=impl)
            out[impl] = g2
        else:
            getattr(pen, method)(p2, 0.01, 0.3, impl=impl)
            out[impl] = p2
    assert_same(out["foreach"], out["reference"], soft_aten=method == "prox_" and kind != "l2" and backend == "aten")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("key", list(OPS))
def test_cuda_matches_cpu_reference(key):
    op, c = op_name(key), OPS[key]
    ps, gs = make([(s, torch.float32) for s in MIXED_SHAPES], seed=9)
    want = ref(op, ps, gs if op in GRAD_OPS else None, c)
    got = run(op, [p.cuda() for p in ps], [g.cuda() for g in gs] if op in GRAD_OPS else None, c)
    i = 1 if op in GRAD_OPS else 0
    for a, b in zip(got[i], want[i]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6, equal_nan=True)
