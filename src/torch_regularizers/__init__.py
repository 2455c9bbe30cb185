"""torch-regularizers: declared, inspectable regularization for any ``torch.optim`` optimizer.

``import torch_regularizers as tr``::

    reg = tr.Regularizer(model, [tr.L2(1e-4, mode="decoupled"), tr.L1(1e-5, mode="prox")])
    reg.attach(optimizer)
    print(reg.summary())

See ``tr.Regularizer`` for the modes, ``tr.select`` for choosing parameters.
"""

from . import schedules, select
from ._rule import Rule
from .param_groups import DoubleDecayWarning, param_groups
from .penalties import L1, L2, ElasticNet, Penalty
from .regularizer import Regularizer

__version__ = "0.1.0"

__all__ = [
    "L1",
    "L2",
    "DoubleDecayWarning",
    "ElasticNet",
    "Penalty",
    "Regularizer",
    "Rule",
    "__version__",
    "param_groups",
    "schedules",
    "select",
]
