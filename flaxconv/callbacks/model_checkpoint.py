"""Keras's ``ModelCheckpoint`` on fit's protocol: the train state saved with Orbax every
epoch, every ``save_freq`` steps, or when ``monitor`` improves
(:class:`flaxconv.checkpoint.Checkpoints` underneath).
"""

from __future__ import annotations

import os

import numpy as np

from flaxconv.callbacks.base import Callback, improved, monitored, resolve_mode
from flaxconv.checkpoint import Checkpoints


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

