"""``train_and_evaluate``: the whole experiment behind ``experiments/*.py`` and the notebook.

Load a dataset, build a model and optimizer from a config, ``fit``, evaluate on the full
test set, and write ``results.json``, the Orbax checkpoint, ``history.{json,csv}`` and
``curves.png`` into the workdir. :func:`cli` runs it from the command line and turns the
errors a user can cause into one readable line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections

import flaxconv as fc
from flaxconv import data, viz
from flaxconv.epochs import evaluate
from flaxconv.fit import IncompatibleWorkdirError, NonFiniteLossError, fit
from flaxconv.steps import summarize


def default_config() -> ml_collections.ConfigDict:
    """The *Deep Learning with Python* MNIST convnet recipe."""
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
        )
    )


def train_and_evaluate(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs the experiment described by ``config``; returns the results dict it writes."""
    train_images, train_labels = data.load(config.dataset, "train")
    test_images, test_labels = data.load(config.dataset, "test")
    model = fc.models.get(config.model, num_classes=data.num_classes(config.dataset))
    tx = fc.optim.make(config.optimizer, learning_rate=config.learning_rate)
    state = fc.create_train_state(jax.random.key(config.seed), model, tx, train_images[:1])
    if config.verbose != "silent":
        print(viz.summary(state), flush=True)

    os.makedirs(config.workdir, exist_ok=True)
    start = time.perf_counter()
    state, history = fit(
        state,
        (train_images, train_labels),
        epochs=config.epochs,
        batch_size=config.batch_size,
        validation_split=config.validation_split or None,
        workdir=config.workdir,
        verbose=config.verbose,
        config=config.to_dict(),
    )
    train_seconds = time.perf_counter() - start

    test = summarize(evaluate(state, test_images, test_labels))
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
    }
    if config.verbose != "silent":
        print(f"test_loss: {test['loss']:.4f} - test_accuracy: {test['accuracy']:.4f} "
              f"({len(test_labels)} test images)", flush=True)
    _write_json(os.path.join(config.workdir, "results.json"), results)
    if history:
        viz.plot_history(history, os.path.join(config.workdir, "curves.png"))
    return results


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def parse_flags(
    config: ml_collections.ConfigDict, argv: list[str] | None, description: str
) -> ml_collections.ConfigDict:
    """Command-line flags ``--<key>`` (dashes for underscores) for every key of ``config``."""
    parser = argparse.ArgumentParser(description=description)
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        kind = type(value) if value is not None else str
        parser.add_argument(flag, type=kind, default=value, help=f"default: {value}")
    args = parser.parse_args(argv)
    config = ml_collections.ConfigDict(config.to_dict())
    for key in config:
        setattr(config, key, getattr(args, key))
    return config


# Errors a user can cause from the command line; anything else is a bug and keeps its trace.
USER_ERRORS = (
    data.DatasetUnavailableError,
    IncompatibleWorkdirError,
    NonFiniteLossError,
    ValueError,
    TypeError,
    FileNotFoundError,
)


def cli(
    config: ml_collections.ConfigDict,
    description: str,
    argv: list[str] | None = None,
    run=train_and_evaluate,
) -> int:
    """Parses flags over ``config``, runs ``run(config)``, and reports a user error as one
    line on stderr with exit status 1 (no traceback; set FLAXCONV_DEBUG=1 for one)."""
    config = parse_flags(config, argv, description)
    try:
        run(config)
    except USER_ERRORS as error:
        if os.environ.get("FLAXCONV_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
