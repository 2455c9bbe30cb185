r"""Fast multi-tensor kernels for the elementwise penalties (L2, L1, elastic net).

Every function works in place on a list of tensors (one device; any mix of dtypes is
accepted, one dtype is fastest), under ``torch.no_grad()``, and never allocates a
temporary the size of the model. The math of each is in its docstring; the penalties'
``_foreach_*`` methods call them and the single-tensor reference methods of
:mod:`torch_regularizers.penalties` are the ground truth the tests compare them with.

Why they exist (docs/design.md §8, measured on a 2-core CPU): ``torch._foreach_sign(θ)`` makes
a model-sized temporary (allocation + page faults: 2–10× the floor pass), every extra
elementwise pass costs about one floor pass, and on CPU each ``_foreach_*`` op is a loop
over tensors, so with thousands of tiny tensors each op costs about one floor.

Backends (``set_backend`` or the environment variable ``TORCH_REGULARIZERS_KERNELS``):

``"aten"``
    stock ATen ops only. On CPU, big tensors (``SMALL`` elements or more) go through a
    reused scratch buffer of at most ``CHUNK`` elements (``torch.sign(θ_chunk,
    out=scratch)`` then ``add_``); small tensors are gathered (``torch.cat``) into flat
    scratch in batches of at most ``BATCH`` elements, updated there with a few ops,
    and scattered back with one ``_foreach_add_``/``_foreach_copy_``
    through cached views, so the per-tensor cost is about that of the floor itself;
    soft-thresholding is one in-place ``softshrink``; L2's ``mul_``/``div_`` take a 0-d
    tensor of the parameters' dtype (a Python scalar costs a wrapped-scalar allocation
    per tensor). Other devices: the plain ``torch._foreach_*`` sequences (multi-tensor
    CUDA kernels, whose temporaries come from the caching allocator).
``"native"``
    fused C++ kernels (:mod:`torch_regularizers._native`): one pass over θ (and g) per
    penalty and one parallel region per call, whatever the number of tensors; built on
    first use (~30 s, cached on disk). float32/float64 contiguous CPU tensors; anything
    else falls back to ``"aten"``. Bit-identical to ``"aten"`` (tested).
``"auto"`` (default)
    ``"native"`` if it is already built (in this process or in the on-disk cache, so
    nothing is ever compiled implicitly), else ``"aten"``. ``build_native()`` builds it.

Enable the native kernels once per machine with ``torch_regularizers.kernels.build_native()``
(or ``python -m torch_regularizers bench --native``); ``"auto"`` then uses them in every
later process. Results are identical bit for bit across backends and to the reference
loop for float32/float64, except that soft-thresholding with the ``"aten"`` backend on CPU
(``softshrink``) leaves ``-0.0`` where the reference ``θ − clamp(θ, −t, t)`` leaves
``+0.0`` (equal under ``==`` and ``torch.equal``; both are exact zeros).
"""

from __future__ import annotations

import os
import threading
import warnings
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from itertools import accumulate
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from . import _native
from ._precision import LOW_PRECISION

__all__ = [
    "BACKENDS",
    "build_native",
    "elastic_decay_",
    "elastic_grad_",
    "get_backend",
    "l1_decay_",
    "l1_grad_",
    "l2_decay_",
    "l2_grad_",
    "l2_prox_",
    "native_available",
    "set_backend",
    "soft_threshold_",
]

BACKENDS = ("auto", "aten", "native")

#: elements per slice of a big tensor in the sign-based updates (16 MiB of float32): the
#: scratch buffer stays at most this big, and each slice costs one OpenMP parallel region
#: per op (on a busy machine every region can wait for a descheduled thread, so slices
#: are not made smaller than they need to be).
CHUNK = 1 << 22
#: elements per gathered batch of small tensors (4 MiB of float32 per flat buffer).
BATCH = 1 << 20
#: tensors with fewer elements are gathered into flat scratch on CPU (the "aten" path),
#: where a handful of ops handle a whole batch instead of one dispatch per tensor per op.
SMALL = 1 << 14

_NATIVE_DTYPES = (torch.float32, torch.float64)


class _State:
    backend: str = "auto"
    native: Any = None  # None: not looked up yet; False: unavailable; else the module


_state = _State()
_tls = threading.local()


def set_backend(name: str) -> None:
    """Pick the kernels: ``"auto"`` (default), ``"aten"`` or ``"native"`` (module doc).

    ``"native"`` builds the C++ kernels now if they are not cached (~30 s once) and
    raises ``RuntimeError`` if that fails.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS}")
    _state.backend = name
    _state.native = None
    if name == "native":
        _state.native = _native.load(build=True)


def get_backend() -> str:
    """The backend setting (``"auto"``, ``"aten"`` or ``"native"``)."""
    return _state.backend


def build_native(verbose: bool = False) -> bool:
    """Build (or load from the cache) the fused C++ kernels; ``"auto"`` uses them from then on.

    Returns True. Raises ``RuntimeError`` when no C++ toolchain can build them.
    """
    _state.native = _native.load(build=True, verbose=verbose)
    return True


def native_available() -> bool:
    """Whether the fused kernels are loaded or loadable without compiling."""
    return _native.is_built()


_env = os.environ.get("TORCH_REGULARIZERS_KERNELS")
if _env in BACKENDS and _env != "native":
    _state.backend = _env
elif _env == "native":
    _state.backend = "native"  # built lazily, on the first call that can use it


def _native_for(params: Sequence[Tensor]) -> Any:
    """The native module when it applies to these tensors (judged on the first), else None."""
    if _state.backend == "aten" or not params:
        return None
    p0 = params[0]
    if p0.device.type != "cpu" or p0.dtype not in _NATIVE_DTYPES:
        return None
    mod = _state.native
    if mod is None:
        try:
            mod = _native.load(build=_state.backend == "native")
        except RuntimeError as e:
            warnings.warn(f"{e}; using the ATen kernels", RuntimeWarning, stacklevel=3)
            mod = None
        mod = _state.native = mod if mod is not None else False
    return mod or None


class _Buffers:
    """Per-thread scratch: for each (dtype, device), ``nbuf`` flat buffers that only grow
    (up to ``CHUNK`` or ``BATCH`` elements, the biggest chunk or batch processed), and a
    generation number bumped on growth so that cached views of old buffers are never used."""

    def __init__(self) -> None:
        self.bufs: dict[tuple, tuple[int, list[Tensor]]] = {}
        self.plans: OrderedDict[tuple, _Plan] = OrderedDict()

    def get(self, like: Tensor, n: int, nbuf: int) -> tuple[int, list[Tensor]]:
        key = (like.dtype, like.device)
        gen, bufs = self.bufs.get(key, (0, []))
        if len(bufs) < nbuf or bufs[0].numel() < n:
            size = max(n, 4096, bufs[0].numel() if bufs else 0)
            bufs = [torch.empty(size, dtype=like.dtype, device=like.device) for _ in range(max(nbuf, len(bufs)))]
            gen += 1
            self.bufs[key] = (gen, bufs)
        return gen, bufs


def _state_bufs() -> _Buffers:
    b = getattr(_tls, "b", None)
    if b is None:
        b = _tls.b = _Buffers()
    return b


def _scratch(n: int, like: Tensor) -> Tensor:
    """A reused 1-D buffer of ``n`` elements with ``like``'s dtype/device (per thread)."""
    return _state_bufs().get(like, n, 1)[1][0][:n]


class _Plan:
    """Flat buffers for a batch of small tensors and, for each, views shaped like the tensors.

    ``flat[k]`` is the first ``total`` elements of scratch buffer k; ``views[k][i]`` is the
    slice of ``flat[k]`` for tensor i, with its shape. The views depend on the shapes only;
    plans are cached per thread by the tensors' ids (cheap to compute per step) and
    checked against the element counts, which catches a parameter whose ``.data`` was
    replaced by one of another size (a same-size reshape makes the multi-tensor ops raise).
    """

    __slots__ = ("flat", "gather", "numels", "views")

    def __init__(self, ps: list[Tensor], numels: list[int], bufs: list[Tensor]) -> None:
        total = sum(numels)
        self.numels = numels
        self.flat = [b[:total] for b in bufs]
        self.views = []
        for f in self.flat:
            parts = f.split(numels)
            self.views.append([v.view(p.shape) for v, p in zip(parts, ps)])
        ndims = {p.ndim for p in ps}
        self.gather = "cat" if ndims == {1} else ("copy" if 0 in ndims else "chunk_cat")

    def load(self, k: int, ts: list[Tensor]) -> Tensor:
        """Copy the tensors into ``flat[k]`` (row-major order of each), return ``flat[k]``."""
        f = self.flat[k]
        if self.gather == "cat":
            torch.cat(ts, out=f)
        elif self.gather == "chunk_cat":
            torch._chunk_cat(ts, 0, 1, out=f.view(1, -1))
        else:
            torch._foreach_copy_(self.views[k], ts)
        return f


_MAX_PLANS = 64


def _plan(ps: list[Tensor], numels: list[int], nbuf: int) -> _Plan:
    st = _state_bufs()
    gen, bufs = st.get(ps[0], sum(numels), nbuf)
    key = (ps[0].dtype, ps[0].device, gen, nbuf, tuple(map(id, ps)))
    plan = st.plans.get(key)
    if plan is None or plan.numels != numels:
        plan = st.plans[key] = _Plan(ps, numels, bufs[:nbuf])
        if len(st.plans) > _MAX_PLANS:
            st.plans.popitem(last=False)
    else:
        st.plans.move_to_end(key)
    return plan


class _Split:
    """A CPU tensor list sorted for the ATen path: ``batches`` of small tensors (each at
    most ``BATCH`` elements in all, gathered into flat scratch buffers), ``chunked`` big
    contiguous tensors (processed in ``CHUNK`` slices), ``loose`` big non-contiguous ones
    (plain per-tensor ops). Empty tensors are dropped."""

    __slots__ = ("batches", "chunked", "loose")

    def __init__(self, params: Sequence[Tensor], *others: Sequence[Tensor]) -> None:
        numels = list(map(Tensor.numel, params))
        self.batches: list[tuple[list[int] | slice, list[int]]] = []  # (which, numels)
        self.chunked: list[int] = []
        self.loose: list[int] = []
        if max(numels) < SMALL and min(numels) > 0:  # all small: cut by running total
            ends = list(accumulate(numels))
            lo = 0
            while lo < len(numels):
                base = ends[lo - 1] if lo else 0
                hi = max(bisect_right(ends, base + BATCH, lo), lo + 1)
                self.batches.append((slice(lo, hi), numels[lo:hi]))
                lo = hi
            return
        idx: list[int] = []
        sizes: list[int] = []
        total = 0
        for i, n in enumerate(numels):
            if n == 0:
                continue
            if n < SMALL:
                if idx and total + n > BATCH:
                    self.batches.append((idx, sizes))
                    idx, sizes, total = [], [], 0
                idx.append(i)
                sizes.append(n)
                total += n
            elif params[i].is_contiguous() and all(o[i].is_contiguous() for o in others):
                self.chunked.append(i)
            else:
                self.loose.append(i)
        if idx:
            self.batches.append((idx, sizes))


_dtype_of = attrgetter("dtype")


def _one_dtype(params: Sequence[Tensor]) -> bool:
    return len(set(map(_dtype_of, params))) == 1


def _by_dtype(params: Sequence[Tensor]) -> list[list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    return list(groups.values())


def _pick(xs: list[Tensor], idx: list[int] | slice) -> list[Tensor]:
    return xs[idx] if isinstance(idx, slice) else [xs[i] for i in idx]


def _chunks(n: int):
    for i in range(0, n, CHUNK):
        yield i, min(n, i + CHUNK)


def _scalar_like(x: float, p: Tensor) -> Any:
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


# --------------------------------------------------------------------------- L2
@torch.no_grad()
def l2_grad_(params: Sequence[Tensor], grads: Sequence[Tensor], coef: float) -> None:
    r"""g ← g + c·θ  (L2 in ``"grad"`` mode: c = scale·λ; torch's ``grad.add(param, alpha=wd)``).

    One ``torch._foreach_add_``: the floor itself (reads θ and g, writes g).
    """
    if params:
        torch._foreach_add_(list(grads), list(params), alpha=coef)


@torch.no_grad()
def l2_decay_(params: Sequence[Tensor], factor: float) -> None:
    r"""θ ← f·θ  (L2 decoupled: f = 1 − η·λ, AdamW's ``param.mul_(1 - lr * wd)``).

    float32/float64: bit-identical to ``torch._foreach_mul_(params, factor)`` (AdamW foreach)
    and to ``p.mul_(factor)``; bf16/fp16: fp32 math, rounded once (see ``_scalar_like``).
    """
    params = list(params)
    if not params:
        return
    if len({p.dtype for p in params}) == 1:
        torch._foreach_mul_(params, _scalar_like(factor, params[0]))
    else:
        torch._foreach_mul_(params, factor)


@torch.no_grad()
def l2_prox_(params: Sequence[Tensor], divisor: float) -> None:
    r"""θ ← θ / d  (prox of ½λ‖θ‖² with step η: d = 1 + η·λ).

    float32/float64: divides by a 0-d tensor of the same dtype (bit-identical to the
    Python scalar, without its per-tensor allocation); bf16/fp16 keep the Python scalar
    (ATen divides them in fp32 by the fp32 value of ``divisor``).
    """
    params = list(params)
    if not params:
        return
    dts = {p.dtype for p in params}
    if len(dts) == 1 and (dts <= set(_NATIVE_DTYPES) or dts <= set(LOW_PRECISION)):
        torch._foreach_div_(params, _scalar_like(divisor, params[0]))
    else:
        torch._foreach_div_(params, divisor)


# --------------------------------------------------------------------------- L1 / elastic net
@torch.no_grad()
def l1_grad_(
    params: Sequence[Tensor], grads: Sequence[Tensor], coef: float, scratch: Tensor | None = None
) -> None:
    r"""g ← g + c·sign(θ)  (L1 in ``"grad"`` mode: c = scale·λ; sign(0) = 0).

    Same ops per element as ``g.add_(torch.sign(θ), alpha=c)``: bit-identical to it.
    ``scratch`` (optional): a 1-D buffer of θ's dtype for the chunked path; by default a
    per-thread buffer of at most ``CHUNK`` elements.
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


# The per-op math, three ways: on whole lists (``_foreach_*``, other devices), on one flat
# buffer or chunk (``flat``), and the native call. ``p``/``g``: θ and gradient; ``s``: scratch.
def _foreach(op: str, ps: list[Tensor], gs: list[Tensor] | None, c: tuple) -> None:
    if op == "l1_grad":
        torch._foreach_add_(gs, torch._foreach_sign(ps), alpha=c[0])
    elif op == "en_grad":
        torch._foreach_add_(gs, torch._foreach_sign(ps), alpha=c[0])
        torch._foreach_add_(gs, ps, alpha=c[1])
    elif op == "l1_decay":
        torch._foreach_add_(ps, torch._foreach_sign(ps), alpha=c[0])
    elif op == "en_decay":
        signs = torch._foreach_sign(ps)
        l2_decay_(ps, c[0])
        torch._foreach_add_(ps, signs, alpha=c[1])
    else:  # soft
        clipped = torch._foreach_clamp_max(ps, c[0])
        torch._foreach_clamp_min_(clipped, -c[0])
        torch._foreach_sub_(ps, clipped)
        if c[1] != 1.0:
            l2_prox_(ps, c[1])


def _flat(op: str, p: Tensor, g: Tensor | None, s: Tensor | None, c: tuple) -> None:
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


def _call_native(mod: Any, op: str, ps: list[Tensor], gs: list[Tensor] | None, c: tuple) -> bool:
    if op == "l1_grad":
        return mod.sign_add_(ps, gs, c[0])
    if op == "en_grad":
        return mod.sign_axpy_add_(ps, gs, c[0], c[1])
    if op == "l1_decay":
        return mod.sign_add_(ps, ps, c[0])
    if op == "en_decay":
        return mod.scale_sign_add_(ps, c[0], c[1])
    return mod.soft_threshold_(ps, c[0], c[1])


def _apply(
    ps: list[Tensor], gs: list[Tensor] | None, op: str, c: tuple, scratch: Tensor | None
) -> None:
    if not ps:
        return
    mod = _native_for(ps)
    if mod is not None and _call_native(mod, op, ps, gs, c):
        return
    if ps[0].device.type != "cpu":
        _foreach(op, ps, gs, c)
        return
    if not _one_dtype(ps):
        for idx in _by_dtype(ps):
            _apply(_pick(ps, idx), None if gs is None else _pick(gs, idx), op, c, scratch)
        return
    split = _Split(ps) if gs is None else _Split(ps, gs)
    for idx, numels in split.batches:
        _batch(op, _pick(ps, idx), None if gs is None else _pick(gs, idx), numels, c)
    if op == "soft":  # in place, no scratch: one op (two with the division) per tensor
        for i in split.chunked + split.loose:
            _flat(op, ps[i], None, None, c)
        return
    for i in split.chunked:
        p = ps[i].view(-1)
        g = None if gs is None else gs[i].view(-1)
        buf = _buf(scratch, p)
        for lo, hi in _chunks(p.numel()):
            _flat(op, p[lo:hi], None if g is None else g[lo:hi], buf[: hi - lo], c)
    for i in split.loose:
        _flat(op, ps[i], None if gs is None else gs[i], None, c)


def _batch(op: str, ps: list[Tensor], gs: list[Tensor] | None, numels: list[int], c: tuple) -> None:
    """Small CPU tensors of one dtype: gather θ (and g) into flat scratch, do the math on
    the flat buffers (a handful of ops whatever the number of tensors), scatter back."""
    if op == "l1_grad":  # θ → flat, sign in place, one multi-tensor add into the grads
        plan = _plan(ps, numels, 1)
        plan.load(0, ps).sign_()
        torch._foreach_add_(gs, plan.views[0], alpha=c[0])
    elif op == "en_grad":  # θ and g → flat, both adds on the flat g, copy g back
        plan = _plan(ps, numels, 3)
        p, g, s = plan.load(0, ps), plan.load(1, gs), plan.flat[2]
        _flat(op, p, g, s, c)
        torch._foreach_copy_(gs, plan.views[1])
    else:  # decoupled / prox: θ → flat, update the flat θ, copy θ back
        plan = _plan(ps, numels, 1 if op == "soft" else 2)
        p = plan.load(0, ps)
        _flat(op, p, None, None if op == "soft" else plan.flat[1], c)
        torch._foreach_copy_(ps, plan.views[0])


def _buf(scratch: Tensor | None, p: Tensor) -> Tensor:
    n = min(p.numel(), CHUNK)
    if (
        scratch is not None
        and scratch.dtype == p.dtype
        and scratch.device == p.device
        and scratch.numel() >= n
        and scratch.is_contiguous()
    ):
        return scratch.view(-1)
    return _scratch(n, p)
