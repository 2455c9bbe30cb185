"""The Triton backend (``torch_regularizers.kernels.triton``) against the single-tensor
reference implementations, run by Triton's interpreter on CPU tensors.

How the interpreter is switched on: ``TRITON_INTERPRET=1`` is read by ``@triton.jit`` when
a kernel is *defined*, so the backend defines its kernels lazily, once per mode, the first
time a call needs them (``kernels/triton.py: _kernels``). The ``interpret`` fixture below
sets the variable with ``monkeypatch`` for each test only (and restores it), and selects
the ``"triton"`` backend; the interpreted kernels it makes are used only while the variable
is set, so nothing leaks into other tests (no subprocess and no conftest-wide setting
needed, and ``import triton`` may already have happened elsewhere). The whole module is
skipped when ``triton`` does not import.

What is checked:

* elementwise ops (L1/L2/elastic-net grad, decay, prox), float32: **bit for bit** equal to
  the per-tensor ATen reference (the op sequence matches: ``fma`` where ATen fuses, IEEE
  division; soft-thresholding leaves +0.0 like the reference), with zeros, -0.0, values
  at the thresholds, subnormals, ±inf and NaN sprinkled in; bf16/fp16: bit for bit equal
  to the same ops in fp32 rounded once (DESIGN §3), and (bf16) within 1 bf16 ulp of
  ATen's own bf16 sequence for L2 decay/prox and soft-thresholding, within 2 ulps at the
  operands' scale for the others (ATen rounds each partial result to bf16);
* row groups (GroupLasso / SparseGroupLasso prox, MaxNorm, UnitNorm): bit for bit equal to
  the single-tensor reference *given the same group norm* — the kernel sums squares in
  float64, so the reference is run with a float64-accumulated norm rounded to fp32 — and
  close to the unmodified fp32 reference (whose own norm is only good to a few ulps);
  all-zero groups, subnormal groups, 0-d and 1-D tensors, several row layouts;
* the many-tiny-tensors case with **300** tensors (the interpreter runs each program in
  Python, ~3 ms each, so the benchmark's 2000-tensor set would take ~6 s per call here):
  one launch per call, bit for bit;
* fallbacks (float64, non-contiguous, other group layouts), table caching, version counters.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_kernels import (
    GRAD_OPS,
    MIXED_SHAPES,
    ONCE_OPS,
    OPS,
    assert_bf16_close,
    bf16_spacing,
    make,
    op_name,
    operand_scale,
    ref,
    ref_fp32_once,
    run,
)

import torch_regularizers as tr
from torch_regularizers import constraints as _constraints
from torch_regularizers import kernels
from torch_regularizers import structured as _structured
from torch_regularizers.kernels import triton as ktriton

LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """Triton's interpreter on CPU tensors, the ``"triton"`` backend, for one test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    old = kernels.get_backend()
    kernels.set_backend("triton")
    yield
    kernels.set_backend(old)


def raw(t: torch.Tensor) -> torch.Tensor:
    view = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return t.contiguous().view(view[t.dtype])


def assert_bits(got, want):
    """Equal bit for bit (NaN by NaN-ness: payloads may differ)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        nan = torch.isnan(b)
        assert torch.equal(torch.isnan(a), nan)
        bad = raw(a)[~nan] != raw(b)[~nan]
        assert not bad.any(), f"{int(bad.sum())} values differ: got {a[~nan][bad][:5]}, want {b[~nan][bad][:5]}"


def ulps32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in float32 ulps (ordered integer representation; ±0 are one value)."""

    def ordered(t):
        i = t.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    return (ordered(a) - ordered(b)).abs()


class Launches:
    """Counts kernel launches (``kernel[grid](...)``) of the backend's kernels module."""

    def __init__(self, monkeypatch):
        self.n = 0
        mod = ktriton._kernels()
        for name in ("elementwise_kernel", "row_group_kernel"):
            monkeypatch.setattr(mod, name, _Counted(getattr(mod, name), self))


class _Counted:
    def __init__(self, kernel, counter: Launches):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        self.counter.n += 1
        return self.kernel[grid]


# --------------------------------------------------------------------------- elementwise
@pytest.mark.parametrize("key", list(OPS))
def test_elementwise_fp32_bit_identical_to_reference(key, monkeypatch):
    op, c = op_name(key), OPS[key]
    ps, gs = make([(s, torch.float32) for s in MIXED_SHAPES], seed=sum(map(ord, key)))
    g_in = gs if op in GRAD_OPS else None
    want = ref(op, ps, g_in, c)
    launches = Launches(monkeypatch)
    got = run(op, ps, g_in, c)
    assert launches.n == 1  # the whole list in one launch
    i = 1 if op in GRAD_OPS else 0
    assert_bits(got[i], want[i])
    if op in GRAD_OPS:
        assert_bits(got[0], ps)  # θ untouched


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("key", list(OPS))
def test_elementwise_low_precision_is_fp32_math_rounded_once(key, dtype):
    op, c = op_name(key), OPS[key]
    ps, gs = make([(s, dtype) for s in MIXED_SHAPES], seed=7 + sum(map(ord, key)))
    g_in = gs if op in GRAD_OPS else None
    got = run(op, ps, g_in, c)
    i = 1 if op in GRAD_OPS else 0
    assert_bits(got[i], ref_fp32_once(op, ps, g_in, c))  # DESIGN §3: fp32 math, one rounding
    if dtype == torch.bfloat16:
        # ATen's own bf16 sequence rounds each partial result (and the coefficient) to bf16:
        # it is within 2 bf16 ulps at the operands' scale of the fp32 result, and 1 for the
        # ops whose bf16 result is the fp32 one rounded once (L2 decay/prox, soft-threshold)
        want = ref(op, ps, g_in, c)[i]
        for a, b, p, g in zip(got[i], want, ps, gs):
            if op in ONCE_OPS:
                assert_bf16_close(a, b)
            else:
                fin = torch.isfinite(b)
                scale = operand_scale(op, p, g if op in GRAD_OPS else None, c, b)
                d = (a[fin].double() - b[fin].double()).abs() / bf16_spacing(scale[fin])
                assert d.max() <= 2 if d.numel() else True
                assert torch.equal(torch.isnan(a), torch.isnan(b))


@pytest.mark.parametrize("key", ["l1_grad", "en_grad", "l2_grad", "en_decay", "soft_div", "l2_prox"])
def test_many_tiny_tensors_one_launch(key, monkeypatch):
    """300 tiny tensors (the 2000-tensor benchmark set, scaled down for the interpreter)."""
    op, c = op_name(key), OPS[key]
    ps, gs = make([((64,), torch.float32)] * 150 + [((4, 8), torch.float32)] * 150, seed=3)
    g_in = gs if op in GRAD_OPS else None
    want = ref(op, ps, g_in, c)
    launches = Launches(monkeypatch)
    got = run(op, ps, g_in, c)
    assert launches.n == 1
    assert_bits(got[1 if op in GRAD_OPS else 0], want[1 if op in GRAD_OPS else 0])


@pytest.mark.parametrize("kind", ["l1", "l2", "en"])
@pytest.mark.parametrize("method", ["grad_", "decay_", "prox_"])
def test_penalty_hot_path_uses_triton_and_matches_reference_loop(kind, method, monkeypatch):
    pen = {"l1": tr.L1(1.0), "l2": tr.L2(1.0), "en": tr.ElasticNet(1.0, 0.3)}[kind]
    ps, gs = make([((s,), torch.float32) for s in (3, 100, 700)] + [((4, 6, 2), torch.float32)], seed=8)
    out = {}
    for impl in ("reference", "foreach"):
        p2, g2 = [p.clone() for p in ps], [g.clone() for g in gs]
        launches = Launches(monkeypatch)
        if method == "grad_":
            pen.grad_(p2, g2, 0.01, 0.5, impl=impl)
            out[impl] = g2
        else:
            getattr(pen, method)(p2, 0.01, 0.3, impl=impl)
            out[impl] = p2
        assert launches.n == (1 if impl == "foreach" else 0)
    assert_bits(out["foreach"], out["reference"])


def test_soft_threshold_exact_zeros_and_specials():
    p = torch.tensor([0.1, -0.1, 0.25, -0.25, 0.3, -0.3, float("nan"), float("inf"), 0.0, -0.0, 1e-42])
    want = p.clone().sub_(torch.clamp(p, -0.25, 0.25))
    kernels.soft_threshold_([p], 0.25)
    assert_bits([p], [want])
    assert (p[:4] == 0).all() and not torch.signbit(p[:4]).any()  # +0.0, as the reference


# --------------------------------------------------------------------------- row groups
def _f64_norm(p, dims):
    """The group norm summed in float64, rounded to fp32 (what the kernel computes)."""
    a = p.double()
    if p.dim() == 0:
        return a.abs().float()
    return torch.linalg.vector_norm(a, dim=dims, keepdim=True).float()


@pytest.fixture
def f64_norms(monkeypatch):
    """The single-tensor references, run with float64-accumulated group norms."""
    monkeypatch.setattr(_structured, "group_norm", _f64_norm)
    monkeypatch.setattr(_constraints, "group_norm", _f64_norm)


GROUP_SHAPES = [(5, 7), (40, 30), (3, 2, 4), (17,), (), (1, 9), (6, 1), (0, 3), (64, 33)]


def group_data(dtype, seed=0):
    """Row-group test tensors: random rows, an all-zero row, a row of subnormals, a row with
    values at the max-norm scale, whole zero tensors."""
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i, s in enumerate(GROUP_SHAPES):
        p = torch.randn(s, generator=g, dtype=torch.float64) * (0.05 if i % 2 else 1.0)
        if p.dim() >= 2 and p.shape[0] >= 3:
            p[1] = 0.0  # an all-zero group
            p[2] = 1e-40  # a group of subnormals (fp32)
        ps.append(p.to(dtype))
    ps.append(torch.zeros(4, 5, dtype=dtype))  # all groups zero
    return ps


def group_rules():
    return {
        "grouplasso": (tr.GroupLasso(0.7), "prox"),
        "sparsegrouplasso": (tr.SparseGroupLasso(0.7, 0.4), "prox"),
        "maxnorm": (tr.MaxNorm(0.9), "project"),
        "unitnorm": (tr.UnitNorm(), "project"),
    }


def _run_rule(rule, how, ps, impl):
    ps = [p.clone() for p in ps]
    if how == "prox":
        rule.prox_(ps, 0.7, 0.3, impl=impl)
    else:
        rule.project_(ps, impl=impl)
    return ps


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(group_rules()))
def test_row_groups_bit_identical_given_the_same_norm(name, dtype, f64_norms, monkeypatch):
    rule, how = group_rules()[name]
    ps = group_data(dtype)
    want = _run_rule(rule, how, ps, "reference")  # per tensor, float64-accumulated norms
    launches = Launches(monkeypatch)
    got = _run_rule(rule, how, ps, "foreach")
    assert launches.n == (2 if name == "sparsegrouplasso" else 1)  # SGL: soft-threshold + groups
    assert_bits(got, want)


@pytest.mark.parametrize("name", list(group_rules()))
def test_row_groups_close_to_fp32_reference(name):
    """Against the unmodified single-tensor reference (fp32-accumulated norms, a few ulps
    off): the same zeros, and values within the norm's rounding."""
    rule, how = group_rules()[name]
    ps = group_data(torch.float32, seed=1)
    kernels.set_backend("aten")
    want = _run_rule(rule, how, ps, "reference")
    kernels.set_backend("triton")
    got = _run_rule(rule, how, ps, "foreach")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7 * float(b.abs().max()) if b.numel() else 0.0)
        if name in ("maxnorm", "unitnorm"):  # no threshold: zeros exactly where θ is 0
            assert torch.equal(a == 0, b == 0)


def test_group_norms_are_float64_accurate():
    """The kernel's norm is the correctly summed one: a row of subnormals has a non-zero
    norm (fp32 squares would underflow), so UnitNorm scales it up by 1/(n + ε) ≈ 1e7."""
    p = torch.full((2, 64), 1e-30)
    q = p.clone()
    kernels.group_project_([q], lambda t: (1,), "unitnorm", eps=1e-7)
    n = _f64_norm(p, (1,))
    assert_bits([q], [p * (1 / (n + 1e-7))])


def test_group_layouts_other_than_rows_fall_back(monkeypatch):
    ps = [torch.randn(6, 5)]
    assert not kernels.group_shrink_(ps, lambda p: (0,), 0.1, 0.1)  # columns: not rows
    rule = tr.GroupLasso(0.5, dim=0)
    a, b = [ps[0].clone()], [ps[0].clone()]
    launches = Launches(monkeypatch)
    rule.prox_(a, 0.5, 0.2)  # the foreach path
    assert launches.n == 0
    rule.prox_(b, 0.5, 0.2, impl="reference")
    torch.testing.assert_close(a[0], b[0])


# --------------------------------------------------------------------------- dispatch
def test_auto_picks_triton_only_on_cuda():
    kernels.set_backend("auto")
    assert kernels.backend_for([torch.randn(3)]) != "triton"  # CPU, even under the interpreter
    kernels.set_backend("triton")
    assert kernels.backend_for([torch.randn(3)]) == "triton"
    assert kernels.backend_for([torch.randn(3, dtype=torch.float64)]) == "aten"


def test_declined_lists_fall_back(monkeypatch):
    """float64, non-contiguous and subclass tensors go to the ATen path, same result."""
    launches = Launches(monkeypatch)
    a64 = [torch.randn(10, dtype=torch.float64)]
    g64 = [torch.zeros(10, dtype=torch.float64)]
    kernels.l1_grad_(a64, g64, 2.0)
    assert torch.equal(g64[0], 2.0 * torch.sign(a64[0]))
    nc = [torch.randn(6, 8).t()]
    gnc = [torch.zeros(8, 6)]
    kernels.l1_grad_(nc, gnc, 2.0)
    assert torch.equal(gnc[0], 2.0 * torch.sign(nc[0]))
    assert launches.n == 0


def test_mixed_dtypes_one_launch_per_dtype(monkeypatch):
    ps = [torch.randn(40), torch.randn(40).bfloat16(), torch.randn(30), torch.randn(8, dtype=torch.float64)]
    want = [p.clone().sub_(torch.clamp(p, -0.1, 0.1)) if p.dtype != torch.bfloat16 else None for p in ps]
    launches = Launches(monkeypatch)
    kernels.soft_threshold_(ps, 0.1)
    assert launches.n == 2  # fp32 and bf16; float64 goes to aten
    assert_bits([ps[0], ps[2], ps[3]], [want[0], want[2], want[3]])


def test_version_counters_and_in_place():
    ps = [torch.randn(300), torch.randn(4, 5)]
    gs = [torch.zeros(300), torch.zeros(4, 5)]
    ptrs = [p.data_ptr() for p in ps]
    v_p, v_g = [p._version for p in ps], [g._version for g in gs]
    kernels.l1_grad_(ps, gs, 0.1)
    assert all(a > b for a, b in zip((g._version for g in gs), v_g))
    assert [p._version for p in ps] == v_p  # grad ops leave θ's counter alone
    kernels.soft_threshold_(ps, 0.1)
    kernels.group_project_(ps, lambda t: tuple(range(1, t.dim())) if t.dim() > 1 else (0,), "maxnorm", 1.0)
    assert all(a >= b + 2 for a, b in zip((p._version for p in ps), v_p))
    assert [p.data_ptr() for p in ps] == ptrs


def test_tables_are_cached_and_follow_new_storage():
    ktriton._tables.clear()
    ps = [torch.randn(10) for _ in range(20)]
    gs = [torch.zeros(10) for _ in range(20)]
    kernels.l1_grad_(ps, gs, 1.0)
    kernels.l1_grad_(ps, gs, 1.0)
    assert len(ktriton._tables) == 1  # the second call reuses the tables
    ps[3].data = torch.randn(17)  # new storage and size for one tensor
    gs[3] = torch.zeros(17)
    for g in gs:
        g.zero_()
    kernels.l1_grad_(ps, gs, 1.0)
    assert len(ktriton._tables) == 2
    for p, g in zip(ps, gs):
        assert torch.equal(g, torch.sign(p))


def test_set_backend_triton_needs_triton(monkeypatch):
    monkeypatch.setattr(ktriton, "_triton", False)
    monkeypatch.setattr(ktriton, "_import_error", "ImportError: no triton")
    kernels.set_backend("aten")
    with pytest.raises(RuntimeError, match="triton"):
        kernels.set_backend("triton")
    assert not kernels.triton_available()


def test_regularizer_steps_match_aten_backend():
    """A model trained a few steps with L1 prox, GroupLasso prox and MaxNorm through the
    Regularizer: Triton kernels and the ATen kernels give the same weights."""
    out = {}
    for be in ("aten", "triton"):
        kernels.set_backend(be)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
        reg = tr.Regularizer(
            model,
            [
                tr.L1(1e-2, mode="prox", on=tr.select.biases),
                tr.GroupLasso(5e-2, mode="prox"),
                tr.MaxNorm(1.5),
            ],
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        reg.attach(opt)
        x, y = torch.randn(32, 12), torch.randn(32, 3)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        out[be] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(out["triton"], out["aten"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
