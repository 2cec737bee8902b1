"""``fit``: the Python loop around the jitted steps — epochs, validation, callbacks, progress,
history, checkpoints and resume.

Two data paths, picked by the type of ``train_data``:

* arrays ``(images, labels)`` (uint8 ``[N, H, W, C]``, int ``[N]``): the fast path. The
  data goes to the device once; each epoch is one (or, with a progress bar, a few) jitted
  ``lax.scan`` over a permutation drawn from the state's rng and the epoch number
  (:mod:`flaxconv.epochs`). Same seed, same data order, same parameters: so a resumed run
  ends exactly where an uninterrupted one does.
* a callable ``epoch -> iterable of batches`` (e.g. a ``flaxconv.data.stream`` pipeline): the
  streaming path, one donated jitted step per batch.

With a ``workdir``, every epoch ends with an Orbax checkpoint and ``history.json``/``.csv``;
running the same call again resumes from the newest intact checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxconv import epochs as ep
from flaxconv.callbacks import Callback
from flaxconv.checkpoint import Checkpoints
from flaxconv.state import TrainState
from flaxconv.steps import predict_fn, summarize, train_step_fn

History = dict[str, list[float]]
ArrayData = tuple[Any, Any]

# Data-order keys live in their own fold_in domain, apart from the per-step keys.
_DATA_ORDER_DOMAIN = 0x7FFFFFFF

_train_step_donated = jax.jit(train_step_fn, donate_argnums=0)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; ``step`` is the first bad step."""

    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(
            f"the training loss became {loss} at step {step}; stopped (lower the learning "
            f"rate or check the inputs). The last good checkpoint, if any, is kept."
        )


class IncompatibleWorkdirError(ValueError):
    """The workdir holds a run whose configuration differs from this one."""


def data_order_key(state: TrainState, epoch: int) -> jax.Array:
    """The permutation key of ``epoch``: a function of the state's rng and the epoch only."""
    base = jax.random.fold_in(jax.random.wrap_key_data(state.rng), _DATA_ORDER_DOMAIN)
    return jax.random.fold_in(base, epoch)


def num_classes(state: TrainState) -> int:
    """The width of the model's logits."""
    probe = jax.ShapeDtypeStruct((1, *state.input_shape), jnp.float32)
    return int(jax.eval_shape(predict_fn, state, probe).shape[-1])


def check_labels(labels: Any, classes: int, what: str = "labels") -> None:
    """Rejects labels outside ``[0, classes)`` before any training happens."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} are {labels.dtype}{list(labels.shape)}; expected int [N]")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)]
        raise ValueError(
            f"{what} hold {bad.size} value(s) outside [0, {classes}), e.g. {int(bad[0])}; "
            f"the model has {classes} classes"
        )


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
    """One epoch on device-resident arrays in ``chunks`` scan calls (1 = fastest)."""
    indices = plan.indices(key)
    per_step = []
    bounds = np.linspace(0, plan.steps, chunks + 1).round().astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi == lo:
            continue
        state, sums = ep.train_epoch(state, images, labels, indices[lo:hi], plan.mask[lo:hi])
        per_step.append(sums)
        progress.advance(int(hi - lo))
    sums = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *per_step)
    return state, sums


def _train_epoch_stream(state, batches: Iterable[dict], progress):
    per_step = []
    for batch in batches:
        state, sums = _train_step_donated(state, batch)
        per_step.append(sums)
        progress.advance(1)
    if not per_step:
        raise ValueError("train_data produced no batch in this epoch")
    sums = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_step)
    return state, sums


def _write_history(workdir: str, history: History) -> None:
    tmp = os.path.join(workdir, "history.json.tmp")
    with open(tmp, "w") as f:
        json.dump(history, f, indent=1)
    os.replace(tmp, os.path.join(workdir, "history.json"))
    keys = list(history)
    rows = zip(*(history[k] for k in keys), strict=True)
    with open(os.path.join(workdir, "history.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *keys])
        writer.writerows([i + 1, *row] for i, row in enumerate(rows))


def _check_config(workdir: str, config: dict[str, Any]) -> None:
    """Refuses a workdir that holds a run of another configuration; records ours."""
    path = os.path.join(workdir, "config.json")
    config = json.loads(json.dumps(config, default=str))
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
        if changed:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {config.get(k)!r}" for k in changed)
            raise IncompatibleWorkdirError(
                f"workdir {workdir} holds a run with another configuration ({details}); "
                f"use another --workdir or delete it"
            )
        return
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def run_config(state: TrainState, config: dict[str, Any] | None) -> dict[str, Any]:
    """What must match for a workdir to be resumed: the model, input shape, params shapes
    and the caller's ``config``."""
    shapes = jax.tree.map(lambda x: list(np.shape(x)), state.params)
    return {
        "model": repr(state.model),
        "input_shape": list(state.input_shape),
        "param_shapes": json.dumps(shapes, sort_keys=True),
        **(config or {}),
    }


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
      workdir: where checkpoints (``checkpoints/``), ``config.json``, ``history.json`` and
        ``history.csv`` go; a workdir with checkpoints is resumed.
      verbose: "bar" (a progress bar per step), "epoch" (a line per epoch), "silent", or
        "auto" (bar on a terminal, else epoch lines); Keras's 1/2/0 work too.
      config: extra JSON-able settings that a resumed run must share (e.g. the CLI flags).
      eval_batch_size: batch size of the validation passes.

    Returns:
      The trained state and the history: a dict of per-epoch lists ``loss``, ``accuracy``,
      ``val_loss``, ``val_accuracy`` (with validation), ``lr`` and ``epoch_seconds``.

    Raises:
      NonFiniteLossError: a NaN/inf loss, naming the step; the last checkpoint stays.
      IncompatibleWorkdirError: ``workdir`` holds another configuration's run.
      ValueError: labels outside the model's classes, bad arguments.
    """
    verbose = _resolve_verbose(verbose)
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs={epochs!r}; expected a non-negative integer")
    classes = num_classes(state)
    streaming = callable(train_data)
    if streaming and validation_split:
        raise ValueError("validation_split needs array train_data; pass validation_data instead")
    if not streaming:
        train_data = _as_arrays(train_data, "train_data")
        if validation_split:
            train_data, validation_data = _split(train_data, validation_split)
        check_labels(train_data[1], classes, "training labels")
        images = jnp.asarray(train_data[0])
        labels = jnp.asarray(train_data[1], jnp.int32)
        plan = ep.epoch_plan(len(train_data[1]), batch_size)
        steps_per_epoch = plan.steps
    if validation_data is not None:
        validation_data = _as_arrays(validation_data, "validation_data")
        check_labels(validation_data[1], classes, "validation labels")

    history: History = {}
    start_epoch = 0
    checkpoints = None
    if workdir is not None:
        workdir = os.fspath(workdir)
        os.makedirs(workdir, exist_ok=True)
        _check_config(workdir, run_config(state, {"batch_size": batch_size, **(config or {})}))
        checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), max_to_keep=2)
        restored = checkpoints.restore_latest(state)
        if restored is not None:
            state, meta = restored
            start_epoch = int(meta["epoch"]) + 1
            history = {k: list(v) for k, v in meta.get("history", {}).items()}
            for callback, saved in zip(callbacks, meta.get("callbacks", []), strict=False):
                if hasattr(callback, "load_state_dict"):
                    callback.load_state_dict(saved)
            if verbose != "silent":
                print(f"Resuming from {checkpoints.directory}/{start_epoch - 1} "
                      f"(epoch {start_epoch}/{epochs} done)", flush=True)

    for callback in callbacks:
        if hasattr(callback, "on_train_begin"):
            callback.on_train_begin(state, workdir)
    progress = _Progress(verbose, epochs, steps_per_epoch)
    chunks = 20 if verbose == "bar" else 1
    try:
        for epoch in range(start_epoch, epochs):
            progress.begin(epoch)
            first_step = int(state.step)
            start = time.perf_counter()
            if streaming:
                state, sums = _train_epoch_stream(state, train_data(epoch), progress)
            else:
                key = data_order_key(state, epoch)
                state, sums = _train_epoch_arrays(
                    state, images, labels, plan, key, progress, chunks
                )
            seconds = time.perf_counter() - start
            losses = sums["loss_sum"] / np.maximum(sums["count"], 1)
            bad = _first_non_finite(losses)
            if bad is not None:
                raise NonFiniteLossError(first_step + bad + 1, float(losses[bad]))
            logs = summarize(jax.tree.map(np.sum, sums))
            if validation_data is not None:
                val = ep.evaluate(state, *validation_data, batch_size=eval_batch_size)
                logs.update({f"val_{k}": v for k, v in summarize(val).items()})
            logs["lr"] = _current_lr(state)
            logs["epoch_seconds"] = seconds
            for callback in callbacks:
                new_state = callback.on_epoch_end(epoch, logs, state)
                state = state if new_state is None else new_state
            for k, v in logs.items():
                history.setdefault(k, []).append(float(v))
            progress.end(len(losses), seconds, logs)
            if checkpoints is not None:
                meta = {
                    "epoch": epoch,
                    "history": history,
                    "callbacks": [
                        c.state_dict() if hasattr(c, "state_dict") else {} for c in callbacks
                    ],
                }
                checkpoints.save(epoch, state, meta)
                _write_history(workdir, history)
            if any(getattr(c, "stop_training", False) for c in callbacks):
                break
        for callback in callbacks:
            if hasattr(callback, "on_train_end"):
                new_state = callback.on_train_end(state)
                state = state if new_state is None else new_state
    finally:
        if checkpoints is not None:
            checkpoints.close()
    return state, history


def _current_lr(state: TrainState) -> float:
    hyperparams = getattr(state.opt_state, "hyperparams", None)
    if not hyperparams or "learning_rate" not in hyperparams:
        return math.nan
    return float(hyperparams["learning_rate"])
