"""N:M semi-structured sparsity: ``tr.NM(n=2, m=4)`` and ``tr.prune.nm_mask``.

Of every ``m`` consecutive weights along a layer's input (reduction) dimension at most ``n``
are nonzero: 2:4 is the pattern that torch's semi-structured sparse kernels
(``torch.sparse.to_sparse_semi_structured``, CUDA) accelerate. ``tr.NM`` is a constraint:
after every optimizer step it keeps the ``n`` largest-magnitude weights of each block and
sets the others to exactly 0, so training ends in the pattern.

Layout, by the owning layer: a ``Linear`` weight ``(out, in)`` has its blocks along dim 1
(each row, contiguous); a ``Conv`` weight ``(out, in, *k)`` is taken as the GEMM matrix
``(out, in·k)`` (blocks along each flattened row); a Hugging Face ``Conv1D`` weight
``(in, out)`` along dim 0 (each column). The row length must be a multiple of ``m``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import select as _select
from ..constraints import Constraint
from ..structured import _is_hf_conv1d

__all__ = ["NM", "nm_mask"]

#: default selection of NM: the weights of Linear layers (the semi-structured kernels are GEMMs)
DEFAULT_ON = _select.weights & _select.modules(nn.Linear)


def _check_nm(n: object, m: object) -> tuple[int, int]:
    for v, a in ((n, "n"), (m, "m")):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"NM: {a} must be an int, got {type(v).__name__}")
    if not 1 <= n < m:
        raise ValueError(f"NM: need 1 <= n < m, got n={n}, m={m}")
    return n, m


def _transposed(module: nn.Module | None, p: Tensor) -> bool:
    """Whether the input dimension of ``p`` is dim 0 (HF Conv1D weight ``(in, out)``)."""
    return module is not None and _is_hf_conv1d(module) and p.dim() == 2


def _rows(p: Tensor, transposed: bool) -> Tensor:
    """``p`` as the 2-D matrix whose rows hold the input dimension (a view or a copy)."""
    w = p.t() if transposed else p
    return w.reshape(w.shape[0], -1)


def _keep(p: Tensor, n: int, m: int, transposed: bool) -> Tensor:
    """Boolean mask (shape of ``p``) of the n largest-magnitude entries of every m-block."""
    w = _rows(p, transposed)
    blocks = w.reshape(w.shape[0], -1, m)
    # a stable descending sort: of equal magnitudes the lower index is kept
    top = blocks.abs().argsort(dim=-1, descending=True, stable=True)[..., :n]
    keep = torch.zeros(blocks.shape, dtype=torch.bool, device=p.device).scatter_(-1, top, True)
    keep = keep.reshape(w.shape)
    if transposed:
        return keep.reshape(p.shape[1], p.shape[0]).t()
    return keep.reshape(p.shape)


class NM(Constraint):
    r"""N:M semi-structured sparsity as a constraint: after every step, of every ``m``
    consecutive weights along the input dimension only the ``n`` largest in magnitude are
    kept, the others set to exactly 0 (ties: the lower index is kept). 2:4 (the default) is
    the pattern of ``torch.sparse.to_sparse_semi_structured``.

    Args:
        n: keep ``n`` of every ``m`` consecutive weights (1 ≤ n < m).
        m: the block length.
        on: default the weights of ``nn.Linear`` layers (a conv or HF ``Conv1D`` weight can be
            selected too; see the module docstring for the layout). Every selected weight's
            row length (input features, or in·kh·kw for a conv) must be a multiple of ``m``.

    A step skipped by ``GradScaler`` changes nothing. ``stats()`` reports ``sparsity`` (the
    fraction of exact zeros, ≥ 1 − n/m after a step) and ``nm_blocks_ok`` (the fraction of
    blocks with at most ``n`` nonzeros: 1.0 after a step).
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        *,
        on: _select.Selector | None = None,
        mode: str | None = None,
        name: str | None = None,
    ) -> None:
        self.n, self.m = _check_nm(n, m)
        super().__init__(on=DEFAULT_ON if on is None else on, mode=mode, name=name)
        self._layout: dict[int, tuple] = {}

    def _extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}"

    def summary_strength(self):
        return f"{self.n}:{self.m}"

    def _bind(self, names, params, modules=None):
        mods = list(modules) if modules is not None else [None] * len(params)
        bad, layout = [], {}
        for nm, p, mod in zip(names, params, mods):
            if p.dim() < 2:
                bad.append(f"{nm} (shape {tuple(p.shape)}: not a matrix)")
                continue
            t = _transposed(mod, p)
            row = _rows(p.detach(), t).shape[1]
            if row % self.m:
                bad.append(f"{nm} (rows of {row}, not a multiple of m={self.m})")
                continue
            layout[id(p)] = (t, p)
        if bad:
            raise ValueError(
                f"NM({self.n}:{self.m}): cannot put these parameters in the pattern: "
                + ", ".join(bad)
                + "; narrow on="
            )
        self._layout = layout

    def _unbind(self) -> None:
        super()._unbind()
        self._layout = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_layout"] = {}
        return state

    def _is_transposed(self, p: Tensor) -> bool:
        e = self._layout.get(id(p))
        if e is not None and e[1] is p:
            return e[0]
        for t, q in self._layout.values():  # a detached alias of a bound parameter
            if q.shape == p.shape and q.data_ptr() == p.data_ptr() and q.stride() == p.stride():
                return t
        return False

    def mask(self, p: Tensor) -> Tensor:
        """The boolean mask of the entries of ``p`` this constraint keeps."""
        with torch.no_grad():
            return _keep(p.detach(), self.n, self.m, self._is_transposed(p))

    def project(self, p: Tensor) -> Tensor:
        """The projection of ``p`` (a new tensor), in the layout of the bound parameter."""
        with torch.no_grad():
            keep = self.mask(p)
            return p.detach().clone().masked_fill_(~keep, 0)

    def _project_(self, p: Tensor, skip: Tensor | None) -> None:
        keep = _keep(p, self.n, self.m, self._is_transposed(p))
        if skip is not None:
            keep = keep | skip
        p.masked_fill_(~keep, 0)

    def stats_tensors(self, params, strength):
        ps = [p for p in params if p.numel()]
        if not ps:
            return {}
        dev = ps[0].device
        zeros = torch.stack([(p == 0).sum().to(dev) for p in ps]).sum()
        ok, blocks = [], 0
        for p in ps:
            b = _rows(p.detach(), self._is_transposed(p))
            nz = (b.reshape(b.shape[0], -1, self.m) != 0).sum(-1)
            ok.append((nz <= self.n).sum().to(dev))
            blocks += nz.numel()
        return {
            "sparsity": zeros.to(torch.float64) / sum(p.numel() for p in ps),
            "nm_blocks_ok": torch.stack(ok).sum().to(torch.float64) / max(1, blocks),
        }


def nm_mask(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    on: _select.Selector | None = None,
) -> dict[str, Tensor]:
    """``{parameter name: bool mask}``: the ``n`` largest-magnitude entries of every ``m``
    consecutive weights along the input dimension, for the weights ``on`` selects (default
    those of ``nn.Linear`` layers, as :class:`NM`). For a model trained with ``tr.NM(n, m)``
    the pattern already holds, and ``p * mask == p``; the masks freeze the pattern for
    fine-tuning (multiply the gradients) or export (``to_sparse_semi_structured``)."""
    n, m = _check_nm(n, m)
    rule = NM(n, m, on=on)
    index = _select.index(model)
    hit = rule.on.match(index)
    infos = [info for i, info in enumerate(index.params) if i in hit]
    rule._bind([i.name for i in infos], [i.param for i in infos], [i.module for i in infos])
    return {i.name: rule.mask(i.param) for i in infos}


def pattern_holds(p: Tensor, n: int = 2, m: int = 4, transposed: bool = False) -> bool:
    """Whether at most ``n`` of every ``m`` consecutive entries along the input dim of ``p``
    are nonzero."""
    b = _rows(p.detach(), transposed)
    return bool(((b.reshape(b.shape[0], -1, m) != 0).sum(-1) <= n).all())
