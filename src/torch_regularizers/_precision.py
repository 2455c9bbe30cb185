"""Low-precision parameters: which dtypes get fp32 math, and stochastic rounding back.

``acc(p)`` is ``p`` in a dtype fit for arithmetic and accumulation (fp16/bf16 → fp32).

Stochastic rounding of an fp32 result into a bf16/fp16 parameter:

Plain low-precision arithmetic drops any change smaller than half an ulp: with
lr·λ = 1e-5 a bf16 weight of 1.0 never decays. Rounding up or down at random, with
the probability of rounding up equal to the distance to the lower neighbour
divided by the gap, keeps the expected value: E[round(x)] = x.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LOW_PRECISION", "acc", "stochastic_round_"]

#: parameter dtypes whose regularization math runs in fp32
LOW_PRECISION = (torch.bfloat16, torch.float16)


def acc(p: Tensor) -> Tensor:
    """``p`` in a dtype fit for accumulation: fp16/bf16 are upcast to fp32, others unchanged."""
    return p.float() if p.dtype in LOW_PRECISION else p


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``dst.copy_(round_stochastically(src))`` where ``dst`` is bf16/fp16 and ``src`` fp32."""
    near = src.to(dst.dtype)
    near32 = near.float()
    err = src - near32  # what nearest rounding lost
    away = torch.nextafter(near, torch.where(err >= 0, torch.inf, -torch.inf).to(dst.dtype))
    gap = (away.float() - near32).abs_()
    prob = torch.where(gap > 0, err.abs() / gap, torch.zeros_like(gap))
    u = torch.rand(src.shape, device=src.device, generator=generator)
    return dst.copy_(torch.where(u < prob, away, near))
