"""The Triton kernels compile for real GPUs, without one: ahead-of-time compilation of
every kernel variant (op × dtype) to PTX for sm_80 (A100) and sm_90 (H100/H200) with the
``ptxas`` that ships with ``triton``.

The interpreter (``test_triton.py``) checks the math but not what only the compiler
enforces (which globals a kernel may read, typing of pointer casts, ...), and the
generated code shows that the rounding is the reference's: IEEE division and square root
(``div.rn``, ``sqrt.rn``) and no approximate ones, and the explicit ``fma`` where ATen
fuses a multiply-add.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

from torch_regularizers.kernels import triton as ktriton  # noqa: E402

EW_SIG = {
    "p_tab": "*i64",
    "g_tab": "*i64",
    "numel_tab": "*i64",
    "chunk_tensor": "*i64",
    "chunk_start": "*i64",
    "c0": "fp32",
    "c1": "fp32",
    "OP": "constexpr",
    "DT": "constexpr",
    "BLOCK": "constexpr",
}
RG_SIG = {
    "p_tab": "*i64",
    "cols_tab": "*i64",
    "sq_tab": "*i64",
    "group_tensor": "*i64",
    "group_start": "*i64",
    "a_hi": "i32",
    "a_lo": "i32",
    "b_hi": "i32",
    "b_lo": "i32",
    "m": "fp32",
    "eps": "fp32",
    "tiny": "fp32",
    "KIND": "constexpr",
    "DT": "constexpr",
    "BLOCK": "constexpr",
}
APPROX = ("div.full", "div.approx", "sqrt.approx", "rcp.approx", ".ftz")


@pytest.fixture(scope="module")
def compiled_mode_kernels():
    """The kernels as ``@triton.jit`` defines them outside the interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set for the whole run")
    return ktriton._kernels()


def _compile(fn, sig, constexprs, arch, num_warps):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    try:
        return triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "enable_fp_fusion": False}
        )
    except (FileNotFoundError, PermissionError) as e:  # no ptxas in this triton build
        pytest.skip(f"no CUDA toolchain in this triton install: {e}")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dt", [0, 1, 2], ids=["fp32", "bf16", "fp16"])
def test_elementwise_kernel_compiles(compiled_mode_kernels, arch, dt):
    k = compiled_mode_kernels.elementwise_kernel
    for op in range(9):
        ptx = _compile(k, EW_SIG, {"OP": op, "DT": dt, "BLOCK": 4096}, arch, 8).asm["ptx"]
        assert not any(a in ptx for a in APPROX), (op, dt)
        if op in (0, 1, 2, 4, 5):  # grad ops, L1/EN decay: ATen's add(alpha) is an fma
            assert "fma.rn.f32" in ptx, op
        if op in (6, 8):  # L2 prox, soft-threshold + divide: IEEE division
            assert "div.rn.f32" in ptx, op


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dt", [0, 1, 2], ids=["fp32", "bf16", "fp16"])
def test_row_group_kernel_compiles(compiled_mode_kernels, arch, dt):
    k = compiled_mode_kernels.row_group_kernel
    for kind in range(3):
        ptx = _compile(k, RG_SIG, {"KIND": kind, "DT": dt, "BLOCK": 1024}, arch, 4).asm["ptx"]
        assert not any(a in ptx for a in APPROX), (kind, dt)
        assert "sqrt.rn.f64" in ptx and "div.rn.f32" in ptx
        assert "fma.rn.f32" not in ptx  # 1 − reciprocal·thr: two roundings, as the reference
