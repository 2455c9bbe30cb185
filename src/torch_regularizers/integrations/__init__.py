"""Training-framework integrations (optional extras) and what they share.

* ``torch_regularizers.integrations.lightning.RegularizerCallback`` — ``pip install
  'torch-regularizers[lightning]'``
* ``torch_regularizers.integrations.transformers.RegularizerCallback`` and
  ``decay_parameter_names`` — ``pip install 'torch-regularizers[transformers]'``

This module imports neither framework. :class:`StatsLogger` is the logging pattern for
a hand-written loop (TensorBoard, W&B, anything taking a dict and a step)::

    from torch_regularizers.integrations import StatsLogger

    log_reg = StatsLogger(reg, lambda d, step: wandb.log(d, step=step), every=100)
    for batch in loader:
        ...
        optimizer.step()
        log_reg()            # every 100 applied steps: {"reg/l1/value": ..., "reg/l1/sparsity": ...}

    # TensorBoard
    log_reg = StatsLogger(
        reg, lambda d, step: [writer.add_scalar(k, v, step) for k, v in d.items()], every=100)

``reg.stats()`` is only computed when a log is due (one device sync for all values).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from torch import nn

from .._rule import Rule
from ..regularizer import Regularizer

__all__ = ["StatsLogger", "make_regularizer"]


class StatsLogger:
    """Calls ``log_fn({prefix + key: value}, step)`` with ``reg.stats()`` every ``every`` steps.

    Call it after each optimizer step (calling it more often, e.g. on every micro-batch of
    gradient accumulation, is fine: a step is logged once). ``step`` defaults to
    ``reg.step``, the regularizer's count of applied steps; pass the framework's own step
    counter to line the points up with its other metrics. ``every <= 0`` disables it.
    """

    def __init__(
        self,
        reg: Regularizer,
        log_fn: Callable[[dict[str, float], int], Any],
        every: int = 50,
        prefix: str = "reg/",
    ) -> None:
        if not callable(log_fn):
            raise TypeError("StatsLogger: log_fn must be callable as log_fn(metrics, step)")
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError(f"StatsLogger: every must be an int, got {every!r}")
        self.reg = reg
        self.log_fn = log_fn
        self.every = every
        self.prefix = prefix
        self._last: int | None = None

    def due(self, step: int) -> bool:
        """Whether a log is due at ``step`` (a positive multiple of ``every``, not logged yet)."""
        return self.every > 0 and step > 0 and step % self.every == 0 and step != self._last

    def __call__(self, step: int | None = None, force: bool = False) -> dict[str, float] | None:
        """Log if due (or ``force``); returns the logged dict, or None."""
        step = self.reg.step if step is None else int(step)
        if not (force or self.due(step)):
            return None
        stats = {f"{self.prefix}{k}": v for k, v in self.reg.stats().items()}
        self._last = step
        if stats:
            self.log_fn(stats, step)
        return stats


def make_regularizer(model: nn.Module, spec: Any, **kwargs: Any) -> Regularizer:
    """A Regularizer on ``model`` from a rule, a list of rules, a config (dict or a YAML/JSON
    path), a ready ``Regularizer`` (built on this model), or a callable ``model -> Regularizer``."""
    if isinstance(spec, Regularizer):
        return spec
    if isinstance(spec, Rule):
        return Regularizer(model, [spec], **kwargs)
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(r, Rule) for r in spec):
        return Regularizer(model, list(spec), **kwargs)
    if isinstance(spec, (dict, list, str, os.PathLike)):
        return Regularizer.from_config(model, spec, **kwargs)
    if callable(spec):
        reg = spec(model)
        if not isinstance(reg, Regularizer):
            raise TypeError(f"the regularizer factory returned {type(reg).__name__}, not a tr.Regularizer")
        return reg
    raise TypeError(
        "expected rules (tr.L2(...), or a list of them), a config (dict or YAML/JSON path), a "
        f"tr.Regularizer or a callable model -> Regularizer; got {type(spec).__name__}"
    )
