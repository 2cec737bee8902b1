"""Orbax checkpoints of a :class:`~flaxconv.state.TrainState` plus JSON metadata.

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
"""

from __future__ import annotations

import contextlib
import errno
import gc
import glob
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flaxconv.state import TrainState
from flaxconv.workdir import WorkdirWriteError, write_error

log = logging.getLogger(__name__)


class _DropReportedWriteErrors(logging.Filter):
    """Drops the log records of an Orbax save that failed for want of space or permission:
    each of its writer threads logs a traceback (hundreds of lines), and asyncio logs the
    futures it abandoned, while the error reaches the caller once, as a
    ``WorkdirWriteError`` naming the checkpoint (:meth:`Checkpoints.wait`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info or record.exc_info[1] is None:
            return True
        if record.name == "asyncio":
            if not _write_error_reported or "never retrieved" not in record.getMessage():
                return True
        elif f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        return write_error("", record.exc_info[1]) is None


_write_error_reported = False  # a WorkdirWriteError of a save was raised in this process
for _logger in ("absl", "asyncio"):  # Orbax logs through absl
    logging.getLogger(_logger).addFilter(_DropReportedWriteErrors())


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


# What a checkpoint takes on disk besides its arrays' bytes: Orbax's metadata files and
# their file-system blocks (about 50 kB measured for a small state), with a margin.
_SAVE_OVERHEAD = 64 * 1024


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files do not restore or do not match their checksum."""


class WeightsOnlyCheckpointError(ValueError):
    """A weights-only checkpoint (``ModelCheckpoint(save_weights_only=True)``: no optimizer
    state) restored into a template that has one. The checkpoint is intact: it is left in
    place, never moved aside as corrupt."""


_ARRAY = "__array__"  # marks where an array of ``meta`` was taken out to the ``arrays`` item
# The checksum of _digest; checkpoints of earlier versions carry _LEGACY_CHECKSUM instead.
_CHECKSUM = "_sha256_by_path"
_LEGACY_CHECKSUM = "_sha256"


def _take_arrays(tree: Any, arrays: list[np.ndarray]) -> Any:
    """``tree`` with each numpy/jax array replaced by a JSON placeholder (host copies of the
    arrays are appended to ``arrays``) and numpy scalars by Python ones."""
    if isinstance(tree, dict):
        return {k: _take_arrays(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_take_arrays(v, arrays) for v in tree]
    if isinstance(tree, np.generic):
        return tree.item()
    if isinstance(tree, np.ndarray | jax.Array):
        array = np.asarray(jax.device_get(tree))
        arrays.append(array)
        return {_ARRAY: len(arrays) - 1, "shape": list(array.shape), "dtype": array.dtype.name}
    return tree


def _array_targets(tree: Any, targets: dict[str, np.ndarray]) -> None:
    """Collects the restore target (shape and dtype) of every placeholder in ``tree``."""
    if isinstance(tree, dict):
        if _ARRAY in tree:
            targets[str(tree[_ARRAY])] = np.empty(tree["shape"], jnp.dtype(tree["dtype"]))
            return
        for v in tree.values():
            _array_targets(v, targets)
    elif isinstance(tree, list):
        for v in tree:
            _array_targets(v, targets)


def _put_arrays(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, dict):
        if _ARRAY in tree:
            return arrays[str(tree[_ARRAY])]
        return {k: _put_arrays(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_put_arrays(v, arrays) for v in tree]
    return tree


def _sharded_over_hosts(leaves: list[Any]) -> bool:
    return any(
        isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated)
        for x in leaves
    )


def _path_name(path: tuple[Any, ...]) -> str:
    """``"opt_state/0/mu/conv_0/kernel"``: dict keys, attribute names and sequence indices
    alike, so a tree restored without its template (dicts) names a leaf as the saved one."""
    names = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(name) for name in names)


def _digest(
    state: dict[str, Any], arrays: list[np.ndarray], meta: dict[str, Any]
) -> str | None:
    """SHA-256 over the path, dtype, shape and bytes of every state array (in path order),
    of the ``arrays`` item and the canonical JSON of ``meta``; None when a state array is
    sharded over several hosts (no host sees it all).

    Keyed by paths, not by the template's leaf order, so it can be checked on a state read
    without its template (:func:`restore_params`: named tuples come back as dicts)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    if _sharded_over_hosts([leaf for _, leaf in flat]):
        return None
    named = sorted(((_path_name(path), leaf) for path, leaf in flat), key=lambda e: e[0])
    named += [(f"arrays/{i}", array) for i, array in enumerate(arrays)]
    h = hashlib.sha256()
    for name, leaf in named:
        value = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{name}:{value.dtype.name}{value.shape}".encode())
        h.update(value.tobytes())
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def _legacy_digest(
    state: dict[str, Any], arrays: list[np.ndarray], meta: dict[str, Any]
) -> str | None:
    """The checksum of earlier versions: like :func:`_digest` but over the leaves in the
    template's order, without paths."""
    leaves = jax.tree.leaves(state)
    if _sharded_over_hosts(leaves):
        return None
    h = hashlib.sha256()
    for leaf in [*leaves, *arrays]:
        value = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{value.dtype.name}{value.shape}".encode())
        h.update(value.tobytes())
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def _verify(where: str, meta: dict[str, Any], state: Any, arrays: dict[str, np.ndarray]) -> None:
    """Checks a restored checkpoint against the checksum in its ``meta`` (which it pops).

    Raises:
      CorruptCheckpointError: naming ``where``, when the arrays or meta differ from what was
        saved.
    """
    saved, legacy = meta.pop(_CHECKSUM, None), meta.pop(_LEGACY_CHECKSUM, None)
    ordered = [arrays[str(i)] for i in range(len(arrays))]
    if saved is not None:
        digest = _digest(state, ordered, meta)
    elif legacy is not None:
        saved, digest = legacy, _legacy_digest(state, ordered, meta)
    else:
        return  # saved without a checksum (its arrays were sharded over several hosts)
    if digest is not None and digest != saved:
        raise CorruptCheckpointError(f"checkpoint {where} does not match its checksum")


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
        global _write_error_reported
        _write_error_reported = True
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


# --- Partial restore (fine-tuning) --------------------------------------------------------


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
    against its checksum, as :meth:`Checkpoints.restore` does, before anything is copied.

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
    import warnings

    from flax import traverse_util

    from flaxconv import finetune

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
