"""Copying some layers out of a checkpoint into another model: fine-tuning's partial restore.

:func:`restore_params` reads a checkpoint of :mod:`flaxconv.checkpoint` (or a ``fit``
workdir's ``checkpoints/``) without a template: the saved tree's own metadata gives the
structure, :func:`flaxconv.finetune.transfer_plan` checks the chosen layers against the
target's, and the whole checkpoint is verified against its checksum
(:mod:`flaxconv.checkpoint_contents`) before any array is copied. It only reads: a broken
checkpoint is reported and skipped, never moved. Host-side; nothing here is jitted.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from flaxconv import finetune, orbax_reports
from flaxconv.checkpoint_contents import _array_targets, _verify
from flaxconv.state import TrainState


def restore_params(
    directory: str | os.PathLike,
    state: TrainState,
    include: str | tuple[str, ...] | list[str] = ("*",),
    *,
    epoch: int | None = None,
) -> TrainState:
    """``state`` with the params and batch_stats of the ``include`` layers read from a
    checkpoint: a pretrained backbone under a new head.

    The checkpoint's model may have other layers and any optimizer. Shapes are checked
    against the checkpoint's metadata first; then the whole checkpoint is read and verified
    against its checksum, as :meth:`flaxconv.checkpoint.Checkpoints.restore` does, before
    anything is copied.

    >>> state = restore_params("runs/mnist_convnet", state, include=("conv_*", "bn_*"))

    Args:
      directory: a checkpoint directory (``<dir>/<epoch>/``), or a ``fit`` workdir whose
        ``checkpoints/`` is used. Nothing there is written or moved.
      state: the target; its optimizer state and step are left as they are.
      include: layer-name patterns (``fnmatch`` on layer paths, see
        :func:`flaxconv.optim.layer_mask`); the default copies every layer.
      epoch: which checkpoint; by default the newest one that restores (a broken or corrupt
        one is reported with a ``RuntimeWarning`` and skipped).

    Raises:
      FileNotFoundError: no checkpoint there, or no checkpoint ``epoch``; or no intact one
        (each named with the reason it failed).
      CorruptCheckpointError: checkpoint ``epoch`` does not match its checksum.
      ValueError: a pattern matches no layer of ``state`` (listing its layers); an included
        layer the checkpoint lacks; arrays whose shapes differ, each named with both shapes.
    """
    root = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    handlers = {
        "state": ocp.PyTreeCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        "arrays": ocp.PyTreeCheckpointHandler(),
    }
    options = ocp.CheckpointManagerOptions(create=False)
    manager = ocp.CheckpointManager(root, item_handlers=handlers, options=options)
    if not manager.all_steps() and os.path.isdir(os.path.join(root, "checkpoints")):
        manager.close()
        root = os.path.join(root, "checkpoints")  # a fit workdir
        manager = ocp.CheckpointManager(root, item_handlers=handlers, options=options)
    failures = []
    try:
        epochs = sorted(manager.all_steps(), reverse=True)
        if epoch is not None:
            if epoch not in epochs:
                raise FileNotFoundError(
                    f"no checkpoint {epoch} under {root}; it has {sorted(epochs)}"
                )
            epochs = [epoch]
        for candidate in epochs:
            where = f"{root}/{candidate}"
            orbax_reports.reading(where)
            try:
                saved = manager.item_metadata(candidate)["state"]
                saved = getattr(saved, "tree", saved)
                source = {"params": saved["params"], "batch_stats": saved.get("batch_stats") or {}}
            except Exception as error:  # noqa: BLE001 - unreadable metadata: not intact
                if epoch is not None:
                    raise
                failures.append(f"{where}: no readable state metadata ({_reason(error)})")
                warnings.warn(
                    f"checkpoint {where} has no readable state metadata "
                    f"({_reason(error)}); trying an older one",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            paths = finetune.transfer_plan(
                source, state, include, source_name=f"checkpoint {where}"
            )
            try:
                restored = _read_verified(manager, candidate, saved, where)
            except Exception as error:  # noqa: BLE001 - any failure means "not intact"
                if epoch is not None:
                    raise
                failures.append(f"{where}: {_reason(error)}")
                warnings.warn(
                    f"checkpoint {where} does not restore ({_reason(error)}); trying an "
                    f"older one",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            variables = traverse_util.flatten_dict(
                {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}
            )
            return finetune.replace_arrays(state, {p: variables[p] for p in paths})
    finally:
        manager.close()
    why = f": {'; '.join(failures)}" if failures else ""
    raise FileNotFoundError(f"no intact checkpoint under {root}{why}")


def _reason(error: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {line[:200]}"


def _read_verified(
    manager: ocp.CheckpointManager, epoch: int, saved: Any, where: str
) -> dict[str, Any]:
    """The whole state of checkpoint ``epoch`` as host numpy arrays, in its saved structure
    (``saved``: its metadata tree; no template needed), checked against its checksum.

    Raises:
      CorruptCheckpointError: it does not match the checksum. Orbax's errors: unreadable.
    """
    meta = manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = dict(meta["meta"] or {})
    targets: dict[str, np.ndarray] = {}
    _array_targets(meta, targets)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    items = dict(state=ocp.args.PyTreeRestore(restore_args=as_numpy))
    if targets:
        items["arrays"] = ocp.args.PyTreeRestore(
            item=targets, restore_args=ocp.checkpoint_utils.construct_restore_args(targets)
        )
    restored = manager.restore(epoch, args=ocp.args.Composite(**items))
    arrays = dict(restored["arrays"]) if targets else {}
    _verify(where, meta, restored["state"], arrays)
    return restored["state"]
