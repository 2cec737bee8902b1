"""``fit``: the Python loop around the jitted steps — epochs, validation, callbacks, progress,
history, checkpoints and resume.

Two data paths, picked by the type of ``train_data``:

* arrays ``(images, labels)`` (uint8 ``[N, H, W, C]``, int ``[N]``): the fast path. The
  data goes to the device once; each epoch is one (or, with a progress bar, a few) jitted
  ``lax.scan`` (:func:`flaxconv.epochs.run_epoch`) in the order
  ``fc.epochs.epoch_order(int(fc.epochs.order_seed(state)), epoch, N)``: the order every
  path gives that seed, a function of the state's rng and the epoch number alone.
* a callable ``epoch -> iterable of batches`` (e.g. a ``flaxconv.data.stream`` pipeline): the
  streaming path, one donated jitted step per batch. For resume it must give the same
  batches for the same epoch; one with a ``start`` parameter (``fc.data.stream``'s,
  ``ImageFolder``'s, checked once by signature) is called as ``train_data(epoch,
  start=k)`` and skips the ``k`` batches a resumed epoch has done without reading them;
  the batches of any other are read and dropped.

With a ``workdir``, every epoch ends with an Orbax checkpoint of the state, the history and
the callbacks' state, then ``history.json``/``.csv``; training ends with ``curves.png``
(:func:`flaxconv.viz.plot_history`). Running the same
call again resumes from the newest intact checkpoint at the start of the next epoch: the
data order is a function of the state's rng and the epoch alone, so a run killed at any
moment and resumed ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from flaxconv import epochs as ep
from flaxconv import history as history_lib
from flaxconv import metrics as metrics_lib
from flaxconv import optim, parallel, preemption
from flaxconv.callbacks import Callback
from flaxconv.callbacks.batch_hooks import BatchHooks
from flaxconv.checkpoint import Checkpoints
from flaxconv.checks import NonFiniteLossError, check_images, first_non_finite, warn_one_class
from flaxconv.fit_inputs import (
    ArrayData,
    as_arrays,
    class_weight_vector,
    takes_start,
    validation_fn,
    validation_split_arrays,
    weighted_arrays,
)
from flaxconv.history import History
from flaxconv.metrics import check_labels, model_classes
from flaxconv.progress import Progress, resolve_verbose
from flaxconv.resume import (
    IncompatibleWorkdirError,
    callback_states,
    check_config,
    load_callback_states,
    run_config,
)
from flaxconv.state import TrainState
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

__all__ = [
    "History",
    "IncompatibleWorkdirError",
    "NonFiniteLossError",
    "WorkdirLock",
    "WorkdirLockedError",
    "claim_workdir",
    "fit",
    "lock_workdir",
    "make_workdir",
    "run_config",
]


def fit(
    state: TrainState,
    train_data: ArrayData | Callable[[int], Iterable[dict]],
    epochs: int = 1,
    *,
    batch_size: int = 64,
    validation_data: ArrayData | None = None,
    validation_split: float | None = None,
    sample_weight: Any = None,
    class_weight: dict[int, float] | None = None,
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
        (streaming; then give ``steps_per_epoch`` for the progress bar), optionally with a
        ``start`` parameter: ``train_data(epoch, start=k)`` from batch ``k`` on (resume).
      epochs: total epochs; a resumed run continues up to this number.
      batch_size: for array data; the last partial batch is padded and masked.
      validation_data: ``(images, labels)`` or ``(images, labels, sample_weight)``,
        evaluated after every epoch (``val_*`` logs; weights weight ``val_loss`` only, as
        Keras's ``metrics=``).
      validation_split: Keras's: hold out the last fraction of array ``train_data`` (and
        of ``sample_weight``), training on the first ``floor(N * (1 - fraction))``
        examples. Ignored when ``validation_data`` is given, as in Keras.
      sample_weight: float ``[N]`` per example of array ``train_data``, finite and >= 0
        (Keras's): each example's loss is multiplied by it, and the batch loss is Keras's
        ``sum_over_batch_size``, ``sum(w * loss) / batch size``. Streamed batches carry a
        ``"weight"`` instead (see :mod:`flaxconv.steps`).
      class_weight: Keras's ``{class id: weight}`` (absent classes weigh 1.0): example
        ``i``'s loss is multiplied by ``class_weight[label_i]``; training only, not
        validation. Not together with ``sample_weight`` (Keras refuses that too).
      callbacks: objects following :mod:`flaxconv.callbacks`.
      workdir: where ``checkpoints/``, ``config.json``, ``history.json``, ``history.csv``
        and ``curves.png`` go; a workdir with checkpoints is resumed.
      verbose: "bar" (a progress bar per step), "epoch" (a line per epoch), "silent", or
        "auto" (bar on a terminal or in Jupyter/Colab, else epoch lines); Keras's 1/2/0 work too.
      metrics: more validation metrics, names of :mod:`flaxconv.metrics` with a scalar
        value (e.g. ``("top_5", "f1", "roc_auc")``), logged as ``val_<name>``.
      config: extra JSON-able settings that a resumed run must share (e.g. the CLI flags).
      eval_batch_size: batch size of the validation passes.
      steps_per_epoch: the progress bar's length for streaming data.

    Returns:
      The trained state and the :class:`History`: a dict of per-epoch lists ``loss``,
      ``accuracy``, ``val_loss``, ``val_accuracy`` (with validation), ``val_<metric>``,
      ``lr`` and ``epoch_seconds``, with Keras's ``.history``, ``.epoch`` and ``.params``.
      A resumed run returns the whole history, earlier epochs included.

    Raises:
      NonFiniteLossError: a NaN/inf loss, naming the step; the last checkpoint stays.
      IncompatibleWorkdirError: ``workdir`` holds another configuration's run, or
        checkpoints without a readable ``config.json``.
      WorkdirLockedError: another run is using ``workdir`` (see :func:`lock_workdir`).
      WorkdirWriteError: a file or checkpoint cannot be written (disk full, read-only),
        naming it; what was saved before stays.
      flaxconv.preemption.Preempted: SIGTERM (with a ``workdir``): stopped at the next
        step boundary and saved; a ``SystemExit`` with status 143. The same call resumes.
      ValueError: labels outside the model's classes, NaN or infinite pixels, bad arguments.
    """
    verbose = resolve_verbose(verbose)
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs={epochs!r}; expected a non-negative integer")
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if "confusion" in metrics:
        raise ValueError("metrics: 'confusion' is not a number to log per epoch; use "
                         "flaxconv.metrics.evaluate for it")
    # Keras's validation: sample weights weigh val_loss only (weighted_metrics=False).
    val_spec = metrics_lib.spec(("loss", "accuracy", *metrics), weighted_metrics=False)
    classes = model_classes(state)
    streaming = callable(train_data)
    skips = streaming and takes_start(train_data)  # resumes by start=, not by reading
    if streaming and validation_split:
        raise ValueError("validation_split needs array train_data; pass validation_data instead")
    if streaming and sample_weight is not None:
        raise ValueError("sample_weight needs array train_data; give each streamed batch a "
                         "'weight' instead")
    if sample_weight is not None and class_weight is not None:
        raise ValueError("class_weight and sample_weight together: Keras refuses them too; "
                         "fold the class weights into sample_weight")
    class_weights = None if class_weight is None else class_weight_vector(class_weight, classes)
    weights, val_weights = None, None
    if not streaming:
        train_data = as_arrays(train_data, "train_data")
        if sample_weight is not None:
            weights = metrics_lib.check_sample_weight(sample_weight, len(train_data[1]))
        if validation_split and validation_data is None:
            (*train_data, weights), validation_data = validation_split_arrays(
                (*train_data, weights), validation_split)
        check_labels(train_data[1], classes, "training labels")
        check_images(train_data[0], "training images")  # NaN pixels, unscaled floats
        warn_one_class(train_data[1])
        if class_weights is not None:
            weights = class_weights[np.asarray(train_data[1])]
        # Data parallel: state and data replicated over the devices of the state's mesh
        # (all devices by default), each step's batch split over them (flaxconv.parallel).
        state, images, labels, plan = ep.place_for_fit(state, *train_data, batch_size)
        if weights is not None:
            weights = parallel.replicate(weights, parallel.mesh_of(state.params))
        steps_per_epoch = plan.steps
    if validation_data is not None:
        *validation_data, val_weights = weighted_arrays(validation_data, "validation_data")
        check_labels(validation_data[1], classes, "validation labels")
        check_images(validation_data[0], "validation images")
        validate = validation_fn(validation_data, val_weights, val_spec, eval_batch_size)
    hooks = BatchHooks(callbacks)
    # A resumed run must weigh its examples as the first one did.
    if class_weight is not None:
        config = {**(config or {}), "class_weight": class_weights.tolist()}
    if sample_weight is not None:
        digest = hashlib.sha256(np.asarray(sample_weight, np.float32).tobytes()).hexdigest()
        config = {**(config or {}), "sample_weight_sha256": digest}

    history = History()
    start_epoch, stopped = 0, False
    checkpoints = None
    lock = None
    partial = None  # a preempted epoch's first part (flaxconv.preemption)
    stop = None  # set by SIGTERM: stop at the next step boundary, saved
    try:
        if workdir is not None:
            workdir = make_workdir(workdir)
            lock = lock_workdir(workdir)  # another run in it would delete our checkpoints
            check_config(workdir, run_config(state, {"batch_size": batch_size, **(config or {})}))
            checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), max_to_keep=2)
            had_checkpoints = bool(checkpoints.epochs())
            restored = checkpoints.restore_latest(state)
            if restored is not None:
                state, meta = restored
                start_epoch = int(meta["epoch"]) + 1
                stopped = bool(meta.get("stopped", False))
                history = History({k: list(v) for k, v in meta.get("history", {}).items()})
                load_callback_states(callbacks, meta.get("callbacks", []))
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
            partial = None if stopped else preemption.load_partial(workdir, state, start_epoch)
            if partial is not None:
                state = partial.state
                if verbose != "silent":
                    print(f"Resuming from {partial.path} (epoch {start_epoch + 1}: "
                          f"{partial.steps} steps done)", flush=True)
            stop = preemption.watch_sigterm()

        for callback in callbacks:
            if hasattr(callback, "on_train_begin"):
                callback.on_train_begin(state, workdir)
        progress = Progress(verbose, epochs, steps_per_epoch)
        chunks = None if streaming else ep.scan_chunks(state, plan, verbose == "bar")
        last = start_epoch if stopped else epochs  # a stopped run stays stopped
        for epoch in range(start_epoch, last):
            progress.begin(epoch)
            for callback in callbacks:
                if hasattr(callback, "on_epoch_begin"):
                    new_state = callback.on_epoch_begin(epoch, state)
                    state = state if new_state is None else new_state
            done = partial.steps if partial is not None and partial.epoch == epoch else 0
            progress.advance(done)
            first_step = int(state.step) - done
            hooks.begin_epoch(epoch, first_step, partial.sums if done else None)
            start = time.perf_counter()
            if streaming:
                # A resumed epoch starts after the batches done: train_data skips them
                # unread when it takes a `start`; otherwise they are read and dropped.
                batches = (train_data(epoch, start=done) if skips
                           else itertools.islice(train_data(epoch), done, None))
                state, sums, complete = ep.run_stream_epoch(
                    state, batches, start=done, class_weights=class_weights,
                    check=lambda y: check_labels(y, classes, "training labels"),
                    after_step=hooks if hooks else None, advance=progress.advance, stop=stop,
                )
            else:
                # The order is a function of the state's rng and the epoch: a resumed run
                # sees the orders of an uninterrupted one.
                order = ep.epoch_order(int(ep.order_seed(state)), epoch, plan.num_examples)
                state, sums, complete = ep.run_epoch(
                    state, images, labels, plan, plan.indices(order), chunks, start=done,
                    weights=weights, cuts=hooks.cuts(done, plan.steps) if hooks else (),
                    at_cut=hooks, advance=progress.advance, stop=stop,
                )
            seconds = time.perf_counter() - start
            if done:
                sums = jax.tree.map(lambda a, b: np.concatenate([a, b]), partial.sums, sums)
                seconds += partial.seconds
            losses = sums["loss_sum"] / np.maximum(sums["count"], 1)
            bad = first_non_finite(losses)
            if bad is not None:
                raise NonFiniteLossError(first_step + bad + 1, float(losses[bad]), epoch)
            if not complete:  # stopped for a preemption: save the steps done, exit
                raise preemption.preempt(
                    workdir, state, epoch=epoch, epochs=epochs, steps=len(losses), sums=sums,
                    seconds=seconds, reason=stop.reason,
                )
            total = jax.tree.map(np.sum, sums)
            count = max(float(total["count"]), 1.0)
            logs = {"loss": total["loss_sum"] / count, "accuracy": total["correct"] / count}
            if validation_data is not None:
                val = validate(state)
                logs.update({f"val_{k}": val[k] for k in val_spec.names})
            logs = {k: float(v) for k, v in logs.items()}
            logs["lr"] = _current_lr(state)
            logs["epoch_seconds"] = seconds
            for callback in callbacks:
                new_state = callback.on_epoch_end(epoch, logs, state)
                state = state if new_state is None else new_state
            history_lib.append(history, logs)
            progress.end(len(losses), seconds, logs)
            stopped = any(getattr(c, "stop_training", False) for c in callbacks)
            if checkpoints is not None:
                meta = {
                    "epoch": epoch,
                    "stopped": stopped,
                    "history": history,
                    "callbacks": callback_states(callbacks),
                }
                checkpoints.save(epoch, state, meta)
                history_lib.write(workdir, history)
                if done:  # the preempted part is in this epoch's checkpoint now
                    checkpoints.wait()
                    preemption.drop_partial(workdir)
            if stopped:
                break
            if stop is not None and stop() and epoch + 1 < last:
                checkpoints.wait()  # the message says it is saved
                raise preemption.preempt(
                    workdir, state, epoch=epoch, epochs=epochs, steps=len(losses), sums=None,
                    seconds=seconds, reason=stop.reason,
                )
        for callback in callbacks:
            if hasattr(callback, "on_train_end"):
                new_state = callback.on_train_end(state)
                state = state if new_state is None else new_state
        if workdir is not None and history:
            history_lib.write_curves(workdir, history)  # once: a plot costs more than a small epoch
    finally:
        # Also after an error or Ctrl-C: pending asynchronous saves reach the disk.
        try:
            for callback in callbacks:
                if hasattr(callback, "close"):
                    callback.close()
            if checkpoints is not None:
                checkpoints.close()
        finally:
            if stop is not None:
                stop.close()
            if lock is not None:
                lock.release()  # after the saves: the next run may start in this workdir
    history.params = {"verbose": verbose, "epochs": epochs, "steps": steps_per_epoch}
    return state, history


def _current_lr(state: TrainState) -> float:
    """The injected learning rate (NaN for an optimizer without one, e.g. plain optax)."""
    try:
        return float(optim.learning_rate(state.opt_state))
    except ValueError:
        return math.nan
