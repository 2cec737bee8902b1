"""Orbax checkpoints of a :class:`~flaxconv.state.TrainState` plus JSON metadata.

Each checkpoint is a directory ``<dir>/<epoch>/`` with two items:

* ``state``: the state's arrays (step, params, batch_stats, opt_state, rng) via Orbax's
  ``StandardSave`` (sharded arrays are saved and restored across devices and hosts);
* ``meta``: a JSON dict (epoch, history, callback state, ...) via ``JsonSave``.

Orbax writes to a temporary directory and renames it when complete, so a run killed while
saving leaves no half checkpoint under a step name. A checkpoint that is there but does not
restore (a truncated or edited file) is reported and skipped: :meth:`Checkpoints.restore_latest`
falls back to the previous intact one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from flaxconv.state import TrainState

log = logging.getLogger(__name__)


def state_arrays(state: TrainState) -> dict[str, Any]:
    """The pytree of ``state``'s arrays (what is saved); static fields are left out."""
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "rng": state.rng,
    }


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


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
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(
        self,
        epoch: int,
        state: TrainState,
        meta: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Saves ``state`` and ``meta`` as checkpoint ``epoch``; returns whether it saved."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state_arrays(state)),
            meta=ocp.args.JsonSave(meta or {}),
        )
        return self.manager.save(epoch, args=args, metrics=metrics)

    def epochs(self) -> list[int]:
        """The epochs that have a complete checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def best_epoch(self) -> int | None:
        return self.manager.best_step()

    def restore(self, epoch: int, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Checkpoint ``epoch`` restored into the structure (and shardings) of ``template``."""
        restored = self.manager.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(state_arrays(template))),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return template.replace(**restored["state"]), dict(restored["meta"] or {})

    def restore_latest(
        self, template: TrainState
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest checkpoint that restores, skipping (and logging) broken ones; None if
        there is none."""
        for epoch in reversed(self.epochs()):
            try:
                return self.restore(epoch, template)
            except Exception as error:  # noqa: BLE001 - any failure means "not intact"
                log.warning(
                    "checkpoint %s/%d does not restore (%s: %s); trying an older one",
                    self.directory, epoch, type(error).__name__, str(error).splitlines()[0],
                )
        return None

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
    checkpoints = Checkpoints(directory, asynchronous=False)
    try:
        restored = checkpoints.restore_latest(template)
    finally:
        checkpoints.close()
    if restored is None:
        raise FileNotFoundError(f"no intact checkpoint under {os.fspath(directory)}")
    return restored
