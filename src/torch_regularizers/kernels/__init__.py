r"""Fast multi-tensor kernels for the penalties' hot path (docs/design.md §4).

Every function works in place on a list of tensors (one device; any mix of dtypes is
accepted, one dtype is fastest), under ``torch.no_grad()``, and never allocates a
temporary the size of the model. The math of each is in its docstring; the penalties'
``_foreach_*`` methods call them and the single-tensor reference methods of
:mod:`torch_regularizers.penalties` are the ground truth the tests compare them with.

Backends — one module each; :func:`backend_for` (below) picks one per call:

``"aten"`` (:mod:`.aten`)
    stock ATen ops: on CPU through reused scratch buffers and gathered batches of small
    tensors; on other devices the plain ``torch._foreach_*`` sequences.
``"native"`` (:mod:`.native`)
    fused C++ kernels for float32/float64 contiguous CPU tensors: one pass over θ (and g)
    per penalty, one OpenMP parallel region per call over the flattened list, whatever
    the number of tensors. Built on request (``build_native()``, ~30 s once, cached on disk).
``"triton"`` (:mod:`.triton`)
    multi-tensor Triton kernels for float32/bf16/fp16 CUDA tensors: one launch per call
    (elementwise penalties, and the row-group norms of GroupLasso/SparseGroupLasso prox and
    the MaxNorm/UnitNorm projections), fp32 math, no host sync. Needs ``triton``
    (``pip install torch-regularizers[triton]``).
``"auto"`` (default)
    ``"triton"`` on CUDA tensors when ``triton`` imports; on CPU ``"native"`` if it is
    already built (in this process or in the on-disk cache, so nothing is ever compiled
    implicitly); else ``"aten"``.

Set with :func:`set_backend` or the environment variable ``TORCH_REGULARIZERS_KERNELS``. A
backend that cannot take a list (float64 on CUDA, non-contiguous tensors, a DTensor, ...)
hands it to ``"aten"``. The work-list and batching helpers the backends share are in
:mod:`._batching`.

Results: float32/float64 are identical bit for bit across the CPU backends and to the
reference loop, except that soft-thresholding with ``"aten"`` on CPU (``softshrink``) leaves
``-0.0`` where the reference ``θ − clamp(θ, −t, t)`` leaves ``+0.0`` (equal under ``==``);
the Triton kernels follow the reference's op sequence (bit-identical to it in the tests,
on the CPU reference) except the group norms, which they sum in float64 (docs/design.md §4).
"""

from __future__ import annotations

import operator
import os
import warnings
from array import array
from collections.abc import Sequence
from itertools import repeat
from typing import Any, Callable

import torch
from torch import Tensor

from . import _batching, aten, native
from . import triton as _triton

__all__ = [
    "BACKENDS",
    "all_trainable",
    "backend_for",
    "build_native",
    "elastic_decay_",
    "elastic_grad_",
    "get_backend",
    "group_project_",
    "group_shrink_",
    "l1_decay_",
    "l1_grad_",
    "l2_decay_",
    "l2_grad_",
    "l2_prox_",
    "live_grads",
    "native_available",
    "set_backend",
    "soft_threshold_",
    "triton_available",
    "versions",
]

BACKENDS = ("auto", "aten", "native", "triton")


class _State:
    backend: str = "auto"
    native: Any = None  # None: not looked up yet; False: unavailable; else the module


_state = _State()


# --------------------------------------------------------------------------- the choice
def backend_for(ts: Sequence[Tensor]) -> str:
    """The backend that runs a call on this one-dtype list: ``"triton"``, ``"native"`` or
    ``"aten"`` (judged on the first tensor; a backend that then declines the list — a
    non-contiguous tensor, say — hands the call to ``"aten"``)."""
    name = _state.backend
    if name == "aten" or not ts:
        return "aten"
    p = ts[0]
    if name != "native" and _triton.runs_on(p, name == "triton") and _triton.importable():
        return "triton"
    if name != "triton" and native.usable(list(ts[:1])) and _native_module() is not None:
        return "native"
    return "aten"


def _native_module() -> Any:
    """The native module (``"native"``: built now if needed; ``"auto"``: only if built)."""
    mod = _state.native
    if mod is None:
        try:
            mod = native.load(build=_state.backend == "native")
        except RuntimeError as e:
            warnings.warn(f"{e}; using the ATen kernels", RuntimeWarning, stacklevel=4)
            mod = None
        mod = _state.native = mod if mod is not None else False
    return mod or None


def _apply(ps: list[Tensor], gs: list[Tensor] | None, op: str, c: tuple, scratch: Tensor | None = None) -> None:
    """Run ``op`` with the backend chosen for the list, one dtype at a time (the fused
    backends check every tensor themselves and decline a mixed list, which is then split)."""
    if not ps:
        return
    be = backend_for(ps)
    if be == "triton" and _triton.apply(op, ps, gs, c, _state.backend == "triton"):
        return
    if be == "native" and native.apply(_state.native, op, ps, gs, c):
        return
    if not _batching.one_dtype(ps):
        for idx in _batching.by_dtype(ps):
            _apply(_batching.pick(ps, idx), None if gs is None else _batching.pick(gs, idx), op, c, scratch)
        return
    aten.apply(op, ps, gs, c, scratch)


_GRAD = operator.attrgetter("grad")
_TRAINABLE = operator.attrgetter("requires_grad")


def _bookkeeping(name: str, ts: Any) -> Callable | None:
    """A native per-step helper (``live_grads``/``all_trainable``/``versions``) if it may be
    used: the module is loaded, the backend is not ``"aten"`` (which times what a user gets
    without the native build), ``ts`` is a list and no ``TorchFunctionMode`` is active (the
    C loop reads attributes without dispatching)."""
    if _state.backend == "aten" or type(ts) is not list or torch._C._is_torch_function_mode_enabled():
        return None
    mod = _state.native if _state.native is not None else _native_module()
    return getattr(mod, name, None) if mod else None


def live_grads(params: list[Tensor]) -> list[Tensor] | None:
    """``[p.grad for p in params]`` if every parameter is trainable and has a gradient (the
    common optimizer step), else None — the Regularizer's per-step bookkeeping.

    With the native module loaded (and a backend other than ``"aten"``) one C loop over the
    list (~25 ns per tensor); else, or when an item is a tensor subclass (whose ``.grad``
    may go through ``__torch_function__``), three C-level ``map`` passes (~120 ns per tensor).
    """
    fast = _bookkeeping("live_grads", params)
    if fast is not None:
        got = fast(params)
        if got is not None:
            return got or None
    gs = list(map(_GRAD, params))
    if all(map(operator.is_not, gs, repeat(None))) and all(map(_TRAINABLE, params)):
        return gs
    return None


def all_trainable(params: list[Tensor]) -> bool:
    """Whether every parameter requires grad (natively when it may, see :func:`live_grads`)."""
    fast = _bookkeeping("all_trainable", params)
    got = fast(params) if fast is not None else None
    return all(map(_TRAINABLE, params)) if got is None else got


_VERSION = operator.attrgetter("_version")


def versions(tensors: list[Tensor]) -> array:
    """The version counters (``t._version``) of ``tensors``, as an ``array('q')`` (natively
    when it may, see :func:`live_grads`)."""
    fast = _bookkeeping("versions", tensors)
    got = fast(tensors) if fast is not None else None
    out = array("q")
    if got is None:
        out.extend(map(_VERSION, tensors))
    else:
        out.frombytes(got)
    return out


# --------------------------------------------------------------------------- settings
def set_backend(name: str) -> None:
    """Pick the kernels: ``"auto"`` (default), ``"aten"``, ``"native"`` or ``"triton"``.

    ``"native"`` builds the C++ kernels now if they are not cached (~30 s once) and raises
    ``RuntimeError`` if that fails; ``"triton"`` raises ``RuntimeError`` if ``triton``
    does not import.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS}")
    if name == "triton" and not _triton.importable():
        raise RuntimeError(
            f"torch_regularizers: the triton backend needs the triton package "
            f"(pip install torch-regularizers[triton]): {_triton.import_error()}"
        )
    _state.backend = name
    if _state.native is False:  # looked up and unavailable: look again (it may be built now)
        _state.native = None
    if name == "native":
        _state.native = native.load(build=True)


def get_backend() -> str:
    """The backend setting (one of ``BACKENDS``)."""
    return _state.backend


def build_native(verbose: bool = False) -> bool:
    """Build (or load from the cache) the fused C++ kernels; ``"auto"`` uses them from then on.

    Returns True. Raises ``RuntimeError`` when no C++ toolchain can build them.
    """
    _state.native = native.load(build=True, verbose=verbose)
    return True


def native_available() -> bool:
    """Whether the fused kernels are loaded or loadable without compiling."""
    return native.is_built()


def triton_available() -> bool:
    """Whether the Triton backend can be used (``triton`` imports)."""
    return _triton.importable()


_env = os.environ.get("TORCH_REGULARIZERS_KERNELS")
if _env in BACKENDS:
    _state.backend = _env  # "native" is built lazily, on the first call that can use it


# --------------------------------------------------------------------------- L2
@torch.no_grad()
def l2_grad_(params: Sequence[Tensor], grads: Sequence[Tensor], coef: float) -> None:
    r"""g ← g + c·θ  (L2 in ``"grad"`` mode: c = scale·λ; torch's ``grad.add(param, alpha=wd)``).

    Bit-identical to ``torch._foreach_add_(grads, params, alpha=c)`` — the floor itself —
    and to ``g.add_(θ, alpha=c)`` (an fma per element).
    """
    _apply(list(params), list(grads), "l2_grad", (float(coef),))


@torch.no_grad()
def l2_decay_(params: Sequence[Tensor], factor: float) -> None:
    r"""θ ← f·θ  (L2 decoupled: f = 1 − η·λ, AdamW's ``param.mul_(1 - lr * wd)``).

    float32/float64: bit-identical to ``torch._foreach_mul_(params, factor)`` (AdamW foreach)
    and to ``p.mul_(factor)``; bf16/fp16: fp32 math, rounded once (see ``aten.scalar_like``).
    """
    _apply(list(params), None, "l2_decay", (float(factor),))


@torch.no_grad()
def l2_prox_(params: Sequence[Tensor], divisor: float) -> None:
    r"""θ ← θ / d  (prox of ½λ‖θ‖² with step η: d = 1 + η·λ).

    float32/float64: bit-identical to ``p.div_(d)``; bf16/fp16: fp32 math, rounded once.
    """
    _apply(list(params), None, "l2_prox", (float(divisor),))


# --------------------------------------------------------------------------- L1 / elastic net
@torch.no_grad()
def l1_grad_(
    params: Sequence[Tensor], grads: Sequence[Tensor], coef: float, scratch: Tensor | None = None
) -> None:
    r"""g ← g + c·sign(θ)  (L1 in ``"grad"`` mode: c = scale·λ; sign(0) = 0).

    Same ops per element as ``g.add_(torch.sign(θ), alpha=c)``: bit-identical to it.
    ``scratch`` (optional): a 1-D buffer of θ's dtype for the ATen chunked path; by default
    a per-thread buffer of at most ``_batching.CHUNK`` elements.
    """
    _apply(list(params), list(grads), "l1_grad", (float(coef),), scratch)


@torch.no_grad()
def l1_decay_(params: Sequence[Tensor], coef: float, scratch: Tensor | None = None) -> None:
    r"""θ ← θ + c·sign(θ)  (L1 decoupled: c = −η·λ; a subgradient step, zeros stay 0).

    Bit-identical to ``θ.add_(torch.sign(θ), alpha=c)``.
    """
    _apply(list(params), None, "l1_decay", (float(coef),), scratch)


@torch.no_grad()
def elastic_grad_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    coef_l1: float,
    coef_l2: float,
    scratch: Tensor | None = None,
) -> None:
    r"""g ← (g + a·sign(θ)) + b·θ  (elastic net grad: a = scale·α·ρ, b = scale·α·(1 − ρ)).

    Bit-identical to ``g.add_(torch.sign(θ), alpha=a); g.add_(θ, alpha=b)``.
    """
    _apply(list(params), list(grads), "en_grad", (float(coef_l1), float(coef_l2)), scratch)


@torch.no_grad()
def elastic_decay_(
    params: Sequence[Tensor], factor: float, coef_l1: float, scratch: Tensor | None = None
) -> None:
    r"""θ ← f·θ + a·sign(θ_old)  (elastic net decoupled: f = 1 − η·α·(1 − ρ), a = −η·α·ρ).

    Bit-identical to ``s = torch.sign(θ); θ.mul_(f); θ.add_(s, alpha=a)``.
    """
    _apply(list(params), None, "en_decay", (float(factor), float(coef_l1)), scratch)


@torch.no_grad()
def soft_threshold_(
    params: Sequence[Tensor], t: float, divisor: float = 1.0, scratch: Tensor | None = None
) -> None:
    r"""θ ← (θ − clamp(θ, −t, t)) / d: soft-thresholding, then shrinking.

    ``θ − clamp(θ, −t, t)`` = sign(θ)·max(|θ| − t, 0): the prox of t·‖θ‖₁, with exact zeros
    where |θ| ≤ t (NaN stays NaN). ``d`` = 1 + η·α·(1 − ρ) makes it the elastic-net prox;
    ``d = 1`` skips the division. Bit-identical to ``θ.sub_(torch.clamp(θ, min=-t, max=t))``
    then ``θ.div_(d)``, except the sign of zero with the ``"aten"`` backend on CPU (module doc).
    """
    t, divisor = float(t), float(divisor)
    params = list(params)
    if not t >= 0:  # a negative threshold: keep the reference's exact clamp semantics
        for p in params:
            p.sub_(torch.clamp(p, min=-t, max=t))
        if divisor != 1.0:
            l2_prox_(params, divisor)
        return
    _apply(params, None, "soft", (t, divisor), scratch)


# --------------------------------------------------------------------------- row groups
def _group(kind: str, params: Sequence[Tensor], dims_of: Callable[[Tensor], tuple[int, ...]], **kw: float) -> bool:
    params = list(params)
    if not params:
        return True
    if backend_for(params) != "triton":  # O(1): judged on the first tensor
        return False
    with torch.no_grad():  # (a mixed-dtype list is declined when its layout is checked)
        return _triton.group_scale(kind, params, dims_of, _state.backend == "triton", **kw)


def group_shrink_(
    params: Sequence[Tensor], dims_of: Callable[[Tensor], tuple[int, ...]], lam: float, eta: float
) -> bool:
    r"""θ_g ← θ_g·max(0, 1 − η·(λ·√size_g) / ‖θ_g‖)  (GroupLasso prox), in one launch.

    ``dims_of(p)``: the reduced dims of ``p``'s groups. Only the ``"triton"`` backend has this
    kernel (rows or whole tensors as groups); returns False, doing nothing, when it does not
    apply, and the caller runs its ATen path (``structured.foreach_group_map``).
    """
    return _group("shrink", params, dims_of, lam=float(lam), eta=float(eta))


def group_project_(
    params: Sequence[Tensor],
    dims_of: Callable[[Tensor], tuple[int, ...]],
    kind: str,
    max_value: float = 0.0,
    eps: float = 1e-7,
) -> bool:
    r"""MaxNorm (``kind="maxnorm"``: θ_g ← θ_g·m/(‖θ_g‖ + ε) where ‖θ_g‖ > m) or UnitNorm
    (``"unitnorm"``: θ_g ← θ_g/(‖θ_g‖ + ε)) in one launch; False as for :func:`group_shrink_`."""
    return _group(kind, params, dims_of, max_value=float(max_value), eps=float(eps))
