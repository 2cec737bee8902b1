"""When the callbacks with a ``batch_interval`` run inside :func:`flaxconv.fit`'s epochs, and
their calls with the epoch's running logs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from flaxconv.callbacks.base import Callback
from flaxconv.checks import NonFiniteLossError, first_non_finite
from flaxconv.state import TrainState


class BatchHooks:
    """The callbacks with a ``batch_interval`` (see :mod:`flaxconv.callbacks`): after which
    steps of an epoch they run, and their calls with the epoch's running logs."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = []
        for callback in callbacks:
            interval = getattr(callback, "batch_interval", None)
            if interval is None:
                continue
            if isinstance(interval, bool) or not isinstance(interval, int | np.integer) or (
                interval < 1
            ):
                raise ValueError(
                    f"{type(callback).__name__}.batch_interval={interval!r}; expected a "
                    f"positive integer number of steps or None"
                )
            self.callbacks.append(callback)
        self.begin_epoch(0, 0)

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def begin_epoch(self, epoch: int, first_step: int, prior: Any = None) -> None:
        """An epoch whose step 0 is global step ``first_step + 1``; ``prior``: the per-step
        sums of its steps already done (a preempted epoch's first part), or None."""
        self.epoch, self.first_step, self.prior = epoch, first_step, prior

    def _due(self, done: int) -> list[Callback]:
        step = self.first_step + done
        return [c for c in self.callbacks if step % int(c.batch_interval) == 0]

    def cuts(self, start: int, steps: int) -> list[int]:
        """The step counts in ``(start, steps]`` after which some callback is due."""
        return [done for done in range(start + 1, steps + 1) if self._due(done)]

    def __call__(self, state: TrainState, done: int, per_step: list[Any]) -> TrainState:
        """Runs the callbacks due after ``done`` steps of the epoch (``per_step``: the sums
        of this call's steps, in order) and returns the state they leave."""
        due = self._due(done)
        if not due:
            return state
        parts = [] if self.prior is None else [self.prior]
        parts += per_step
        sums = jax.tree.map(
            lambda *xs: np.concatenate([np.atleast_1d(np.asarray(x)) for x in xs]), *parts
        )
        losses = sums["loss_sum"] / np.maximum(sums["count"], 1)
        bad = first_non_finite(losses)
        if bad is not None:  # before any callback sees (or saves) the state
            raise NonFiniteLossError(self.first_step + bad + 1, float(losses[bad]), self.epoch)
        count = max(float(np.sum(sums["count"])), 1.0)
        logs = {"loss": float(np.sum(sums["loss_sum"])) / count,
                "accuracy": float(np.sum(sums["correct"])) / count}
        for callback in due:
            new_state = callback.on_train_batch_end(done - 1, dict(logs), state)
            state = state if new_state is None else new_state
        return state
