"""The ``"triton"`` backend: multi-tensor Triton kernels, one launch per call (CUDA).

Every elementwise op (L1/L2/elastic-net grad, decay, prox) is one launch of
``elementwise_kernel`` over a flat chunk list (:class:`._batching.WorkList`: chunk j =
``(tensor, first element)``, ``BLOCK`` elements each) with a device table of the tensors'
data pointers; the group-norm prox of GroupLasso/SparseGroupLasso and the MaxNorm/UnitNorm
projections are one launch of ``row_group_kernel``, one program per row group
(:class:`._batching.RowGroups`). float32, bfloat16 and float16, fp32 math (bf16/fp16:
the fp32 result rounded once; the kernels round bf16 themselves, to nearest even).

No host sync: scalars are kernel arguments, and the int64 tables are built on the host
only when a list's layout is new (a cache keyed by the data pointers and sizes, so a
training loop builds them once) and copied with a non-blocking copy from pinned memory.
During CUDA-graph capture a new layout falls back to the ``torch._foreach_*`` path.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter, for the tests: the mode is read when the kernels are first needed in that
mode, so setting the variable before the first call is enough). Anything else — float64,
non-contiguous tensors, tensor subclasses such as DTensor, a group layout other than
rows or whole tensors — returns False and the caller uses the foreach path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import struct
import threading
import warnings
from operator import attrgetter
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import _batching as B

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
OPS = {
    "l2_grad": 0,
    "l1_grad": 1,
    "en_grad": 2,
    "l2_decay": 3,
    "l1_decay": 4,
    "en_decay": 5,
    "l2_prox": 6,
    "soft": 7,  # 8: soft-threshold then divide
}
KINDS = {"shrink": 0, "maxnorm": 1, "unitnorm": 2}
_PLAIN = (Tensor, nn.Parameter)
_shape = attrgetter("shape")

_lock = threading.Lock()
_import_error: str | None = None
_triton: Any = None  # the triton package once imported; False if it does not import
_src: dict[bool, ModuleType] = {}  # interpret? -> the kernels module
_tables: B.LRU = B.LRU(128)
_broken: str | None = None  # set when a compiled launch failed under "auto"


def importable() -> bool:
    """Whether ``import triton`` works (tried once per process)."""
    global _triton, _import_error
    if _triton is None:
        try:
            import triton

            _triton = triton
        except Exception as e:  # ImportError, or a broken install
            _triton, _import_error = False, f"{type(e).__name__}: {e}"
    return bool(_triton)


def import_error() -> str | None:
    return _import_error


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels run in Triton's interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def runs_on(p: Tensor, explicit: bool) -> bool:
    """Whether this backend takes a list whose first tensor is ``p``: a float32/bf16/fp16
    CUDA tensor (and, chosen explicitly, a CPU tensor under the interpreter)."""
    if p.dtype not in DTYPES:
        return False
    dev = p.device.type
    if dev == "cuda":
        return _broken is None or explicit
    return dev == "cpu" and explicit and interpreting()


def _kernels() -> ModuleType:
    """The kernels module for the current mode, executed once per mode."""
    mode = interpreting()
    mod = _src.get(mode)
    if mod is None:
        with _lock:
            mod = _src.get(mode)
            if mod is None:
                path = Path(__file__).with_name("_triton_src.py")
                name = f"torch_regularizers.kernels._triton_src_{'interp' if mode else 'jit'}"
                spec = importlib.util.spec_from_file_location(name, str(path))
                assert spec is not None and spec.loader is not None
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                _src[mode] = mod
    return mod


def _usable(ts: list[Tensor], dtype: torch.dtype, device: torch.device) -> bool:
    """Plain tensors of one dtype and device, contiguous (checked when a layout is new)."""
    for t in ts:
        if t.__class__ not in _PLAIN or t.dtype != dtype or t.device != device or not t.is_contiguous():
            return False
        if t.is_inference():  # its version counter cannot be bumped
            return False
    return True


def _ptrs(ts: list[Tensor]) -> tuple[int, ...] | None:
    try:
        return tuple(map(Tensor.data_ptr, ts))
    except (RuntimeError, TypeError):  # no storage (a DTensor, a fake or meta tensor, ...)
        return None


def _device_table(host: Tensor, device: torch.device) -> Tensor | None:
    """``host`` (int64, CPU) on ``device`` without a host sync; None during graph capture."""
    if device.type == "cpu":
        return host
    if torch.cuda.is_current_stream_capturing():
        return None
    return host.pin_memory().to(device, non_blocking=True)


def _packed(parts: list[Tensor], device: torch.device) -> list[Tensor] | None:
    """int64 host tables as views of one device tensor (one copy), each padded to an even
    length so that every view is 16-byte aligned (Triton specializes kernels on pointer
    alignment: unaligned views would compile extra variants). None during graph capture."""
    sizes = [t.numel() for t in parts]
    padded = [t if n % 2 == 0 else torch.cat([t, t.new_zeros(1)]) for t, n in zip(parts, sizes)]
    dev = _device_table(torch.cat(padded), device)
    if dev is None:
        return None
    out, lo = [], 0
    for t, n in zip(padded, sizes):
        out.append(dev[lo : lo + n])
        lo += t.numel()
    return out


def _block(numels: list[int], lo: int, hi: int) -> int:
    m = max(numels) if numels else 1
    return max(lo, min(hi, 1 << max(0, (m - 1).bit_length())))


def _launch(kernel: Any, grid: tuple, device: torch.device, *args: Any, **meta: Any) -> None:
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        kernel[grid](*args, **meta, enable_fp_fusion=False)


def _guarded(run: Callable[[], None], explicit: bool) -> bool:
    """Run a launch; under ``"auto"`` a failing compiled launch (no usable GPU compiler,
    ...) disables this backend for the process with a warning and returns False."""
    global _broken
    if explicit or interpreting():
        run()
        return True
    try:
        run()
    except Exception as e:  # compilation / driver problems: fall back to foreach
        _broken = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"torch_regularizers: the Triton kernels failed ({_broken}); using the "
            "torch._foreach_* kernels from now on",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    return True


def _split64(x: float) -> tuple[int, int]:
    """A float64 as two signed int32 words (hi, lo) for the kernels' ``_f64``."""
    (bits,) = struct.unpack("<q", struct.pack("<d", x))
    hi, lo = bits >> 32, bits & 0xFFFFFFFF
    return hi, lo - (1 << 32) if lo >= 1 << 31 else lo


# --------------------------------------------------------------------------- elementwise
def apply(op: str, ps: list[Tensor], gs: list[Tensor] | None, c: tuple, explicit: bool) -> bool:
    """``op`` on a list in one launch; False when the list is not for this backend.

    The per-call host work is what a cache lookup needs — the data pointers and sizes
    (two or three C-level passes over the list); dtypes, devices and contiguity are checked
    when a layout (pointers + sizes) is new. A tensor that keeps its address and size is
    assumed to keep its dtype and strides (``p.data = p.data.t()`` on a square matrix would
    not be noticed: don't).
    """
    p0 = ps[0]
    dtype, device = p0.dtype, p0.device
    pptr = _ptrs(ps)
    gptr = pptr if gs is None else _ptrs(gs)
    if pptr is None or gptr is None:
        return False
    numels = tuple(map(Tensor.numel, ps))
    key = ("ew", device, dtype, pptr, None if gs is None else gptr, numels)
    tab = _tables.get_(key)
    if tab is None:
        if not _usable(ps, dtype, device) or (gs is not None and not _usable(gs, dtype, device)):
            return False
        if gs is not None and tuple(map(Tensor.numel, gs)) != numels:
            return False
        block = _block(numels, 128, 4096)
        wl = B.WorkList(numels, block)
        segs = _packed([torch.tensor(pptr, dtype=torch.int64), torch.tensor(gptr, dtype=torch.int64), wl.numels, wl.tensor, wl.start], device)
        if segs is None:
            return False
        tab = _tables.put(key, (*segs, len(wl), block))
    *tables, nchunks, block = tab
    if nchunks == 0:
        return True
    code = OPS[op] + (1 if op == "soft" and c[1] != 1.0 else 0)
    c0 = float(c[0])
    c1 = float(c[1]) if len(c) > 1 else 0.0
    k = _kernels().elementwise_kernel
    ok = _guarded(
        lambda: _launch(k, (nchunks,), device, *tables, c0, c1, OP=code, DT=DTYPES[dtype], BLOCK=block, num_warps=8 if block >= 2048 else 4),
        explicit,
    )
    if ok:
        torch.autograd.graph.increment_version(ps if gs is None else gs)
    return ok


# --------------------------------------------------------------------------- row groups
def _rows_cols(p: Tensor, dims: tuple[int, ...]) -> tuple[int, int] | None:
    """(groups, elements per group) when the groups are contiguous rows or the whole tensor."""
    nd = p.dim()
    if tuple(dims) == tuple(range(nd)):
        return (1, p.numel()) if p.numel() else (0, 0)
    if nd >= 2 and tuple(dims) == tuple(range(1, nd)):
        rows = p.shape[0]
        return (rows, p.numel() // rows) if p.numel() else (0, 0)
    return None


def group_scale(
    kind: str,
    ps: list[Tensor],
    dims_of: Callable[[Tensor], tuple[int, ...]],
    explicit: bool,
    lam: float = 0.0,
    eta: float = 0.0,
    max_value: float = 0.0,
    eps: float = 0.0,
) -> bool:
    """θ_g ← θ_g · factor(‖θ_g‖) for every row group of every tensor, in one launch.

    ``kind``: ``"shrink"`` (GroupLasso prox: max(0, 1 − η·λ·√size / ‖θ_g‖)), ``"maxnorm"``,
    ``"unitnorm"`` (see :mod:`._triton_src`). False when the list is not for this backend.
    """
    p0 = ps[0]
    dtype, device = p0.dtype, p0.device
    pptr = _ptrs(ps)
    if pptr is None:
        return False
    # the groups follow from the shapes and the rule's dims (its ``dim`` and the layouts
    # recorded at bind time): cached per rule, so ``dims_of`` runs when a layout is new
    owner = getattr(dims_of, "__self__", dims_of)
    key = ("rg", device, dtype, id(owner), repr(getattr(owner, "dim", None)), pptr, tuple(map(_shape, ps)))
    tab = _tables.get_(key)
    if tab is None:
        if not _usable(ps, dtype, device):
            return False
        rc = []
        for p in ps:
            r = _rows_cols(p, dims_of(p))
            if r is None:
                return False
            rc.append(r)
        rows = [r for r, _ in rc]
        cols = [c for _, c in rc]
        rg = B.RowGroups(rows, cols)
        sq = torch.tensor([float(c) ** 0.5 for c in cols], dtype=torch.float64).view(torch.int64)
        segs = _packed([torch.tensor(pptr, dtype=torch.int64), rg.cols, sq, rg.tensor, rg.start], device)
        if segs is None:
            return False
        tab = _tables.put(key, (*segs, len(rg), _block(cols, 16, 2048)))
    *tables, ngroups, block = tab
    if ngroups == 0:
        return True
    a_hi, a_lo = _split64(float(lam))
    b_hi, b_lo = _split64(float(eta))
    tiny = torch.finfo(torch.float32).tiny
    k = _kernels().row_group_kernel
    ok = _guarded(
        lambda: _launch(
            k, (ngroups,), device, *tables, a_hi, a_lo, b_hi, b_lo, float(max_value), float(eps), tiny,
            KIND=KINDS[kind], DT=DTYPES[dtype], BLOCK=block, num_warps=4,
        ),
        explicit,
    )
    if ok:
        torch.autograd.graph.increment_version(ps)
    return ok
