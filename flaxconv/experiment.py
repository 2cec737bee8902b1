"""``train_and_evaluate``: the whole experiment behind ``experiments/*.py`` and the notebook.

Load a dataset, build a model and optimizer from a config, ``fit``, evaluate on the full
test set, and write ``results.json``, the Orbax checkpoint, ``history.{json,csv}``,
``curves.png``, the saved model ``saved_model/`` and the serving export ``model.exported``
into the workdir. :func:`cli` runs it from the command line and turns the
errors a user can cause into one readable line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

import flaxconv as fc
from flaxconv import data, parallel, preemption, viz
from flaxconv.checks import check_images
from flaxconv.evaluation import evaluate
from flaxconv.export import ExportError
from flaxconv.fit import IncompatibleWorkdirError, NonFiniteLossError, fit
from flaxconv.fit_inputs import validation_split_arrays
from flaxconv.saved_model import SavedModelError
from flaxconv.workdir import WorkdirLockedError, WorkdirWriteError, claim_workdir, write_json


def default_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The *Deep Learning with Python* MNIST convnet recipe, with ``overrides`` replacing
    its values or adding keys (an experiment's own settings, which become flags too)."""
    return ml_collections.ConfigDict(
        dict(
            dataset="mnist",
            model="dlwp_mnist",
            optimizer="rmsprop",
            learning_rate=1e-3,
            batch_size=64,
            epochs=5,
            seed=0,
            workdir="runs/mnist_convnet",
            validation_split=0.0,
            verbose="auto",
            metrics="loss,accuracy,top_3,precision,recall,f1,roc_auc,confusion",  # on the test set
            train_examples=0,  # > 0: train on the first N training examples only (quick runs)
            data_source="auto",  # "raw": the IDX files, no TensorFlow; "tfds"; "auto"
            dtype="float32",  # computation dtype; "bfloat16": mixed precision
            feature_maps=2,  # feature_maps.png of this many test images (and filters.png); 0: none
        )
        | overrides
    )


class Datasets(NamedTuple):
    """What an experiment trains and tests on.

    Attributes:
      train: ``(images, labels)`` arrays (fit's device-resident path) or a callable
        ``epoch -> iterable of batches`` such as a ``flaxconv.data.ImageFolder`` (streaming).
      test: ``(images, labels)`` arrays.
      num_classes: width of the model's logits.
      validation: ``(images, labels)`` evaluated after every epoch; when given, the
        config's ``validation_split`` is not applied.
      class_names: label ``i`` means ``class_names[i]``; written to results.json and the
        saved model when given.
    """

    train: Any
    test: tuple[Any, Any]
    num_classes: int
    validation: tuple[Any, Any] | None = None
    class_names: tuple[str, ...] | None = None


def load_datasets(config: ml_collections.ConfigDict) -> Datasets:
    """``config.dataset``'s train and test splits via :func:`flaxconv.data.load`."""
    train_images, train_labels = data.load(config.dataset, "train", source=config.data_source)
    test_images, test_labels = data.load(config.dataset, "test", source=config.data_source)
    if config.train_examples > len(train_labels):
        raise ValueError(f"train_examples={config.train_examples} is more than the "
                         f"{len(train_labels)} training examples of {config.dataset}")
    if config.train_examples:
        train_images = train_images[: config.train_examples]
        train_labels = train_labels[: config.train_examples]
    return Datasets(
        (train_images, train_labels), (test_images, test_labels),
        data.num_classes(config.dataset), class_names=data.class_names(config.dataset),
    )


def train_steps(config: ml_collections.ConfigDict, datasets: Datasets) -> int:
    """The optimizer steps that :func:`train_and_evaluate` takes on array ``datasets``:
    ``config.epochs`` epochs of ``ceil(n / batch_size)`` steps, ``n`` counted after fit's
    own ``validation_split`` cut (when the config asks for one and ``datasets`` brings no
    validation set). What a learning-rate schedule is to span."""
    labels = datasets.train[1]
    if config.validation_split and datasets.validation is None:
        labels = validation_split_arrays((None, labels), config.validation_split)[0][1]
    return config.epochs * math.ceil(len(labels) / config.batch_size)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    *,
    datasets: Datasets | None = None,
    model: Any = None,
    tx: Any = None,
    callbacks: tuple = (),
) -> dict[str, Any]:
    """Runs the experiment described by ``config``; returns the results dict it writes.

    The keyword arguments replace what is otherwise built from ``config``: ``datasets``
    (default :func:`load_datasets`), ``model`` (a linen module; default
    ``fc.models.get(config.model, ...)``), ``tx`` (an Optax optimizer, e.g. with a
    schedule; default ``fc.optim.make(config.optimizer, config.learning_rate)``), and
    ``callbacks`` for ``fit``.
    """
    check_flags(config)
    parallel.initialize()  # a multi-process run when JAX_COORDINATOR_ADDRESS etc. are set
    # What needs no data is checked before the (possibly long) dataset preparation; the
    # workdir is ours (locked) from here until results.json and the plots are written, and
    # is removed again if it was new and nothing got written into it.
    with claim_workdir(config.workdir):
        return _train_and_evaluate(config, datasets, model, tx, callbacks)


#: Seeds a run takes: with JAX's default 32-bit types a key keeps a seed's low 32 bits, so
#: a larger seed would silently repeat a smaller one's run.
SEED_RANGE = range(2**32)


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int in :data:`SEED_RANGE`.

    Raises:
      ValueError: naming ``name``, the value and the range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or (
        int(seed) not in SEED_RANGE
    ):
        raise ValueError(
            f"{name}={seed!r}; expected an integer from 0 to {SEED_RANGE.stop - 1} (JAX keeps "
            f"a seed's low 32 bits, so a larger one would repeat a smaller one's run)"
        )
    return int(seed)


def check_flags(config: ml_collections.ConfigDict) -> None:
    """Refuses the config values that would otherwise fail late with a traceback or be
    silently misread: the seed and ``train_examples`` (checked before any data loads).

    Raises:
      ValueError: naming the key, the value and what was expected.
    """
    check_seed(config.get("seed", 0))
    examples = config.get("train_examples", 0)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
        raise ValueError(
            f"train_examples={examples!r}; expected 0 (the whole training split) or a "
            f"positive number of examples"
        )


def _train_and_evaluate(config, datasets, model, tx, callbacks) -> dict[str, Any]:
    if tx is None:
        tx = fc.optim.make(config.optimizer, learning_rate=config.learning_rate)
    if datasets is None:
        datasets = load_datasets(config)
    train = datasets.train
    test_images, test_labels = datasets.test
    check_images(test_images, "test images")  # before training, not after
    if model is None:
        model = fc.models.get(config.model, num_classes=datasets.num_classes, dtype=config.dtype)
    sample = next(iter(train(0)))["image"][:1] if callable(train) else train[0][:1]
    state = fc.create_train_state(jax.random.key(config.seed), model, tx, sample)
    if config.verbose != "silent":
        print(viz.summary(state), flush=True)

    start = time.perf_counter()
    state, history = fit(
        state,
        train,
        epochs=config.epochs,
        batch_size=config.batch_size,
        validation_data=datasets.validation,
        validation_split=config.validation_split or None if datasets.validation is None else None,
        callbacks=callbacks,
        steps_per_epoch=getattr(train, "steps_per_epoch", None),
        workdir=config.workdir,
        verbose=config.verbose,
        config={k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES},
    )
    train_seconds = time.perf_counter() - start

    test = evaluate(state, test_images, test_labels, f"loss,accuracy,{config.metrics}")
    results = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_examples": len(test_labels),
        "epoch_seconds": history.get("epoch_seconds", []),
        "train_seconds": train_seconds,
        "devices": [str(d) for d in jax.devices()],
        "backend": jax.default_backend(),
        "num_params": fc.num_params(state.params),
        "config": config.to_dict(),
        "history": history,
        "test_metrics": {k: v.tolist() if hasattr(v, "tolist") else v for k, v in test.items()},
    }
    if datasets.class_names is not None:
        results["class_names"] = list(datasets.class_names)
    if config.verbose != "silent":
        numbers = " - ".join(
            f"test_{k}: {v:.4f}" for k, v in test.items() if k != "count" and np.ndim(v) == 0
        )
        print(f"{numbers} ({len(test_labels)} test images)", flush=True)
    write_json(os.path.join(config.workdir, "results.json"), results)
    is_writer = jax.process_index() == 0
    if is_writer and config.get("feature_maps", 0) > 0 and viz.map_layers(state):
        images = test_images[: config.feature_maps]
        viz.feature_maps(state, images, os.path.join(config.workdir, "feature_maps.png"))
        viz.filters(state, os.path.join(config.workdir, "filters.png"))
    save_for_serving(state, config.workdir, class_names=datasets.class_names,
                     input_dtype="uint8" if sample.dtype == np.uint8 else "float32",
                     verbose=config.verbose != "silent")
    return results


def save_for_serving(state: Any, workdir: str, *, class_names: Any = None,
                     input_dtype: str = "uint8", verbose: bool = True) -> None:
    """Writes ``<workdir>/saved_model/`` (:func:`flaxconv.save_model`, with the class names)
    and ``<workdir>/model.exported`` (:func:`flaxconv.export` for cpu, cuda and tpu).

    A model that cannot be recorded or exported (an NNX module built with arguments other
    than its defaults, a model that needs a fixed batch size) gets a warning naming why, not
    an error: results.json and the checkpoints are written by then, and a failed end would
    make rerunning the command fail again.
    """
    try:
        fc.save_model(state, os.path.join(workdir, "saved_model"), class_names=class_names,
                      input_dtype=input_dtype)
    except SavedModelError as error:
        warnings.warn(f"no saved_model: {error}", RuntimeWarning, stacklevel=2)
    if jax.process_index() != 0:  # every process holds the same parameters
        return
    path = os.path.join(workdir, "model.exported")
    try:
        fc.export(state, path, input_dtype=input_dtype)
    except ExportError as error:
        warnings.warn(f"no model.exported: {error}", RuntimeWarning, stacklevel=2)
        return
    if verbose:
        print(f"saved {os.path.join(workdir, 'saved_model')} and {path}", flush=True)


# Flags that a resumed run may change: they do not alter the training.
RESUMABLE_CHANGES = ("epochs", "verbose", "workdir", "metrics", "feature_maps")


def parse_flags(
    config: ml_collections.ConfigDict,
    argv: list[str] | None,
    description: str,
    *,
    resolve: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict] | None = None,
    prog: str | None = None,
) -> ml_collections.ConfigDict:
    """Command-line flags ``--<key>`` (dashes for underscores) for every key of ``config``.

    A flag takes its key's type: a bool is ``--key``/``--no-key``; a key whose default is
    None takes its placeholder's type (``ml_collections.config_dict.placeholder(int)``),
    else a string. ``resolve`` (optional) turns the parsed config into the one the run
    takes (e.g. a list spec into per-member values); its ValueError becomes argparse's
    one-line usage error (exit status 2), like a malformed flag.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):  # type=bool would read "--flag False" as True
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
            continue
        kind = type(value) if value is not None else config.get_type(key)
        kind = str if kind is type(None) else kind
        parser.add_argument(flag, type=kind, default=value, help=f"default: {value}")
    args = parser.parse_args(argv)
    config = ml_collections.ConfigDict(config.to_dict())
    for key in config:
        setattr(config, key, getattr(args, key))
    if resolve is not None:
        try:
            config = resolve(config)
        except ValueError as error:
            parser.error(str(error))
    return config


# Errors a user can cause from the command line; anything else is a bug and keeps its trace.
USER_ERRORS = (
    data.DatasetUnavailableError,
    IncompatibleWorkdirError,
    NonFiniteLossError,
    WorkdirLockedError,
    WorkdirWriteError,
    ValueError,
    TypeError,
    FileNotFoundError,
)


def cli(
    config: ml_collections.ConfigDict,
    description: str,
    argv: list[str] | None = None,
    run=train_and_evaluate,
    **flags: Any,
) -> int:
    """Parses flags over ``config`` (:func:`parse_flags`, which takes ``flags``: ``resolve``,
    ``prog``) and runs ``run(config)`` through :func:`report_errors`, with XLA's compiled
    programs kept between runs (:func:`use_compilation_cache`)."""
    config = parse_flags(config, argv, description, **flags)
    use_compilation_cache()
    return report_errors(lambda: run(config))


#: Set to ``0`` to run the experiments without JAX's persistent compilation cache.
COMPILATION_CACHE_ENV = "FLAXCONV_COMPILATION_CACHE"


def use_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for this process; returns its folder.

    A rerun of an experiment then loads its ~20 compiled programs (state creation, the
    epoch, evaluation, feature maps, export) instead of compiling them again: about 4 s of
    the job's time outside training on the 2-core CPU of ``benchmarks/startup.py``. The
    folder is ``$JAX_COMPILATION_CACHE_DIR`` when set, else ``~/.cache/flaxconv/jax``.
    Every program is cached, however quick its compile (JAX's defaults skip those under
    a second, which here are most of them). None, and nothing changed, when
    ``FLAXCONV_COMPILATION_CACHE=0``.
    """
    if os.environ.get(COMPILATION_CACHE_ENV, "1") == "0":
        return None
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "flaxconv", "jax")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def report_errors(run: Callable[[], Any]) -> int:
    """Runs ``run()``; returns the exit status: 0, or 1 after printing a user error as one
    line on stderr (no traceback; set FLAXCONV_DEBUG=1 for one), 130 on Ctrl-C, 143 when
    SIGTERM preempted the run (its line is printed; :mod:`flaxconv.preemption`)."""
    try:
        run()
    except preemption.Preempted as stop:
        return stop.code
    except USER_ERRORS as error:
        if os.environ.get("FLAXCONV_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
