"""``fit``: the Python loop around the jitted steps — epochs, validation, callbacks, progress,
history, checkpoints and resume.

Two data paths, picked by the type of ``train_data``:

* arrays ``(images, labels)`` (uint8 ``[N, H, W, C]``, int ``[N]``): the fast path. The
  data goes to the device once; each epoch is one (or, with a progress bar, a few) jitted
  ``lax.scan`` over a permutation drawn from the state's rng and the epoch number
  (:mod:`flaxconv.epochs`).
* a callable ``epoch -> iterable of batches`` (e.g. a ``flaxconv.data.stream`` pipeline): the
  streaming path, one donated jitted step per batch. For resume it must give the same
  batches for the same epoch.

With a ``workdir``, every epoch ends with an Orbax checkpoint of the state, the history and
the callbacks' state, then ``history.json``/``.csv``; training ends with ``curves.png``
(:func:`flaxconv.viz.plot_history`). Running the same
call again resumes from the newest intact checkpoint at the start of the next epoch: the
data order is a function of the state's rng and the epoch alone, so a run killed at any
moment and resumed ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from flaxconv import epochs as ep
from flaxconv import metrics as metrics_lib
from flaxconv import optim, parallel
from flaxconv.callbacks import Callback
from flaxconv.checkpoint import Checkpoints
from flaxconv.metrics import check_labels, num_classes
from flaxconv.state import TrainState
from flaxconv.steps import explain_kernels, train_step_fn
from flaxconv.workdir import (  # noqa: F401 - re-exported: fc.fit's names of one release
    LOCK_FILE,
    WorkdirLock,
    WorkdirLockedError,
    claim_workdir,
    lock_workdir,
    make_workdir,
    replace_file,
    write_json,
)

History = dict[str, list[float]]
ArrayData = tuple[Any, Any]

# Data-order keys live in their own fold_in domain, apart from the per-step keys.
_DATA_ORDER_DOMAIN = 0x7FFFFFFF

# The public train_step's function, donating the state the loop no longer needs.
_train_step_donated = jax.jit(train_step_fn, donate_argnums=0)

__all__ = [
    "History",
    "IncompatibleWorkdirError",
    "NonFiniteLossError",
    "WorkdirLock",
    "WorkdirLockedError",
    "check_labels",
    "claim_workdir",
    "data_order_key",
    "fit",
    "lock_workdir",
    "make_workdir",
    "num_classes",
    "run_config",
]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; ``step`` is the first bad step (1-based)."""

    def __init__(self, step: int, loss: float, epoch: int | None = None):
        self.step, self.loss, self.epoch = step, loss, epoch
        where = f"step {step}" + ("" if epoch is None else f" (epoch {epoch + 1})")
        super().__init__(
            f"the training loss became {loss} at {where}; stopped (lower the learning "
            f"rate or check the inputs). The last good checkpoint, if any, is kept."
        )


class IncompatibleWorkdirError(ValueError):
    """The workdir holds a run whose configuration differs from this one."""


def data_order_key(state: TrainState, epoch: int) -> jax.Array:
    """The permutation key of ``epoch``: a function of the state's rng and the epoch only."""
    base = jax.random.fold_in(jax.random.wrap_key_data(state.rng), _DATA_ORDER_DOMAIN)
    return jax.random.fold_in(base, epoch)


def _as_arrays(data: ArrayData, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise TypeError(f"{what} must be (images, labels) arrays; got {type(data).__name__}")
    images, labels = data
    if len(images) != len(labels):
        raise ValueError(f"{what}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _split(data: ArrayData, fraction: float) -> tuple[ArrayData, ArrayData]:
    """Keras's validation_split: the last ``fraction`` of the (unshuffled) data."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_split={fraction}; expected a fraction in (0, 1)")
    images, labels = data
    cut = len(labels) - int(round(len(labels) * fraction))
    if cut == 0 or cut == len(labels):
        raise ValueError(
            f"validation_split={fraction} of {len(labels)} examples leaves an empty split"
        )
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


class _Progress:
    """Keras-style output: a bar within the epoch (terminals) and one line per epoch."""

    def __init__(self, verbose: str, epochs: int, steps: int | None):
        self.verbose, self.epochs, self.steps = verbose, epochs, steps
        self.bar = None

    def begin(self, epoch: int) -> None:
        if self.verbose == "silent":
            return
        print(f"Epoch {epoch + 1}/{self.epochs}", flush=True)
        if self.verbose == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.steps, file=sys.stdout, leave=False, dynamic_ncols=True,
                bar_format="{n_fmt}/{total_fmt} {bar} {elapsed} {rate_fmt}",
                unit="step", ascii=" ━",
            )

    def advance(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def end(self, steps: int, seconds: float, logs: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.verbose == "silent":
            return
        numbers = " - ".join(
            f"{k}: {v:.4f}" for k, v in logs.items() if k not in ("epoch_seconds", "lr")
        )
        ms = 1000.0 * seconds / max(steps, 1)
        print(f"{steps}/{steps} - {seconds:.1f}s - {ms:.1f}ms/step - {numbers}", flush=True)


def _resolve_verbose(verbose: str | int) -> str:
    if verbose == "auto":
        return "bar" if sys.stdout.isatty() else "epoch"
    aliases = {0: "silent", 1: "bar", 2: "epoch"}
    verbose = aliases.get(verbose, verbose)
    if verbose not in ("bar", "epoch", "silent"):
        raise ValueError(f"verbose={verbose!r}; expected 'auto', 'bar', 'epoch' or 'silent'")
    return verbose


def _first_non_finite(losses: np.ndarray) -> int | None:
    bad = np.flatnonzero(~np.isfinite(losses))
    return int(bad[0]) if bad.size else None


def _train_epoch_arrays(state, images, labels, plan, key, progress, chunks):
    """One epoch on device-resident arrays in ``chunks`` scan calls (1 = fastest), or with
    ``chunks=None`` one jitted step per batch (see :func:`_scan_chunks`)."""
    indices = plan.indices(key)
    per_step = []
    if chunks is None:
        for i in range(plan.steps):
            batch = ep.gather_batch(images, labels, indices[i], plan.mask[i])
            state, sums = _train_step_donated(state, batch)
            per_step.append(jax.tree.map(lambda x: x[None], sums))
            progress.advance(1)
        chunks = 0
    bounds = np.linspace(0, plan.steps, chunks + 1).round().astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi == lo:
            continue
        state, sums = ep.train_epoch(state, images, labels, indices[lo:hi], plan.mask[lo:hi])
        per_step.append(sums)
        progress.advance(int(hi - lo))
    sums = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *per_step)
    return state, sums


def _scan_chunks(state: TrainState, plan: ep.EpochPlan, verbose: str) -> int | None:
    """How many ``lax.scan`` calls an epoch on arrays takes: one (20 with a progress bar),
    or None for one jitted step per batch, on CPU, when the model has a convolution that
    the kernel seam leaves to XLA: XLA:CPU runs JAX's own convolution gradients as a naive
    loop inside any loop (jax-ml/jax#12868), several times slower than the step alone."""
    if jax.default_backend() == "cpu":
        images = jax.ShapeDtypeStruct((plan.batch_size, *state.input_shape), np.uint8)
        if any(choice.fallback and choice.op.startswith("conv")
               for choice in explain_kernels(state, images)):
            return None
    return 20 if verbose == "bar" else 1


def _train_epoch_stream(state, batches: Iterable[dict], progress, classes: int):
    per_step = []
    for batch in batches:
        labels = batch.get("label") if isinstance(batch, dict) else None
        if isinstance(labels, np.ndarray):  # host batches: checked for free, before the step
            mask = batch.get("mask")
            check_labels(labels if mask is None else labels[np.asarray(mask, bool)], classes,
                         "training labels")
        state, sums = _train_step_donated(state, batch)
        per_step.append(sums)
        progress.advance(1)
    if not per_step:
        raise ValueError("train_data produced no batch in this epoch")
    sums = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_step)
    return state, sums


def _write_history(workdir: str, history: History) -> None:
    """``history.json`` and ``history.csv`` (a row per epoch)."""
    write_json(os.path.join(workdir, "history.json"), history)

    def write_csv(tmp):
        keys = list(history)
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", *keys])
            rows = zip(*history.values(), strict=True)  # _append keeps them aligned
            writer.writerows([i + 1, *row] for i, row in enumerate(rows))

    replace_file(os.path.join(workdir, "history.csv"), write_csv)


def _write_curves(workdir: str, history: History) -> None:
    """``curves.png``: loss and accuracy per epoch, train vs validation."""
    from flaxconv import viz  # matplotlib is imported only here

    replace_file(os.path.join(workdir, "curves.png"), lambda t: viz.plot_history(history, t))


def _append(history: History, logs: dict[str, float]) -> None:
    """Appends an epoch's logs; keys new or missing this epoch get NaN so rows line up."""
    epochs = max((len(v) for v in history.values()), default=0)
    for key in logs:
        history.setdefault(key, [math.nan] * epochs)
    for key, values in history.items():
        values.append(float(logs.get(key, math.nan)))


def _one_line(value: Any, limit: int = 80) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_config(workdir: str, config: dict[str, Any]) -> None:
    """Refuses a workdir that holds a run of another configuration; records ours."""
    path = os.path.join(workdir, "config.json")
    config = json.loads(json.dumps(config, default=str))
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = sorted(
            (k for k in set(previous) | set(config) if previous.get(k) != config.get(k)),
            key=lambda k: (k.startswith("_"), k),  # the caller's keys first
        )
        if changed:
            details = "; ".join(
                f"{k.lstrip('_')}: {_one_line(previous.get(k))} -> {_one_line(config.get(k))}"
                for k in changed
            )
            raise IncompatibleWorkdirError(
                f"workdir {workdir} holds a run with another configuration ({details}); "
                f"use another workdir or delete this one"
            )
        return
    write_json(path, config)


def run_config(state: TrainState, config: dict[str, Any] | None) -> dict[str, Any]:
    """What must match for a workdir to be resumed: the model, input shape, parameter
    shapes, optimizer state structure, and the caller's ``config``."""
    shapes = jax.tree.map(lambda x: list(np.shape(x)), state.params)
    return {
        "_model": _one_line(repr(state.model), limit=10_000),
        "_input_shape": list(state.input_shape),
        "_param_shapes": json.dumps(shapes, sort_keys=True),
        "_opt_state": str(jax.tree.structure(state.opt_state)),
        **(config or {}),
    }


def _callback_states(callbacks: Sequence[Callback]) -> list[dict[str, Any]]:
    return [
        {"class": type(c).__name__, "state": c.state_dict() if hasattr(c, "state_dict") else {}}
        for c in callbacks
    ]


def _load_callback_states(callbacks: Sequence[Callback], saved: list[dict[str, Any]]) -> None:
    for i, callback in enumerate(callbacks):
        entry = saved[i] if i < len(saved) else None
        if entry is None or entry.get("class") != type(callback).__name__:
            warnings.warn(
                f"callback {i} ({type(callback).__name__}) has no saved state in the "
                f"checkpoint (the callbacks differ from the first run's); it starts afresh",
                RuntimeWarning,
                stacklevel=3,
            )
        elif hasattr(callback, "load_state_dict"):
            callback.load_state_dict(entry["state"])


def fit(
    state: TrainState,
    train_data: ArrayData | Callable[[int], Iterable[dict]],
    epochs: int = 1,
    *,
    batch_size: int = 64,
    validation_data: ArrayData | None = None,
    validation_split: float | None = None,
    callbacks: Sequence[Callback] = (),
    workdir: str | os.PathLike | None = None,
    verbose: str | int = "auto",
    metrics: Sequence[str] = (),
    config: dict[str, Any] | None = None,
    eval_batch_size: int = 1000,
    steps_per_epoch: int | None = None,
) -> tuple[TrainState, History]:
    """Trains ``state`` for ``epochs`` epochs; Keras's ``model.fit`` as a function.

    Args:
      state: from :func:`flaxconv.create_train_state` (or a restored one).
      train_data: ``(images, labels)`` arrays — uint8/float ``[N, H, W, C]`` and int ``[N]``,
        trained device-resident — or a callable ``epoch -> iterable of batch dicts``
        (streaming; then give ``steps_per_epoch`` for the progress bar).
      epochs: total epochs; a resumed run continues up to this number.
      batch_size: for array data; the last partial batch is padded and masked.
      validation_data: ``(images, labels)`` evaluated after every epoch (``val_*`` logs).
      validation_split: Keras's: hold out the last fraction of array ``train_data``.
      callbacks: objects following :mod:`flaxconv.callbacks`.
      workdir: where ``checkpoints/``, ``config.json``, ``history.json``, ``history.csv``
        and ``curves.png`` go; a workdir with checkpoints is resumed.
      verbose: "bar" (a progress bar per step), "epoch" (a line per epoch), "silent", or
        "auto" (bar on a terminal, else epoch lines); Keras's 1/2/0 work too.
      metrics: more validation metrics, names of :mod:`flaxconv.metrics` with a scalar
        value (e.g. ``("top_5", "f1", "roc_auc")``), logged as ``val_<name>``.
      config: extra JSON-able settings that a resumed run must share (e.g. the CLI flags).
      eval_batch_size: batch size of the validation passes.
      steps_per_epoch: the progress bar's length for streaming data.

    Returns:
      The trained state and the history: a dict of per-epoch lists ``loss``, ``accuracy``,
      ``val_loss``, ``val_accuracy`` (with validation), ``val_<metric>``, ``lr`` and
      ``epoch_seconds``. A resumed run returns the whole history, earlier epochs included.

    Raises:
      NonFiniteLossError: a NaN/inf loss, naming the step; the last checkpoint stays.
      IncompatibleWorkdirError: ``workdir`` holds another configuration's run.
      WorkdirLockedError: another run is using ``workdir`` (see :func:`lock_workdir`).
      ValueError: labels outside the model's classes, bad arguments.
    """
    verbose = _resolve_verbose(verbose)
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs={epochs!r}; expected a non-negative integer")
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if "confusion" in metrics:
        raise ValueError("metrics: 'confusion' is not a number to log per epoch; use "
                         "flaxconv.metrics.evaluate for it")
    val_spec = metrics_lib.spec(("loss", "accuracy", *metrics))
    classes = num_classes(state)
    streaming = callable(train_data)
    if streaming and validation_split:
        raise ValueError("validation_split needs array train_data; pass validation_data instead")
    if not streaming:
        train_data = _as_arrays(train_data, "train_data")
        if validation_split:
            train_data, validation_data = _split(train_data, validation_split)
        check_labels(train_data[1], classes, "training labels")
        # Data parallel: state and data replicated over the devices of the state's mesh
        # (all devices by default), each step's batch split over them (flaxconv.parallel).
        state, images, labels, plan = parallel.place_for_fit(state, *train_data, batch_size)
        steps_per_epoch = plan.steps
    if validation_data is not None:
        validation_data = _as_arrays(validation_data, "validation_data")
        check_labels(validation_data[1], classes, "validation labels")

    history: History = {}
    start_epoch, stopped = 0, False
    checkpoints = None
    lock = None
    try:
        if workdir is not None:
            workdir = make_workdir(workdir)
            lock = lock_workdir(workdir)  # another run in it would delete our checkpoints
            _check_config(workdir, run_config(state, {"batch_size": batch_size, **(config or {})}))
            checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), max_to_keep=2)
            had_checkpoints = bool(checkpoints.epochs())
            restored = checkpoints.restore_latest(state)
            if restored is not None:
                state, meta = restored
                start_epoch = int(meta["epoch"]) + 1
                stopped = bool(meta.get("stopped", False))
                history = {k: list(v) for k, v in meta.get("history", {}).items()}
                _load_callback_states(callbacks, meta.get("callbacks", []))
                if verbose != "silent":
                    if stopped:
                        done = "stopped by a callback"
                    elif start_epoch >= epochs:
                        done = f"{start_epoch} done, epochs={epochs}: nothing left to train"
                    else:
                        done = f"{start_epoch}/{epochs} done"
                    print(f"Resuming from {checkpoints.directory}/{start_epoch - 1} "
                          f"(epoch {done})", flush=True)
            elif had_checkpoints:
                warnings.warn(
                    f"no intact checkpoint in {checkpoints.directory}; training starts over",
                    RuntimeWarning,
                    stacklevel=2,
                )

        for callback in callbacks:
            if hasattr(callback, "on_train_begin"):
                callback.on_train_begin(state, workdir)
        progress = _Progress(verbose, epochs, steps_per_epoch)
        chunks = None if streaming else _scan_chunks(state, plan, verbose)
        last = start_epoch if stopped else epochs  # a stopped run stays stopped
        for epoch in range(start_epoch, last):
            progress.begin(epoch)
            first_step = int(state.step)
            start = time.perf_counter()
            if streaming:
                state, sums = _train_epoch_stream(state, train_data(epoch), progress, classes)
            else:
                key = data_order_key(state, epoch)
                state, sums = _train_epoch_arrays(
                    state, images, labels, plan, key, progress, chunks
                )
            seconds = time.perf_counter() - start
            losses = sums["loss_sum"] / np.maximum(sums["count"], 1)
            bad = _first_non_finite(losses)
            if bad is not None:
                raise NonFiniteLossError(first_step + bad + 1, float(losses[bad]), epoch)
            total = jax.tree.map(np.sum, sums)
            count = max(float(total["count"]), 1.0)
            logs = {"loss": total["loss_sum"] / count, "accuracy": total["correct"] / count}
            if validation_data is not None:
                val = metrics_lib.evaluate(
                    state, *validation_data, val_spec.names, batch_size=eval_batch_size
                )
                logs.update({f"val_{k}": val[k] for k in val_spec.names})
            logs = {k: float(v) for k, v in logs.items()}
            logs["lr"] = _current_lr(state)
            logs["epoch_seconds"] = seconds
            for callback in callbacks:
                new_state = callback.on_epoch_end(epoch, logs, state)
                state = state if new_state is None else new_state
            _append(history, logs)
            progress.end(len(losses), seconds, logs)
            stopped = any(getattr(c, "stop_training", False) for c in callbacks)
            if checkpoints is not None:
                meta = {
                    "epoch": epoch,
                    "stopped": stopped,
                    "history": history,
                    "callbacks": _callback_states(callbacks),
                }
                checkpoints.save(epoch, state, meta)
                _write_history(workdir, history)
            if stopped:
                break
        for callback in callbacks:
            if hasattr(callback, "on_train_end"):
                new_state = callback.on_train_end(state)
                state = state if new_state is None else new_state
        if workdir is not None and history:
            _write_curves(workdir, history)  # once: a plot costs more than a small epoch
    finally:
        # Also after an error or Ctrl-C: pending asynchronous saves reach the disk.
        try:
            for callback in callbacks:
                if hasattr(callback, "close"):
                    callback.close()
            if checkpoints is not None:
                checkpoints.close()
        finally:
            if lock is not None:
                lock.release()  # after the saves: the next run may start in this workdir
    return state, history


def _current_lr(state: TrainState) -> float:
    """The injected learning rate (NaN for an optimizer without one, e.g. plain optax)."""
    try:
        return float(optim.learning_rate(state.opt_state))
    except ValueError:
        return math.nan
