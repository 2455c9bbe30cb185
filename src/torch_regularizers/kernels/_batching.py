"""Work lists and batching shared by the backends (docs/design.md §4).

* :func:`by_dtype`, :func:`pick`: split a mixed-dtype list into one list per dtype (every
  backend runs on one dtype at a time).
* :class:`WorkList`: the flattened element ranges of a tensor list, cut into fixed-size
  chunks ``(tensor, offset)`` — what a one-launch multi-tensor kernel iterates over (the
  Triton backend; the native backend builds the same list in C++).
* :class:`Split`, :class:`Plan`, :func:`scratch`: the ATen CPU path's batching — small
  tensors gathered into flat per-thread scratch buffers, big ones cut into chunks.
* :class:`LRU`: a small cache keyed by tensor identity/layout (plans, device tables).

The sizes ``SMALL``, ``BATCH`` and ``CHUNK`` live here; the tests shrink them to reach
every path with few elements.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from itertools import accumulate
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

#: elements per slice of a big tensor in the ATen sign-based updates (16 MiB of float32):
#: the scratch buffer stays at most this big, and each slice costs one OpenMP parallel
#: region per op (on a busy machine every region can wait for a descheduled thread, so
#: slices are not made smaller than they need to be).
CHUNK = 1 << 22
#: elements per gathered batch of small tensors (4 MiB of float32 per flat buffer).
BATCH = 1 << 20
#: tensors with fewer elements are gathered into flat scratch on CPU (the ATen path),
#: where a handful of ops handle a whole batch instead of one dispatch per tensor per op.
SMALL = 1 << 14

_dtype_of = attrgetter("dtype")


def one_dtype(ts: Sequence[Tensor]) -> bool:
    return len(set(map(_dtype_of, ts))) == 1


def by_dtype(ts: Sequence[Tensor]) -> list[list[int]]:
    """Indices of the tensors of each dtype, in order of first appearance."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(ts):
        groups.setdefault(p.dtype, []).append(i)
    return list(groups.values())


def pick(xs: list[Tensor], idx: list[int] | slice) -> list[Tensor]:
    return xs[idx] if isinstance(idx, slice) else [xs[i] for i in idx]


class LRU(OrderedDict):
    """An ordered dict that keeps the ``size`` most recently used entries."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_(self, key: Any) -> Any:
        v = self.get(key)
        if v is not None:
            try:
                self.move_to_end(key)
            except KeyError:  # evicted by another thread meanwhile: still a valid value
                pass
        return v

    def put(self, key: Any, value: Any) -> Any:
        self[key] = value
        while len(self) > self.size:
            try:
                self.popitem(last=False)
            except KeyError:
                break
        return value


# --------------------------------------------------------------------------- flat work lists
class WorkList:
    """Tensors of element counts ``numels`` as one flat range cut into chunks of ``block``
    elements that never straddle two tensors: chunk j is ``(tensor[j], start[j])``, the
    elements ``[start, min(start + block, numel))`` of that tensor. Empty tensors get no
    chunk. Built with a few tensor ops (no Python loop over chunks)."""

    __slots__ = ("block", "numels", "start", "tensor")

    def __init__(self, numels: Sequence[int], block: int) -> None:
        n = torch.tensor(list(numels), dtype=torch.int64)
        counts = (n + block - 1) // block
        first = torch.cumsum(counts, 0) - counts  # index of each tensor's first chunk
        self.numels = n
        self.block = block
        self.tensor = torch.repeat_interleave(torch.arange(len(n)), counts)
        total = int(counts.sum())
        self.start = (torch.arange(total) - first[self.tensor]) * block

    def __len__(self) -> int:
        return self.tensor.numel()


class RowGroups:
    """Row groups of a tensor list: tensor k is ``rows[k]`` contiguous groups of ``cols[k]``
    elements (a row of its ``(rows, cols)`` view); group j is ``(tensor[j], start[j])``,
    elements ``[start, start + cols)`` of that tensor."""

    __slots__ = ("cols", "start", "tensor")

    def __init__(self, rows: Sequence[int], cols: Sequence[int]) -> None:
        r = torch.tensor(list(rows), dtype=torch.int64)
        self.cols = torch.tensor(list(cols), dtype=torch.int64)
        first = torch.cumsum(r, 0) - r
        self.tensor = torch.repeat_interleave(torch.arange(len(r)), r)
        self.start = (torch.arange(self.tensor.numel()) - first[self.tensor]) * self.cols[self.tensor]

    def __len__(self) -> int:
        return self.tensor.numel()


# --------------------------------------------------------------------------- ATen CPU batching
class Buffers:
    """Per-thread scratch: for each (dtype, device), ``nbuf`` flat buffers that only grow
    (up to ``CHUNK`` or ``BATCH`` elements, the biggest chunk or batch processed), and a
    generation number bumped on growth so that cached views of old buffers are never used."""

    def __init__(self) -> None:
        self.bufs: dict[tuple, tuple[int, list[Tensor]]] = {}
        self.plans: LRU = LRU(_MAX_PLANS)

    def get(self, like: Tensor, n: int, nbuf: int) -> tuple[int, list[Tensor]]:
        key = (like.dtype, like.device)
        gen, bufs = self.bufs.get(key, (0, []))
        if len(bufs) < nbuf or bufs[0].numel() < n:
            size = max(n, 4096, bufs[0].numel() if bufs else 0)
            bufs = [torch.empty(size, dtype=like.dtype, device=like.device) for _ in range(max(nbuf, len(bufs)))]
            gen += 1
            self.bufs[key] = (gen, bufs)
        return gen, bufs


_MAX_PLANS = 64
_tls = threading.local()


def state_bufs() -> Buffers:
    """This thread's scratch buffers and plan cache."""
    b = getattr(_tls, "b", None)
    if b is None:
        b = _tls.b = Buffers()
    return b


def scratch(n: int, like: Tensor) -> Tensor:
    """A reused 1-D buffer of ``n`` elements with ``like``'s dtype/device (per thread)."""
    return state_bufs().get(like, n, 1)[1][0][:n]


class Plan:
    """Flat buffers for a batch of small tensors and, for each, views shaped like the tensors.

    ``flat[k]`` is the first ``total`` elements of scratch buffer k; ``views[k][i]`` is the
    slice of ``flat[k]`` for tensor i, with its shape. The views depend on the shapes only,
    so plans are cached per thread by the tensors' shapes (not their ids: a freed tensor's
    id is reused by the next one allocated, of any shape — which sent views of another
    shape into the multi-tensor ops; nor are they fooled by ``.data`` replaced by another
    shape).
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


_SHAPE = attrgetter("shape")


def plan(ps: list[Tensor], numels: list[int], nbuf: int) -> Plan:
    """The cached :class:`Plan` of these tensors with ``nbuf`` flat buffers."""
    st = state_bufs()
    gen, bufs = st.get(ps[0], sum(numels), nbuf)
    key = (ps[0].dtype, ps[0].device, gen, nbuf, tuple(map(_SHAPE, ps)))
    pl = st.plans.get_(key)
    if pl is None or pl.numels != numels:
        pl = st.plans.put(key, Plan(ps, numels, bufs[:nbuf]))
    return pl


class Split:
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


def chunks(n: int):
    """``(lo, hi)`` slices of at most ``CHUNK`` elements covering ``range(n)``."""
    for i in range(0, n, CHUNK):
        yield i, min(n, i + CHUNK)
