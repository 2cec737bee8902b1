"""The callback protocol of :func:`flaxconv.fit`, and Keras's callbacks on it.

A callback is any object with some of these methods (all optional; the base class
:class:`Callback` gives no-op defaults):

* ``on_train_begin(state, workdir) -> None``: called once, after a resumed run has
  restored the callback with ``load_state_dict``.
* ``on_epoch_begin(epoch, state) -> TrainState | None``: before each epoch's first step.
* ``on_train_batch_end(batch, logs, state) -> TrainState | None`` with an integer
  ``batch_interval``: called after every training step whose global number (``state.step``
  after it) is a multiple of ``batch_interval``; ``batch`` is the step's index in the epoch
  (from 0) and ``logs`` the epoch's running ``loss`` and ``accuracy`` so far (Keras's batch
  logs). ``fit`` runs an epoch as one compiled loop, so it is cut at those steps only (one
  more host round trip each, no recompilation); a callback whose ``batch_interval`` is
  None or missing (the default) gets no batch calls. Keras calls ``on_train_batch_end``
  after every batch, which would cut the scanned epoch into single steps: set
  ``batch_interval = 1`` for that, knowing it costs the scan's speed.
* ``on_epoch_end(epoch, logs, state) -> TrainState | None``: ``epoch`` counts from 0;
  ``logs`` holds the epoch's numbers (``loss``, ``accuracy``, ``val_*``, ``lr``, ...);
  return a new state to replace the current one (e.g. a lowered learning rate), or None
  to keep it. ``fit`` donates the state's buffers to the next epoch: keep copies
  (``jax.device_get``), not references.
* ``on_train_end(state) -> TrainState | None``: after the last epoch (not after an error).
* ``close() -> None``: always called when ``fit`` ends, also after an error; finish
  background writes and release files here.
* ``stop_training: bool``: set it to end training after the current epoch. A resumed
  run of a stopped one trains no further.
* ``state_dict() -> dict`` / ``load_state_dict(d)``: the callback's state, saved with every
  checkpoint of ``fit``'s workdir, so that a resumed run continues it (patience counters,
  best values, best weights). JSON-able values and numpy/jax arrays, nested in dicts and
  lists; arrays come back as numpy arrays.

A callback object holds the state of one training run: give each ``fit`` call new ones.

>>> callbacks = [EarlyStopping("val_loss", patience=2, restore_best_weights=True),
...              ModelCheckpoint("best", monitor="val_accuracy", save_best_only=True),
...              ReduceLROnPlateau("val_loss", factor=0.5, patience=1),
...              StopAtThreshold("accuracy", 0.99)]
>>> state, history = fc.fit(state, (x, y), 20, validation_split=0.1, callbacks=callbacks)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxconv import optim
from flaxconv.checkpoint import Checkpoints
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


def _host_copy(tree: Any) -> Any:
    # A copy, not a view: fit donates the state's device buffers to the next epoch.
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _put_like(values: Any, reference: Any) -> Any:
    """``values`` (a host pytree) on the devices and shardings of ``reference``."""
    values = jax.tree.unflatten(jax.tree.structure(reference), jax.tree.leaves(values))
    return jax.tree.map(lambda x, ref: jax.device_put(x, ref.sharding), values, reference)


def _check_non_negative(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{owner}: {name}={value!r}; expected a non-negative integer")


class _Monitor(Callback):
    """A callback that watches one number of the epoch logs: Keras's ``monitor``,
    ``mode`` (resolved to "min" or "max"), ``min_delta``, ``patience`` and ``verbose``,
    checked with the subclass's name in the errors."""

    def __init__(self, monitor: str, mode: str, min_delta: float, patience: int, verbose: int):
        owner = type(self).__name__
        _check_non_negative(owner, "patience", patience)
        self.monitor, self.min_delta, self.patience = monitor, abs(min_delta), patience
        self.mode, self.verbose = resolve_mode(monitor, mode, owner), verbose

    def current(self, logs: dict[str, float]) -> float:
        """``logs[self.monitor]`` (:func:`monitored`)."""
        return monitored(logs, self.monitor, type(self).__name__)


class EarlyStopping(_Monitor):
    """Stops training when ``monitor`` has not improved for ``patience`` epochs (Keras's).

    Args:
      monitor: a key of the epoch logs, e.g. ``"val_loss"`` or ``"val_accuracy"``.
      min_delta: an improvement must be larger than this.
      patience: epochs without improvement before stopping.
      verbose: 1 prints when it stops and when it restores weights.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (from the name: ``*loss`` goes down,
        ``*accuracy``, ``top_k``, ``precision``, ``recall``, ``f1``, ``*auc`` go up).
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
        if improved(current, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = _weights(state)
            if self.baseline is None or improved(current, self.baseline, self.mode, self.min_delta):
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
            "wait": self.wait,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state):
        self.wait = state.get("wait", 0)
        self.best = state.get("best")
        self.best_epoch = state.get("best_epoch")
        self.stopped_epoch = state.get("stopped_epoch")
        self.best_weights = state.get("best_weights")
        self.stop_training = self.stopped_epoch is not None


def _weights(state: TrainState) -> dict[str, Any]:
    return {"params": _host_copy(state.params), "batch_stats": _host_copy(state.batch_stats)}


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


class ReduceLROnPlateau(_Monitor):
    """Multiplies the learning rate by ``factor`` when ``monitor`` stops improving (Keras's).

    Acts on ``opt_state.hyperparams["learning_rate"]`` (see :func:`flaxconv.optim.make`),
    so the optimizer must have a constant learning rate: a schedule would overwrite it.

    Args:
      monitor: a key of the epoch logs.
      factor: new_lr = max(lr * factor, min_lr); in (0, 1).
      patience: epochs without improvement before reducing.
      verbose: 1 prints each reduction.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (as :class:`EarlyStopping`).
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
        if improved(current, self.best, self.mode, self.min_delta):
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
        return {"wait": self.wait, "best": self.best, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state):
        self.wait = state.get("wait", 0)
        self.best = state.get("best")
        self.cooldown_counter = state.get("cooldown_counter", 0)


class ModelCheckpoint(Callback):
    """Saves the train state with Orbax every epoch (or every ``save_freq`` steps), or only
    when ``monitor`` improves; Keras's callback, in Keras's argument order.

    Built on :class:`flaxconv.checkpoint.Checkpoints` (an Orbax ``CheckpointManager``):
    saves are asynchronous, ``max_to_keep`` checkpoints are kept — the best ones by
    ``monitor`` with ``save_best_only``, else the latest. A checkpoint is named by its
    epoch (from 0), or with an integer ``save_freq`` by its global step; its metadata holds
    ``epoch``, ``logs`` and ``weights_only`` (and ``batch`` and ``step`` for step saves).
    ``flaxconv.checkpoint.load_state(directory, template)`` loads the newest whole one.

    Args:
      directory: where the checkpoints go; default ``<workdir>/model_checkpoint``.
        ``filepath=`` (Keras's name) is accepted too.
      monitor: the key of the logs that ranks checkpoints.
      verbose: 1 prints each save.
      save_best_only: save only when ``monitor`` beats the best so far.
      save_weights_only: save the model's variables — ``params`` and ``batch_stats`` (and
        the step and rng, two scalars) — without the optimizer state (Keras's
        ``save_weights``): for Adam about a third of the bytes, but a run cannot resume
        from it with the same optimizer moments. Load it with
        ``flaxconv.checkpoint.restore_params(directory, state)`` (Keras's
        ``load_weights``), or ``load_state(directory, state.replace(opt_state=None))``.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (as :class:`EarlyStopping`).
      save_freq: ``"epoch"``, or a positive integer: save after every ``save_freq``-th
        training step (counted by ``state.step``, across epochs) instead of at epoch ends,
        as Keras. ``fit`` then cuts its scanned epoch at those steps (see the module
        docstring). ``monitor`` is then read from the batch logs (``loss``, ``accuracy``:
        the epoch's running means), so a ``val_*`` monitor with ``save_best_only`` is
        refused (Keras would warn and save every time).
      initial_value_threshold: with ``save_best_only``, the value ``monitor`` must beat
        for the first save (Keras's); a finite number.
      max_to_keep: how many checkpoints to keep (None: all).
      asynchronous: write in a background thread (finished before ``fit`` returns).
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        max_to_keep: int | None = 1,
        asynchronous: bool = True,
        *,
        filepath: str | os.PathLike | None = None,
    ):
        if directory is not None and filepath is not None:
            raise ValueError("ModelCheckpoint: pass directory or filepath, not both")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(
                f"ModelCheckpoint: max_to_keep={max_to_keep!r}; expected a positive int or None"
            )
        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int | np.integer)
            or save_freq < 1
        ):
            raise ValueError(
                f"ModelCheckpoint: save_freq={save_freq!r}; expected 'epoch' or a positive "
                f"integer number of steps"
            )
        if initial_value_threshold is not None:
            if isinstance(initial_value_threshold, bool) or not isinstance(
                initial_value_threshold, int | float | np.integer | np.floating
            ) or not np.isfinite(initial_value_threshold):
                raise ValueError(
                    f"ModelCheckpoint: initial_value_threshold={initial_value_threshold!r}; "
                    f"expected a finite number or None"
                )
            if not save_best_only:
                raise ValueError(
                    f"ModelCheckpoint: initial_value_threshold={initial_value_threshold!r} "
                    f"only applies with save_best_only=True (Keras ignores it otherwise)"
                )
        if save_best_only and save_freq != "epoch" and monitor.startswith("val_"):
            raise ValueError(
                f"ModelCheckpoint: monitor={monitor!r} with save_freq={save_freq!r} and "
                f"save_best_only: validation metrics exist only at epoch ends; monitor "
                f"'loss' or 'accuracy' (the epoch's running means) or use save_freq='epoch'"
            )
        self.directory = directory if directory is not None else filepath
        self.monitor, self.verbose, self.save_best_only = monitor, verbose, save_best_only
        self.mode = resolve_mode(monitor, mode, "ModelCheckpoint") if save_best_only else mode
        self.save_weights_only = bool(save_weights_only)
        self.save_freq = save_freq if save_freq == "epoch" else int(save_freq)
        self.batch_interval = None if save_freq == "epoch" else int(save_freq)
        self.initial_value_threshold = (
            None if initial_value_threshold is None else float(initial_value_threshold)
        )
        self.max_to_keep, self.asynchronous = max_to_keep, asynchronous
        self.checkpoints: Checkpoints | None = None
        self.epoch = 0
        self.load_state_dict({})

    def on_train_begin(self, state, workdir):
        if self.directory is None:
            if workdir is None:
                raise ValueError(
                    "ModelCheckpoint needs a directory, or fit(..., workdir=...) to put "
                    "<workdir>/model_checkpoint in"
                )
            self.directory = os.path.join(workdir, "model_checkpoint")
        self.checkpoints = Checkpoints(
            self.directory,
            max_to_keep=self.max_to_keep,
            best_metric=self.monitor if self.save_best_only else None,
            best_mode=self.mode if self.save_best_only else "min",
            asynchronous=self.asynchronous,
        )

    def on_epoch_begin(self, epoch, state):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs, state):
        step = int(state.step)
        where = f"Epoch {self.epoch + 1}, step {step}"
        meta = {"epoch": self.epoch, "batch": batch, "step": step}
        self._save(step, where, meta, logs, state)

    def on_epoch_end(self, epoch, logs, state):
        if self.save_freq == "epoch":
            self._save(epoch, f"Epoch {epoch + 1}", {"epoch": epoch}, logs, state)
        return None

    def _save(self, number, where, meta, logs, state):
        """Checkpoint ``number`` of ``state``, unless ``save_best_only`` finds no
        improvement; ``where`` names the moment in messages."""
        if self.checkpoints is None:
            raise RuntimeError("ModelCheckpoint.on_train_begin was not called")
        metrics = None
        if self.save_best_only:
            current = monitored(logs, self.monitor, "ModelCheckpoint")
            if not improved(current, self.best, self.mode):
                if self.verbose:
                    print(f"{where}: {self.monitor} did not improve from "
                          f"{self.best:.5f}", flush=True)
                return
            if self.verbose:
                none = "inf" if self.mode == "min" else "-inf"
                before = none if self.best is None else f"{self.best:.5f}"
                print(f"{where}: {self.monitor} improved from {before} to "
                      f"{current:.5f}, saving to {self.checkpoints.directory}", flush=True)
            self.best, metrics = current, {self.monitor: current}
        elif self.verbose:
            print(f"{where}: saving to {self.checkpoints.directory}", flush=True)
        if self.save_weights_only:
            state = state.replace(opt_state=None)  # Orbax saves no leaf for None
        meta = {**meta, "logs": dict(logs), "weights_only": self.save_weights_only}
        # After a resume the epoch may be saved already (identical: training is
        # deterministic); Orbax then skips it.
        self.checkpoints.save(number, state, meta, metrics)

    def on_train_end(self, state):
        self.close()

    def close(self):
        if self.checkpoints is not None:
            self.checkpoints.close()
            self.checkpoints = None

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        best = state.get("best")
        self.best = self.initial_value_threshold if best is None else best


class TensorBoard(Callback):
    """Writes the epoch logs as TensorBoard scalars, like Keras's callback.

    ``<log_dir>/train`` gets ``epoch_<name>`` for the training numbers (``epoch_loss``,
    ``epoch_accuracy``, ``epoch_lr``, ...), ``<log_dir>/validation`` the ``val_*`` ones
    without the prefix. The step is the epoch (from 0). A resumed run purges the events of
    the epochs it trains again. Uses ``tensorboardX`` (``pip install flaxconv[tensorboard]``),
    imported when training begins: no TensorFlow needed.

    Args:
      log_dir: default ``<workdir>/tensorboard``.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None):
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.writers: dict[str, Any] = {}
        self.load_state_dict({})

    def on_train_begin(self, state, workdir):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "the TensorBoard callback needs tensorboardX: pip install 'flaxconv[tensorboard]'"
            ) from error
        if self.log_dir is None:
            if workdir is None:
                raise ValueError("TensorBoard needs a log_dir, or fit(..., workdir=...)")
            self.log_dir = os.path.join(workdir, "tensorboard")
        # A resumed run replays epochs from next_epoch on: hide their older events.
        purge = self.next_epoch or None
        self.writers = {
            name: SummaryWriter(
                os.path.join(self.log_dir, name),
                purge_step=purge,
                filename_suffix=f".{os.getpid()}",  # two runs in one second must not clash
            )
            for name in ("train", "validation")
        }

    def on_epoch_end(self, epoch, logs, state):
        for key, value in logs.items():
            name, tag = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            if np.ndim(value) == 0 and np.isfinite(value):
                self.writers[name].add_scalar(f"epoch_{tag}", float(value), epoch)
        for writer in self.writers.values():
            writer.flush()
        self.next_epoch = epoch + 1
        return None

    def close(self):
        for writer in self.writers.values():
            writer.close()
        self.writers = {}

    def on_train_end(self, state):
        self.close()

    def state_dict(self):
        return {"next_epoch": self.next_epoch}

    def load_state_dict(self, state):
        self.next_epoch = state.get("next_epoch", 0)


__all__ = [
    "Callback",
    "EarlyStopping",
    "ModelCheckpoint",
    "ReduceLROnPlateau",
    "StopAtThreshold",
    "TensorBoard",
    "improved",
    "monitored",
    "resolve_mode",
]
