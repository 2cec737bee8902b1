"""The :class:`Callback` base class of fit's protocol, and the helpers every callback that
watches a number of the logs uses: which way it should go (:func:`resolve_mode`), whether
it got better (:func:`improved`) and reading it (:func:`monitored`).

The protocol itself is described in :mod:`flaxconv.callbacks`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flaxconv.state import TrainState

# Metrics that are better when larger; anything ending in "loss" is better when smaller.
_MAXIMIZED = ("accuracy", "acc", "auc", "precision", "recall", "f1")


class Callback:
    """No-op base class; subclass it and override what you need."""

    stop_training: bool = False
    #: Global steps between ``on_train_batch_end`` calls; None: no batch calls.
    batch_interval: int | None = None

    def on_train_begin(self, state: TrainState, workdir: str | None) -> None:
        pass

    def on_epoch_begin(self, epoch: int, state: TrainState):
        return None

    def on_train_batch_end(self, batch: int, logs: dict[str, float], state: TrainState):
        return None

    def on_epoch_end(self, epoch: int, logs: dict[str, float], state: TrainState):
        return None

    def on_train_end(self, state: TrainState):
        return None

    def close(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def resolve_mode(monitor: str, mode: str, owner: str) -> str:
    """``"min"`` or ``"max"`` for ``monitor``; ``"auto"`` decides from the metric's name."""
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise ValueError(f"{owner}: mode={mode!r}; expected 'auto', 'min' or 'max'")
    name = monitor.removeprefix("val_")
    if name.endswith("loss") or name.endswith("error"):
        return "min"
    if name.startswith("top_") or any(k in name for k in _MAXIMIZED):
        return "max"
    raise ValueError(
        f"{owner}: cannot tell whether {monitor!r} should go up or down; pass mode='min' "
        f"or mode='max'"
    )


def improved(current: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``current`` beats ``best`` by more than ``min_delta`` (always, if no best)."""
    if best is None:
        return True
    if mode == "min":
        return current < best - abs(min_delta)
    return current > best + abs(min_delta)


def monitored(logs: dict[str, float], monitor: str, owner: str) -> float:
    """``logs[monitor]`` as a float, or a ValueError naming the keys that are there."""
    if monitor not in logs:
        hint = " (val_* needs validation_data or validation_split)" if "val_" in monitor else ""
        raise ValueError(
            f"{owner} monitors {monitor!r}, which is not in the epoch's logs "
            f"{sorted(logs)}{hint}"
        )
    return float(logs[monitor])


def _check_non_negative(owner: str, name: str, value: Any) -> None:
    """A ValueError naming ``owner``'s argument ``name`` unless ``value`` is an int >= 0."""
    if not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{owner}: {name}={value!r}; expected a non-negative integer")
