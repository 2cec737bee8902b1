"""Orbax checkpoints of a :class:`~flaxconv.state.TrainState` plus JSON metadata: the
:class:`Checkpoints` manager (keyed by epoch; latest or best; resume; corrupt ones moved
aside) and :func:`save_state` / :func:`load_state` for one checkpoint.

Each checkpoint is a directory ``<dir>/<epoch>/`` with two items:

* ``state``: the state's arrays (step, params, batch_stats, opt_state, rng) via Orbax's
  ``StandardSave`` (sharded arrays are saved and restored across devices and hosts);
* ``meta``: a JSON dict (epoch, history, callback state, ...) via ``JsonSave``; numpy or
  jax arrays inside it (e.g. a callback's best weights) go to a third item, ``arrays``, and
  come back as numpy arrays in their place.

Orbax writes to a temporary directory and renames it when complete, so a run killed while
saving leaves no half checkpoint under a step name. Orbax does not notice changed bytes in an
array file, though, so every checkpoint also carries a SHA-256 of its arrays and metadata,
checked by every restore (:meth:`Checkpoints.restore` and :func:`restore_params`). A
checkpoint that does not restore or fails the check (a truncated, garbled or edited file) is
reported with a warning and moved aside to ``<dir>.corrupt/``:
:meth:`Checkpoints.restore_latest` falls back to the previous intact one.

A save that fails because the disk is full or the folder is not writable raises one
:class:`~flaxconv.workdir.WorkdirWriteError` naming the checkpoint, from that save or (for
an asynchronous one) from the next save, :meth:`Checkpoints.wait` or :meth:`Checkpoints.close`;
its unfinished temporary folder is removed, and the checkpoints already committed stay.
Either way that error is the one report: the tracebacks of Orbax's other reads and writes
in flight are dropped (:mod:`flaxconv.orbax_reports`).

What a checkpoint holds and its checksum are in :mod:`flaxconv.checkpoint_contents`;
:func:`restore_params` (some layers into another model, for fine-tuning) is in
:mod:`flaxconv.checkpoint_transfer`. Both are re-exported here.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import glob
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flaxconv import orbax_reports

# Checkpoints.save looks _CHECKSUM and _digest up in this module (tests patch them here).
from flaxconv.checkpoint_contents import (  # noqa: F401 - the unused ones: re-exported
    _CHECKSUM,
    _LEGACY_CHECKSUM,
    CorruptCheckpointError,
    _array_targets,
    _digest,
    _legacy_digest,
    _put_arrays,
    _take_arrays,
    _verify,
    state_arrays,
)
from flaxconv.checkpoint_transfer import restore_params  # noqa: F401 - re-exported
from flaxconv.state import TrainState
from flaxconv.workdir import WorkdirWriteError, write_error


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# What a checkpoint takes on disk besides its arrays' bytes: Orbax's metadata files and
# their file-system blocks (about 50 kB measured for a small state), with a margin.
_SAVE_OVERHEAD = 64 * 1024


class WeightsOnlyCheckpointError(ValueError):
    """A weights-only checkpoint (``ModelCheckpoint(save_weights_only=True)``: no optimizer
    state) restored into a template that has one. The checkpoint is intact: it is left in
    place, never moved aside as corrupt."""


class Checkpoints:
    """A thin wrapper of ``ocp.CheckpointManager`` keyed by epoch.

    Args:
      directory: where the checkpoints go (created if missing).
      max_to_keep: how many to keep (the best ones when ``best_metric`` is set).
      best_metric: keep the checkpoints with the best value of this metric (e.g.
        ``"val_loss"``) instead of the latest; saves must then pass ``metrics``.
      best_mode: ``"min"`` or ``"max"`` for ``best_metric``.
      asynchronous: save in a background thread (call :meth:`wait` or :meth:`close`).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int | None = 2,
        best_metric: str | None = None,
        best_mode: str = "min",
        asynchronous: bool = True,
    ):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r}; expected 'min' or 'max'")
        self.directory = os.path.abspath(os.fspath(directory))
        best_fn: Callable[[Any], float] | None = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            best_fn=best_fn,
            best_mode=best_mode,
            keep_checkpoints_without_metrics=False if best_fn else True,
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta", "arrays")
        )
        # Orbax's manager asks JAX's preemption sync point from its saves, with its own
        # step numbers (and from a background thread). The protocol needs one sequence of
        # ids per process, and fit's stop flag owns it (flaxconv.preemption); each save
        # here is one fit asked for anyway.
        self.manager.reached_preemption = lambda step: False
        self.asynchronous = asynchronous
        self._pending: int | None = None  # the epoch of a save that may still be running

    def save(
        self,
        epoch: int,
        state: TrainState,
        meta: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Saves ``state`` and ``meta`` as checkpoint ``epoch``; returns whether it saved
        (False when checkpoint ``epoch`` exists already).

        ``meta`` is a dict of JSON-able values and numpy/jax arrays, nested in dicts and
        lists (tuples come back as lists).
        """
        arrays: list[np.ndarray] = []
        meta = json.loads(json.dumps(_take_arrays(meta or {}, arrays)))
        tree = state_arrays(state)
        digest = _digest(tree, arrays, meta)
        if digest is not None:
            meta[_CHECKSUM] = digest
        items = dict(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
        if arrays:
            items["arrays"] = ocp.args.StandardSave({str(i): a for i, a in enumerate(arrays)})
        self.wait()  # Orbax's save waits for the previous one too; its error names that one
        self._pending = epoch
        if epoch not in self.manager.all_steps():
            self._check_space(epoch, [*jax.tree.leaves(tree), *arrays])
        try:
            saved = self.manager.save(epoch, args=ocp.args.Composite(**items), metrics=metrics)
        except Exception as error:
            self._raise_write_error(error)
            raise
        if not self.asynchronous:
            self._pending = None
        return saved

    def epochs(self) -> list[int]:
        """The epochs that have a complete checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def best_epoch(self) -> int | None:
        return self.manager.best_step()

    def restore(self, epoch: int, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Checkpoint ``epoch`` restored into the structure (and shardings) of ``template``.

        Raises:
          CorruptCheckpointError: its arrays or metadata do not match the saved checksum.
          Other exceptions of Orbax's: files missing or unreadable, another structure.
        """
        orbax_reports.reading(os.path.join(self.directory, str(epoch)))
        meta = self.manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = dict(meta["meta"] or {})
        if meta.get("weights_only") and jax.tree.leaves(template.opt_state):
            raise WeightsOnlyCheckpointError(
                f"checkpoint {self.directory}/{epoch} holds weights only (no optimizer "
                f"state); restore it with flaxconv.checkpoint.restore_params(directory, "
                f"state), or into a template whose opt_state is None")
        targets: dict[str, np.ndarray] = {}
        _array_targets(meta, targets)
        items = dict(state=ocp.args.StandardRestore(_abstract(state_arrays(template))))
        if targets:
            items["arrays"] = ocp.args.StandardRestore(targets)
        restored = self.manager.restore(epoch, args=ocp.args.Composite(**items))
        arrays = dict(restored["arrays"]) if targets else {}
        _verify(f"{self.directory}/{epoch}", meta, restored["state"], arrays)
        return template.replace(**restored["state"]), _put_arrays(meta, arrays)

    def restore_latest(
        self, template: TrainState
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest checkpoint that restores; None if there is none.

        A checkpoint that fails to restore is reported (a ``RuntimeWarning``) and moved to
        ``<directory>.corrupt/`` so that its epoch can be saved again; then the next older
        one is tried.
        """
        for epoch in reversed(self.epochs()):
            try:
                return self.restore(epoch, template)
            except WeightsOnlyCheckpointError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure means "not intact"
                moved = self._move_aside(epoch)
                reason = (str(error).strip().splitlines() or [""])[0][:300]
                warnings.warn(
                    f"checkpoint {self.directory}/{epoch} is corrupt or incomplete "
                    f"({type(error).__name__}: {reason}); skipped it and moved it to {moved}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return None

    def _move_aside(self, epoch: int) -> str:
        """Moves checkpoint ``epoch`` out of the manager's directory (kept for inspection)."""
        source = os.path.join(self.directory, str(epoch))
        target = os.path.join(self.directory + ".corrupt", f"{epoch}-{time.time_ns()}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(source, target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk.

        Raises:
          WorkdirWriteError: the disk filled up or the folder is not writable (naming the
            checkpoint); other errors of Orbax's as they are.
        """
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            self._raise_write_error(error)
            raise
        self._pending = None

    def close(self) -> None:
        """Waits for pending saves (raising their error, see :meth:`wait`), then closes."""
        try:
            self.wait()
        except BaseException:
            with contextlib.suppress(Exception):  # the save's error is the one to report
                self.manager.close()
            raise
        self.manager.close()

    def _check_space(self, epoch: int, arrays: list[Any]) -> None:
        """Refuses a save that cannot fit on the disk before Orbax starts it: its writer
        threads, failing part-way, leave a trail of tracebacks and abandoned futures.

        Raises:
          WorkdirWriteError: ENOSPC, naming the checkpoint, the bytes it needs (its arrays,
            uncompressed, and :data:`_SAVE_OVERHEAD`) and the bytes free.
        """
        needed = sum(int(getattr(a, "nbytes", 0)) for a in arrays) + _SAVE_OVERHEAD
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            self._pending = None
            raise WorkdirWriteError(
                errno.ENOSPC,
                f"no space left on device (it needs about {needed / 1e6:.2f} MB, "
                f"{free / 1e6:.2f} MB are free)",
                os.path.join(self.directory, str(epoch)),
            )

    def _raise_write_error(self, error: Exception) -> None:
        """Raises ``error`` of the save in flight as a ``WorkdirWriteError`` naming its
        checkpoint, once its temporary folders are gone, when it is a full disk or a folder
        not writable; returns otherwise."""
        failed = write_error(os.path.join(self.directory, str(self._pending)), error)
        if failed is None:
            return
        self._pending = None
        # Orbax removes them at the next start too; this run holds the workdir's lock, and
        # nothing is writing (the failed save has ended), so they go now.
        for tmp in glob.glob(os.path.join(glob.escape(self.directory), "*.orbax-checkpoint-tmp*")):
            shutil.rmtree(tmp, ignore_errors=True)
        orbax_reports.write_error_raised()
        # The failed save's abandoned coroutines, closed now rather than at interpreter exit
        # (where they print tracebacks of their own).
        gc.collect()
        raise failed from error


def save_state(directory: str | os.PathLike, state: TrainState, meta: dict | None = None) -> None:
    """Writes ``state`` as a single Orbax checkpoint at ``directory`` (synchronously)."""
    checkpoints = Checkpoints(directory, max_to_keep=1, asynchronous=False)
    checkpoints.save(int(state.step), state, meta)
    checkpoints.close()


def load_state(
    directory: str | os.PathLike, template: TrainState
) -> tuple[TrainState, dict[str, Any]]:
    """The newest intact checkpoint under ``directory`` restored into ``template``'s structure.

    Raises:
      FileNotFoundError: no intact checkpoint there.
    """
    checkpoints = Checkpoints(directory, max_to_keep=None, asynchronous=False)
    try:
        restored = checkpoints.restore_latest(template)
    finally:
        checkpoints.close()
    if restored is None:
        raise FileNotFoundError(f"no intact checkpoint under {os.fspath(directory)}")
    return restored
