"""The callbacks that watch one number of the epoch logs and act on the training: stop it
(:class:`EarlyStopping`, :class:`StopAtThreshold`) or lower its learning rate
(:class:`ReduceLROnPlateau`), and :class:`MonitorCallback`, the base of the two of them
that wait for an improvement (Keras 3's base of the same name).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxconv import optim
from flaxconv.callbacks.base import (
    Callback,
    _check_non_negative,
    improved,
    monitored,
    resolve_mode,
)
from flaxconv.state import TrainState


class MonitorCallback(Callback):
    """Watches ``monitor`` for an improvement, and counts the epochs without one.

    The parameters, checks and bookkeeping that :class:`EarlyStopping` and
    :class:`ReduceLROnPlateau` share (Keras 3's ``MonitorCallback``); each subclass takes
    them in its own Keras signature and decides what to do when ``wait`` reaches
    ``patience``. Errors name the subclass.

    Args:
      monitor: a key of the epoch logs, e.g. ``"val_loss"`` or ``"val_accuracy"``.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (from the name: ``*loss`` goes down,
        ``*accuracy``, ``top_k``, ``precision``, ``recall``, ``f1``, ``*auc`` go up);
        stored resolved, as ``"min"`` or ``"max"``.
      min_delta: an improvement must be larger than this (its absolute value).
      patience: epochs without improvement before the subclass acts; an int >= 0.
      verbose: 1 prints what the subclass does.

    Attributes ``best`` (the best value so far, None before the first) and ``wait``
    (epochs since it improved, as the subclass counts them) are the callback's
    ``state_dict``, which subclasses extend.
    """

    def __init__(self, monitor: str, mode: str, min_delta: float, patience: int, verbose: int):
        owner = type(self).__name__
        _check_non_negative(owner, "patience", patience)
        self.monitor, self.min_delta, self.patience = monitor, abs(min_delta), patience
        self.mode, self.verbose = resolve_mode(monitor, mode, owner), verbose

    def current(self, logs: dict[str, float]) -> float:
        """``logs[self.monitor]`` (:func:`~flaxconv.callbacks.monitored`)."""
        return monitored(logs, self.monitor, type(self).__name__)

    def is_improvement(self, current: float, reference: float | None) -> bool:
        """Whether ``current`` beats ``reference`` by more than ``min_delta`` in ``mode``'s
        direction (always, if ``reference`` is None)."""
        return improved(current, reference, self.mode, self.min_delta)

    def state_dict(self) -> dict[str, Any]:
        return {"wait": self.wait, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait = state.get("wait", 0)
        self.best = state.get("best")


def _host_copy(tree: Any) -> Any:
    # A copy, not a view: fit donates the state's device buffers to the next epoch.
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _put_like(values: Any, reference: Any) -> Any:
    """``values`` (a host pytree) on the devices and shardings of ``reference``."""
    values = jax.tree.unflatten(jax.tree.structure(reference), jax.tree.leaves(values))
    return jax.tree.map(lambda x, ref: jax.device_put(x, ref.sharding), values, reference)


def _weights(state: TrainState) -> dict[str, Any]:
    return {"params": _host_copy(state.params), "batch_stats": _host_copy(state.batch_stats)}


class EarlyStopping(MonitorCallback):
    """Stops training when ``monitor`` has not improved for ``patience`` epochs (Keras's).

    Args:
      monitor: a key of the epoch logs, e.g. ``"val_loss"`` or ``"val_accuracy"``.
      min_delta: an improvement must be larger than this.
      patience: epochs without improvement before stopping.
      verbose: 1 prints when it stops and when it restores weights.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (see :class:`MonitorCallback`).
      baseline: patience only resets once ``monitor`` also beats this value.
      restore_best_weights: at the end of training, put back the params and batch stats of
        the best epoch (as Keras 3: also when training ran to the last epoch). They are
        kept on the host and saved with ``fit``'s checkpoints, so a resumed run has them.
      start_from_epoch: epochs of warm-up before monitoring starts.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ):
        super().__init__(monitor, mode, min_delta, patience, verbose)
        _check_non_negative("EarlyStopping", "start_from_epoch", start_from_epoch)
        self.baseline = baseline
        self.restore_best_weights, self.start_from_epoch = restore_best_weights, start_from_epoch
        self.load_state_dict({})

    def on_epoch_end(self, epoch, logs, state):
        current = self.current(logs)
        if epoch < self.start_from_epoch:
            return None
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights, self.best_epoch = _weights(state), epoch
        self.wait += 1
        if self.is_improvement(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = _weights(state)
            if self.baseline is None or self.is_improvement(current, self.baseline):
                self.wait = 0
            return None
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch, self.stop_training = epoch, True
        return None

    def on_train_end(self, state):
        if self.stopped_epoch is not None and self.verbose:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping", flush=True)
        if not (self.restore_best_weights and self.best_weights is not None):
            return None
        if self.verbose:
            print(f"Restoring model weights from the end of the best epoch: "
                  f"{self.best_epoch + 1}.", flush=True)
        return state.replace(
            params=_put_like(self.best_weights["params"], state.params),
            batch_stats=_put_like(self.best_weights["batch_stats"], state.batch_stats),
        )

    def state_dict(self):
        return {
            **super().state_dict(),
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.best_epoch = state.get("best_epoch")
        self.stopped_epoch = state.get("stopped_epoch")
        self.best_weights = state.get("best_weights")
        self.stop_training = self.stopped_epoch is not None


class StopAtThreshold(Callback):
    """Stops training after the first epoch whose ``monitor`` reaches ``value``.

    The notebooks' "stop when the loss falls below 0.1 / accuracy passes 99%" callback:
    ``StopAtThreshold("loss", 0.1)`` stops once ``loss <= 0.1`` (``mode="min"``);
    ``StopAtThreshold("accuracy", 0.99)`` once ``accuracy >= 0.99`` (``mode="max"``).
    ``mode="auto"`` decides from the name as :class:`EarlyStopping` does.
    """

    def __init__(self, monitor: str = "loss", value: float = 0.1, mode: str = "auto",
                 verbose: int = 1):
        if not np.isfinite(value):
            raise ValueError(f"StopAtThreshold: value={value!r}; expected a finite number")
        self.monitor, self.value, self.verbose = monitor, float(value), verbose
        self.mode = resolve_mode(monitor, mode, "StopAtThreshold")
        self.load_state_dict({})

    def on_epoch_end(self, epoch, logs, state):
        current = monitored(logs, self.monitor, "StopAtThreshold")
        reached = current <= self.value if self.mode == "min" else current >= self.value
        if reached:
            self.stopped_epoch, self.stop_training = epoch, True
            if self.verbose:
                print(f"Epoch {epoch + 1}: {self.monitor} = {current:.4f} reached "
                      f"{self.value:g}; stopping", flush=True)
        return None

    def state_dict(self):
        return {"stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state):
        self.stopped_epoch = state.get("stopped_epoch")
        self.stop_training = self.stopped_epoch is not None


class ReduceLROnPlateau(MonitorCallback):
    """Multiplies the learning rate by ``factor`` when ``monitor`` stops improving (Keras's).

    Acts on ``opt_state.hyperparams["learning_rate"]`` (see :func:`flaxconv.optim.make`),
    so the optimizer must have a constant learning rate: a schedule would overwrite it.

    Args:
      monitor: a key of the epoch logs.
      factor: new_lr = max(lr * factor, min_lr); in (0, 1).
      patience: epochs without improvement before reducing.
      verbose: 1 prints each reduction.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (see :class:`MonitorCallback`).
      min_delta: an improvement must be larger than this.
      cooldown: epochs to wait after a reduction before counting again.
      min_lr: the learning rate never goes below this.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
    ):
        if not 0.0 < factor < 1.0:
            raise ValueError(f"ReduceLROnPlateau: factor={factor!r}; expected 0 < factor < 1")
        if min_lr < 0:
            raise ValueError(f"ReduceLROnPlateau: min_lr={min_lr!r}; expected >= 0")
        super().__init__(monitor, mode, min_delta, patience, verbose)
        _check_non_negative("ReduceLROnPlateau", "cooldown", cooldown)
        self.factor, self.cooldown, self.min_lr = float(factor), cooldown, float(min_lr)
        self.load_state_dict({})

    def on_train_begin(self, state, workdir):
        hyperparams = getattr(state.opt_state, "hyperparams", None)
        if not hyperparams or "learning_rate" not in hyperparams:
            raise ValueError(
                "ReduceLROnPlateau needs the learning rate in opt_state.hyperparams; build "
                "the optimizer with flaxconv.optim.make or optax.inject_hyperparams"
            )
        if "learning_rate" in getattr(state.opt_state, "hyperparams_states", {}):
            raise ValueError(
                "ReduceLROnPlateau needs a constant learning rate, but the optimizer's is a "
                "schedule (which sets it at every step); pass a number to optim.make"
            )

    def on_epoch_end(self, epoch, logs, state):
        current = self.current(logs)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self.is_improvement(current, self.best):
            self.best, self.wait = current, 0
            return None
        if self.cooldown_counter > 0:
            return None
        self.wait += 1
        if self.wait < self.patience:
            return None
        old = optim.learning_rate(state.opt_state)
        if float(old) <= np.float32(self.min_lr):
            return None
        new = max(float(old) * self.factor, self.min_lr)
        value = jax.device_put(jnp.asarray(new, old.dtype), old.sharding)
        self.cooldown_counter, self.wait = self.cooldown, 0
        if self.verbose:
            print(f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new:g}.",
                  flush=True)
        return state.replace(opt_state=optim.set_learning_rate(state.opt_state, value))

    def state_dict(self):
        return {**super().state_dict(), "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.cooldown_counter = state.get("cooldown_counter", 0)
