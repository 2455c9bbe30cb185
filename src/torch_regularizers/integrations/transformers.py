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

Native weight decay: :func:`decay_parameter_names` returns exactly what
``Trainer.get_decay_parameter_names`` returns (HF's by-name rule), or, given ``no_decay=``, the
parameters a library selector does not spare (``~tr.select.weights``: the library's own
convention); :func:`use_decay_selection` installs it on a Trainer.
"""

from __future__ import annotations

import re
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

__all__ = [
    "HF_NO_DECAY_LAYERS",
    "HF_NO_DECAY_PATTERNS",
    "STATE_KEY",
    "RegularizerCallback",
    "decay_parameter_names",
    "use_decay_selection",
]

#: key of the regularizer's state in ``optimizer.state_dict()["param_groups"][0]``
STATE_KEY = "torch_regularizers"


#: The Trainer's no-decay rule (transformers 5.x ``Trainer.get_decay_parameter_names``):
#: parameters inside an ``nn.LayerNorm`` (or subclass), and any name that, lower-cased,
#: matches one of these (``bias`` anywhere: also ``relative_attention_bias.weight`` and
#: ``relative_position_bias_table``).
HF_NO_DECAY_LAYERS: tuple[type[nn.Module], ...] = (nn.LayerNorm,)
HF_NO_DECAY_PATTERNS: tuple[str, ...] = (
    r"bias",
    r"layernorm",
    r"rmsnorm",
    r"(?:^|\.)norm(?:$|\.)",
    r"_norm(?:$|\.)",
)
_HF_NO_DECAY_RE = [re.compile(p) for p in HF_NO_DECAY_PATTERNS]


def _hf_names(model: nn.Module, under_forbidden: bool = False) -> list[tuple[str, Any, bool]]:
    """``(name, param, inside a forbidden layer)`` in the order and with the names the Trainer
    walks them: children first (``named_children``), then the module's own ``_parameters``
    (every registered name, tied ones under each; ``None`` entries included, as HF does)."""
    out: list[tuple[str, Any, bool]] = []
    for cname, child in model.named_children():
        forbidden = under_forbidden or isinstance(child, HF_NO_DECAY_LAYERS)
        out += [(f"{cname}.{n}", p, f) for n, p, f in _hf_names(child, forbidden)]
    out += [(k, p, under_forbidden) for k, p in model._parameters.items()]
    return out


def decay_parameter_names(model: nn.Module, no_decay: _select.Selector | None = None) -> list[str]:
    """Names of the parameters to weight-decay, as ``Trainer.get_decay_parameter_names`` returns.

    Default (``no_decay=None``): exactly the Trainer's own list (transformers 5.x), name for
    name and in its order: every parameter except those inside an ``nn.LayerNorm`` and those
    whose lower-cased name contains ``bias``, ``layernorm`` or ``rmsnorm``, or has a
    ``norm`` / ``*_norm`` name part (:data:`HF_NO_DECAY_PATTERNS`). That rule is by name: it
    also spares T5's ``relative_attention_bias.weight``, Swin/BEiT ``relative_position_bias_table``
    and SwinV2's ``continuous_position_bias_mlp.*`` (they contain "bias"), and gated norms
    such as Mamba2's ``mixer.norm.weight``; it decays embeddings, position embeddings and
    tokens (DINOv2 ``register_tokens``, CLIP ``logit_scale``).

    ``no_decay``: a selector of the parameters to spare instead, e.g. ``~tr.select.weights``
    for the library's own convention (biases, norms by type, embeddings, tokens and relative
    position tables undecayed; see the README's "Conventions"), or ``tr.select.biases |
    tr.select.norms | tr.select.embeddings``. A tied parameter is decayed or spared under all
    of its names together.

    Names are listed as the Trainer lists them (its own walk of ``named_children``: a tied
    parameter under every name).
    """
    walk = _hf_names(model)
    if no_decay is None:
        return [
            n
            for n, _, forbidden in walk
            if not forbidden and not any(r.search(n.lower()) for r in _HF_NO_DECAY_RE)
        ]
    if not isinstance(no_decay, _select.Selector):
        raise TypeError(f"no_decay must be a tr.select selector, got {type(no_decay).__name__}")
    keep = {id(p) for _, p in (_select.all - no_decay).resolve(model)}
    return [n for n, p, _ in walk if p is not None and id(p) in keep]


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
