"""Graceful preemption: SIGTERM stops a run at the next step boundary, saved, to be resumed.

Colab, spot and preemptible cloud VMs and Kubernetes end a job with SIGTERM, then a kill a
few seconds later. Python's default for SIGTERM ends the process at once, losing the epoch
in progress. While ``fc.fit`` (or ``experiments/mnist_sweep.py``) trains in a workdir,
:func:`watch_sigterm` turns the signal into a request that the loop sees between chunks of
steps: it stops there, saves the state it has reached, prints one line and exits with
status 143 (128 + SIGTERM, what a shell reports for a process that SIGTERM ended) by
raising :class:`Preempted`. Running the same command again resumes from that point and ends
with the same parameters as an uninterrupted run. A second SIGTERM ends the process at once
(saves are atomic, so that is a kill -9: the previous checkpoint is resumed).

In a multi-process run (``jax.distributed``) every process must stop at the same step, or
the others would wait forever in a collective. There the signal is JAX's to catch: its
preemption service (on by default) handles SIGTERM in each process and tells all of them,
and the run asks :func:`jax.experimental.multihost_utils.reached_preemption_sync_point` at
each step or chunk boundary; all processes get True at the same boundary, save together
and exit with status 143. The protocol needs one sequence of call ids per process, so
nothing else may call it while ``fit`` trains: flaxconv's checkpoints never do (an Orbax
``CheckpointManager``'s saves otherwise would), nor may a callback's own manager.

The anchors are TensorFlow's ``PreemptionCheckpointHandler`` (save at the next step after
the signal, then exit) and Keras's ``BackupAndRestore`` (resume mid-epoch by skipping the
batches already trained). A stopped epoch is saved under ``<workdir>/preempted/<step>/``
with the per-step metric sums trained so far, so the resumed epoch reports the same loss
and accuracy; it is removed once the epoch's own checkpoint is on disk.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sys
import threading
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxconv.checkpoint import Checkpoints
from flaxconv.state import TrainState

__all__ = [
    "EXIT_STATUS",
    "PARTIAL_DIR",
    "PartialEpoch",
    "Preempted",
    "StopFlag",
    "drop_partial",
    "load_partial",
    "preempt",
    "request_stop",
    "watch_sigterm",
]

#: The exit status of a preempted run: 128 + SIGTERM, as if the signal had ended it.
EXIT_STATUS = 128 + signal.SIGTERM
#: Where a workdir keeps the checkpoint of an epoch stopped part-way.
PARTIAL_DIR = "preempted"


class Preempted(SystemExit):
    """The run stopped for a preemption request after saving its state.

    A ``SystemExit`` with code :data:`EXIT_STATUS` (143): uncaught, it ends the process with
    that status and no traceback (the one-line message was printed to stderr already), and
    ``except Exception`` blocks let it through. ``str()`` is the message.
    """

    def __init__(self, message: str):
        super().__init__(EXIT_STATUS)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StopFlag:
    """Whether a stop was requested (call it); from :func:`watch_sigterm`.

    ``reason`` names what asked (``"SIGTERM"``, or the text given to :func:`request_stop`);
    :meth:`close` puts back the SIGTERM handler that was there before.
    """

    def __init__(self):
        self.reason: str | None = None
        self._previous: Any = None
        self._installed = False
        self._synced = False  # multi-process: JAX's preemption sync point decides

    def __call__(self) -> bool:
        # Every process asks at the same boundaries, so the call ids agree (the protocol
        # needs that); the sync point is one id that all processes reach.
        if (self.reason is None and self._synced
                and multihost_utils.reached_preemption_sync_point(next(_sync_point_ids))):
            self.reason = "SIGTERM: JAX's preemption notice"
        return self.reason is not None

    def _on_sigterm(self, signum, frame) -> None:
        self.reason = "SIGTERM"
        # One-shot: a second SIGTERM gets the default (an immediate end), as a user who
        # sends it twice expects; every save is atomic, so nothing is half-written.
        signal.signal(signal.SIGTERM, self._previous)

    def close(self) -> None:
        """Puts back the previous SIGTERM handler; calling it again does nothing."""
        global _active
        if self._installed:
            self._installed = False
            signal.signal(signal.SIGTERM, self._previous)
        if _active is self:
            _active = None


_active: StopFlag | None = None  # the flag of the run now training in this process
# This process's calls of JAX's preemption sync point: ids that only grow, across runs.
_sync_point_ids = itertools.count()


def watch_sigterm() -> StopFlag:
    """Starts turning SIGTERM into a stop request for the run that calls it; returns the
    flag the run polls (and must :meth:`~StopFlag.close`).

    The handler is installed only where it can work: in the main thread (Python delivers
    signals there), in a single-process run, and where SIGTERM still has its default
    disposition (a handler of the user's or of another framework is left alone). Elsewhere
    the flag only answers :func:`request_stop`. In a multi-process run the flag asks JAX's
    preemption sync point instead (see the module's docstring), unless the user turned
    JAX's preemption service off (``jax_enable_preemption_service``).
    """
    global _active
    flag = StopFlag()
    if jax.process_count() > 1:
        flag._synced = bool(jax.config.jax_enable_preemption_service)
    elif (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        flag._previous = signal.signal(signal.SIGTERM, flag._on_sigterm)
        flag._installed = True
    _active = flag
    return flag


def request_stop(reason: str = "request_stop()") -> bool:
    """Asks the run training in this process to stop as SIGTERM would: at the next step or
    chunk boundary, saved, raising :class:`Preempted`. For a scheduler's other signals
    (e.g. Slurm's ``--signal=USR1@60``) or a time budget: call it from a handler or a
    callback. Returns False when no run with a workdir is training (nothing happens).

    Raises:
      RuntimeError: in a multi-process run, where one process stopping alone would leave
        the others waiting in a collective; send SIGTERM to any one process instead.
    """
    if _active is None:
        return False
    if jax.process_count() > 1:
        raise RuntimeError(
            f"request_stop() in a multi-process run ({jax.process_count()} processes): one "
            "process cannot stop alone; send SIGTERM to any one of them, and JAX's "
            "preemption service stops them all at the same step"
        )
    _active.reason = reason
    return True


class PartialEpoch(NamedTuple):
    """An epoch stopped part-way, as :func:`load_partial` reads it back.

    Attributes:
      state: the state after ``steps`` steps of epoch ``epoch``.
      epoch: 0-based.
      steps: how many of the epoch's steps (batches) were trained.
      sums: per-step metric sums of those steps, each a numpy array ``[steps]``.
      seconds: the training time they took.
      path: the checkpoint it was read from.
    """

    state: TrainState
    epoch: int
    steps: int
    sums: dict[str, np.ndarray]
    seconds: float
    path: str


def _partial_checkpoints(workdir: str) -> Checkpoints:
    return Checkpoints(os.path.join(workdir, PARTIAL_DIR), max_to_keep=1, asynchronous=False)


def preempt(
    workdir: str,
    state: TrainState,
    *,
    epoch: int,
    epochs: int,
    steps: int,
    sums: dict[str, Any] | None,
    seconds: float,
    reason: str | None,
) -> Preempted:
    """Saves a run stopped after ``steps`` steps of 0-based ``epoch`` and returns the
    :class:`Preempted` to raise, having printed its message to stderr.

    ``sums`` (per-step metric sums ``[steps]``) is None when the epoch is complete and its
    own checkpoint holds everything; then nothing more is written. Otherwise ``state`` goes
    to ``<workdir>/preempted/<global step>/`` (synchronously; the previous one is
    replaced).
    """
    step = int(np.max(jax.device_get(state.step)))  # a population's members share it
    if sums is None:
        where = f"after epoch {epoch + 1}/{epochs}"
        saved = os.path.join(workdir, "checkpoints", str(epoch))
    else:
        checkpoints = _partial_checkpoints(workdir)
        try:
            checkpoints.save(
                step, state, {"epoch": epoch, "steps": steps, "seconds": seconds,
                              "sums": {k: np.asarray(v) for k, v in sums.items()}},
            )
        finally:
            checkpoints.close()
        where = f"in epoch {epoch + 1}/{epochs} after {steps} of its steps"
        saved = os.path.join(workdir, PARTIAL_DIR, str(step))
    message = (
        f"preempted ({reason or 'stop requested'}) at step {step}, {where}; saved {saved}; "
        f"run the same command again to resume"
    )
    print(message, file=sys.stderr, flush=True)
    return Preempted(message)


def load_partial(workdir: str, template: TrainState, epoch: int) -> PartialEpoch | None:
    """The saved part of 0-based ``epoch`` in ``workdir``, restored into ``template``'s
    structure and shardings (verified against its checksum); None if there is none.

    A partial checkpoint of another epoch (left by a run killed before it could remove it,
    or older than the newest epoch checkpoint) is removed; a corrupt one is reported with a
    ``RuntimeWarning``, set aside as any checkpoint is, and the epoch starts over.
    """
    folder = os.path.join(workdir, PARTIAL_DIR)
    if not os.path.isdir(folder):
        return None
    checkpoints = _partial_checkpoints(workdir)
    try:
        restored = checkpoints.restore_latest(template)
    finally:
        checkpoints.close()
    if restored is None or int(restored[1]["epoch"]) != epoch:
        drop_partial(workdir)
        return None
    state, meta = restored
    path = os.path.join(folder, str(int(jax.device_get(state.step))))
    sums = {k: np.asarray(v) for k, v in meta["sums"].items()}
    return PartialEpoch(state, epoch, int(meta["steps"]), sums, float(meta["seconds"]), path)


def drop_partial(workdir: str) -> None:
    """Removes ``<workdir>/preempted/`` (once the epoch it continued is saved whole)."""
    shutil.rmtree(os.path.join(workdir, PARTIAL_DIR), ignore_errors=True)
