"""torch-regularizers: declared, inspectable regularization for any ``torch.optim`` optimizer.

``import torch_regularizers as tr``::

    reg = tr.Regularizer(model, [tr.L2(1e-4, mode="decoupled"), tr.L1(1e-5, mode="prox")])
    reg.attach(optimizer)
    print(reg.summary())

See ``tr.Regularizer`` for the modes, ``tr.select`` for choosing parameters.
"""

from . import prune, schedules, select
from ._rule import Rule
from .activity import ActivityL1, ActivityL2
from .constraints import Constraint, FixedNorm, MaxNorm, NonNeg, SpectralNorm, UnitNorm
from .penalties import L1, L2, ElasticNet, Penalty
from .prune import NM
from .regularizer import Regularizer
from .structured import L2SP, FnPenalty, GroupLasso, Orthogonal, SparseGroupLasso
from .weight_decay import DoubleDecayWarning, param_groups

__version__ = "0.1.0"

__all__ = [
    "L1",
    "L2",
    "L2SP",
    "NM",
    "ActivityL1",
    "ActivityL2",
    "Constraint",
    "DoubleDecayWarning",
    "ElasticNet",
    "FixedNorm",
    "FnPenalty",
    "GroupLasso",
    "MaxNorm",
    "NonNeg",
    "Orthogonal",
    "Penalty",
    "Regularizer",
    "Rule",
    "SparseGroupLasso",
    "SpectralNorm",
    "UnitNorm",
    "__version__",
    "param_groups",
    "prune",
    "schedules",
    "select",
]
