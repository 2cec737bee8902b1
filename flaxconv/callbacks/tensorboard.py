"""Keras's ``TensorBoard`` callback on fit's protocol, reduced to what ``fit`` has: the
epoch logs as scalars, written with ``tensorboardX`` (no TensorFlow needed).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from flaxconv.callbacks.base import Callback


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
