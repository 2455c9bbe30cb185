"""Optimizer hooks shared by the lifecycle tests."""


class FailOnce:
    """An optimizer step pre-hook that raises on its first call: registered after the
    regularizer's, it fails a step after our pre-hook ran and before the update."""

    def __init__(self):
        self.armed = True

    def __call__(self, opt, args, kwargs):
        if self.armed:
            self.armed = False
            raise RuntimeError("simulated failure before the update")
