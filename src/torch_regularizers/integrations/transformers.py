"""Hugging Face ``transformers`` integration: ``RegularizerCallback`` and the decay-set helpers.

::

    from torch_regularizers.integrations.transformers import RegularizerCallback

    trainer = Trainer(model=model, args=TrainingArguments(..., weight_decay=0.0),
                      train_dataset=ds,
                      callbacks=[RegularizerCallback([tr.L1(1e-5, mode="prox")])])
    trainer.train()

The callback builds the :class:`~torch_regularizers.Regularizer` on the Trainer's model in
``on_train_begin`` (its weights then are e.g. the L2-SP reference) and attaches it to the
optimizer the Trainer built (looking through accelerate's ``AcceleratedOptimizer``), so every
real optimizer step applies the rules: gradient-accumulation micro-steps do not, and fp16
steps skipped by the ``GradScaler`` do not either.

* **Logging**: whenever the Trainer logs training metrics (``logging_steps``), ``reg.stats()``
  is added under ``reg/<rule>/<stat>``: to ``trainer.state.log_history`` and to the ``logs``
  every later callback sees. So that the ``report_to`` integrations (W&B, TensorBoard, ...),
  which the Trainer registers before user callbacks, see them too, the callback moves itself
  to the front of the Trainer's callback list when training begins.
* **Checkpoints**: the regularizer's state (step counts, strengths, L2-SP references) rides in
  the optimizer's state dict (``optimizer.pt``, under ``param_groups[0]["torch_regularizers"]``).
  ``trainer.train(resume_from_checkpoint=...)`` loads the optimizer before ``on_train_begin``,
  where the callback takes the state back out, so a resumed run continues identically.

Native weight decay: :func:`decay_parameter_names` is a drop-in for
``Trainer.get_decay_parameter_names`` that uses the library's selectors (every normalization
layer by type — ``LlamaRMSNorm``, ``T5LayerNorm``, ... — biases, and optionally embeddings);
:func:`use_decay_selection` installs it on a Trainer.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torch_regularizers.integrations.transformers needs transformers: "
        "pip install 'torch-regularizers[transformers]'"
    ) from None

from .. import select as _select
from ..regularizer import Regularizer, unwrap_optimizer
from . import StatsLogger, make_regularizer

__all__ = ["STATE_KEY", "RegularizerCallback", "decay_parameter_names", "use_decay_selection"]

#: key of the regularizer's state in ``optimizer.state_dict()["param_groups"][0]``
STATE_KEY = "torch_regularizers"


def decay_parameter_names(model: nn.Module, no_decay: _select.Selector | None = None) -> list[str]:
    """Names of the parameters to weight-decay, as ``Trainer.get_decay_parameter_names`` returns.

    ``no_decay`` defaults to ``tr.select.biases | tr.select.norms``: the Trainer's own rule
    (biases and normalization layers), with normalization layers found by type (any class
    whose name ends in ``Norm``: ``LlamaRMSNorm``, ``T5LayerNorm``, torch's ``RMSNorm``, ...)
    rather than by parameter name. Ask for more, e.g. ``tr.select.biases | tr.select.norms |
    tr.select.embeddings``, or pass ``~tr.select.weights`` for the library's default decay set.
    Names are those of ``model.named_parameters()`` (tied parameters under every name).
    """
    if no_decay is None:
        no_decay = _select.biases | _select.norms
    if not isinstance(no_decay, _select.Selector):
        raise TypeError(f"no_decay must be a tr.select selector, got {type(no_decay).__name__}")
    keep = {id(p) for _, p in (_select.all - no_decay).resolve(model)}
    return [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in keep]


def use_decay_selection(trainer: Any, no_decay: _select.Selector | None = None) -> Any:
    """Make ``trainer`` build its optimizer's decay/no-decay groups with
    :func:`decay_parameter_names` (call before ``trainer.train()``); returns the trainer."""
    trainer.get_decay_parameter_names = lambda model: decay_parameter_names(model, no_decay)
    return trainer


def _calling_handler() -> CallbackHandler | None:
    """The CallbackHandler running the current event (the caller of our hook), if any."""
    f = sys._getframe(1)
    for _ in range(6):
        if f is None:
            return None
        obj = f.f_locals.get("self")
        if isinstance(obj, CallbackHandler):
            return obj
        f = f.f_back
    return None


class RegularizerCallback(TrainerCallback):
    """Attach a Regularizer to the optimizer of a Hugging Face ``Trainer``.

    Args:
        config_or_rules: a rule, a list of rules, a config (dict, or a ``.yaml``/``.json``
            path), a ``tr.Regularizer`` built on the model, or a callable
            ``model -> tr.Regularizer``.
        prefix: prefix of the logged keys.
        log: add ``reg.stats()`` to the Trainer's training logs.
        **kwargs: passed to ``tr.Regularizer`` (``allow_empty=``, ``impl=``).

    ``callback.regularizer`` is the live Regularizer once training has begun; it stays
    attached after training (its state is then still saved with the optimizer) until the
    next ``train()`` re-attaches it.
    """

    def __init__(self, config_or_rules: Any, *, prefix: str = "reg/", log: bool = True, **kwargs: Any) -> None:
        self.spec = config_or_rules
        self.prefix = prefix
        self.log = log
        self.kwargs = kwargs
        self.regularizer: Regularizer | None = None
        self._handles: list[Any] = []
        self._opt: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ lifecycle
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("RegularizerCallback: the Trainer passed no model/optimizer to on_train_begin")
        handler = _calling_handler()
        if handler is not None and self in handler.callbacks and handler.callbacks[0] is not self:
            handler.callbacks.remove(self)  # run before the report_to loggers (see module doc)
            handler.callbacks.insert(0, self)
        reg = self.regularizer
        if reg is None or reg.model is not model:
            reg = self.regularizer = make_regularizer(model, self.spec, **self.kwargs)
        self._release()
        reg.detach()
        opt = unwrap_optimizer(optimizer)
        reg.attach(opt)
        self._opt = opt
        self._handles = [
            opt.register_state_dict_post_hook(self._save_into_optimizer),
            opt.register_load_state_dict_post_hook(self._load_from_optimizer),
        ]
        self._load_from_optimizer(opt)  # resumed: the Trainer loaded optimizer.pt already

    def _release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ state in optimizer.pt
    def _save_into_optimizer(self, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        if self.regularizer is not None and sd.get("param_groups"):
            sd["param_groups"][0][STATE_KEY] = self.regularizer.state_dict()
        return sd

    def _load_from_optimizer(self, opt: torch.optim.Optimizer) -> None:
        if not opt.param_groups:
            return
        saved = opt.param_groups[0].pop(STATE_KEY, None)
        if saved is not None and self.regularizer is not None:
            self.regularizer.load_state_dict(saved)

    # ------------------------------------------------------------------ logging
    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log or self.regularizer is None or logs is None or "loss" not in logs:
            return
        stats = StatsLogger(self.regularizer, lambda d, s: None, prefix=self.prefix)(force=True) or {}
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)
