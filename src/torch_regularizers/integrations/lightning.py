"""Lightning integration: ``RegularizerCallback``.

::

    from torch_regularizers.integrations.lightning import RegularizerCallback

    trainer = L.Trainer(callbacks=[RegularizerCallback([
        tr.L2(1e-4, mode="decoupled"),
        tr.L1(1e-5, on=tr.select.name("head.*"), mode="prox"),
    ])])
    # or RegularizerCallback("reg.yaml") / RegularizerCallback({"rules": [...]})

At the start of ``fit`` the callback builds the :class:`~torch_regularizers.Regularizer` on
the LightningModule (its weights then are e.g. the L2-SP reference) and attaches it to every
optimizer ``configure_optimizers`` returned; each one then applies the rules inside its own
``step()``. Lightning's automatic optimization steps with ``optimizer.step(closure)``, and the
regularizer wraps that closure, so the result equals the plain loop
``loss.backward(); opt.step()`` bit for bit. Manual optimization works the same way.

``reg.stats()`` goes to the trainer's loggers every ``log_every_n_steps`` optimizer steps
(default: the trainer's ``log_every_n_steps``), under ``reg/<rule>/<stat>``. The regularizer's
state (step counts, strengths, L2-SP references) is saved in Lightning checkpoints, so
``trainer.fit(model, ckpt_path=...)`` continues identically. ``callback.regularizer`` is the
live Regularizer (e.g. for ``set_strength`` or ``summary()``); it stays attached after ``fit``
(so a checkpoint saved then keeps the step counts) until the next ``fit`` re-attaches it to
that run's optimizers.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError:
        raise ImportError(
            "torch_regularizers.integrations.lightning needs Lightning: "
            "pip install 'torch-regularizers[lightning]'"
        ) from None

from ..regularizer import Regularizer
from . import StatsLogger, make_regularizer

__all__ = ["RegularizerCallback"]


class RegularizerCallback(Callback):
    """Attach a Regularizer to the optimizers of a Lightning ``Trainer``.

    Args:
        config_or_rules: a rule, a list of rules, a config (dict, or a ``.yaml``/``.json``
            path), a ``tr.Regularizer`` built on the LightningModule, or a callable
            ``module -> tr.Regularizer``.
        log_every_n_steps: log ``stats()`` every this many optimizer steps (``None``: the
            trainer's ``log_every_n_steps``; 0: never).
        prefix: prefix of the logged keys.
        **kwargs: passed to ``tr.Regularizer`` (``allow_empty=``, ``impl=``).
    """

    def __init__(
        self,
        config_or_rules: Any,
        *,
        log_every_n_steps: int | None = None,
        prefix: str = "reg/",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.spec = config_or_rules
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.kwargs = kwargs
        self.regularizer: Regularizer | None = None
        self._pending: dict[str, Any] | None = None
        self._stats: StatsLogger | None = None

    # ------------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reg = self.regularizer
        if reg is None or reg.model is not pl_module:
            reg = self.regularizer = make_regularizer(pl_module, self.spec, **self.kwargs)
        reg.detach()
        if trainer.optimizers:
            reg.attach(*trainer.optimizers)
        if self._pending is not None:
            reg.load_state_dict(self._pending)
            self._pending = None
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        self._stats = StatsLogger(reg, self._log, every=every, prefix=self.prefix)
        self._trainer = trainer

    # ------------------------------------------------------------------ logging
    def _log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self._trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stats is not None and trainer.loggers and not trainer.sanity_checking:
            self._stats(step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.regularizer is None:
            return dict(self._pending or {})
        return self.regularizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before it builds the optimizers (and on_fit_start):
        # keep the state until the regularizer is attached.
        if self.regularizer is not None and self.regularizer._attachments:
            self.regularizer.load_state_dict(state_dict)
        else:
            self._pending = state_dict
