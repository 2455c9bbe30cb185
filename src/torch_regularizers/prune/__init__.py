"""Structured pruning built on the group penalties: ``import torch_regularizers as tr``.

From exact zeros to a smaller, faster model::

    groups = tr.prune.channel_groups(model, example_inputs)      # Torch-Pruning's coupled channels
    reg = tr.Regularizer(model, [tr.GroupLasso(1e-3, groups=groups, mode="prox")])
    ...                                                          # train: whole channels become 0
    report = tr.prune.shrink(model, example_inputs, groups)       # remove them; outputs unchanged
    print(report)

* :class:`CoupledGroups` — groups of parameter slices spanning several tensors (a channel's
  conv rows, BatchNorm entries and consumer columns), the ``groups=`` of
  ``tr.GroupLasso``/``tr.SparseGroupLasso``; build one by hand or with
* :func:`channel_groups` — one group per prunable channel (or attention head) from
  Torch-Pruning's ``DependencyGraph`` (``pip install 'torch-regularizers[prune]'``);
* :func:`shrink` — remove the channels whose group is exactly zero (Torch-Pruning does the
  surgery), with a report and an output check;
* :class:`NM` (also ``tr.NM``) and :func:`nm_mask` — N:M semi-structured sparsity (2:4).

Torch-Pruning is imported only by ``channel_groups`` and ``shrink``.
"""

from ._coupled import CoupledGroups, GroupSet, Member
from ._graph import ShrinkReport, channel_groups, shrink
from ._nm import NM, nm_mask, pattern_holds

__all__ = [
    "NM",
    "CoupledGroups",
    "GroupSet",
    "Member",
    "ShrinkReport",
    "channel_groups",
    "nm_mask",
    "pattern_holds",
    "shrink",
]
