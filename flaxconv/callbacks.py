"""The callback protocol of :func:`flaxconv.fit`.

A callback is any object with some of these methods (all optional; the base class
:class:`Callback` gives no-op defaults):

* ``on_train_begin(state, workdir) -> None``
* ``on_epoch_end(epoch, logs, state) -> TrainState | None``: ``logs`` holds the epoch's
  numbers (``loss``, ``accuracy``, ``val_*``, ``lr``, ...); return a new state to replace
  the current one (e.g. a lowered learning rate), or None to keep it.
* ``on_train_end(state) -> TrainState | None``
* ``stop_training: bool``: set it to end training after the current epoch.
* ``state_dict() -> dict`` / ``load_state_dict(d)``: JSON-able state saved with every
  checkpoint, so a resumed run continues the callback where it was (patience counters...).
"""

from __future__ import annotations

from typing import Any

from flaxconv.state import TrainState


class Callback:
    """No-op base class; subclass it and override what you need."""

    stop_training: bool = False

    def on_train_begin(self, state: TrainState, workdir: str | None) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: dict[str, float], state: TrainState):
        return None

    def on_train_end(self, state: TrainState):
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
