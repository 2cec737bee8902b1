"""A population run as an experiment: the loop behind ``experiments/mnist_sweep.py``.

:func:`resolve_config` turns the sweep's flags (``--num-models``, ``--learning-rates``
``"1e-3,3e-3"`` or ``"logspace:FROM:TO"``, ``--seeds``) into one learning rate and one seed
per member; :func:`train_and_evaluate` loads the data as every experiment does
(:func:`flaxconv.experiment.load_datasets`), builds the population, trains it with
:func:`fit_population` and writes ``results.json``. :func:`fit_population` is the epoch loop:
:func:`flaxconv.population.train_population_epoch` and ``fc.evaluate`` of the members per
epoch, a :class:`flaxconv.history.History`
per member, a checkpoint of the whole population per epoch (resumed by running the same
command again), SIGTERM handled as ``fc.fit`` does (:mod:`flaxconv.preemption`), and
:class:`PopulationDivergedError` when every member's loss is NaN or infinite.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

import flaxconv as fc
from flaxconv import experiment, preemption
from flaxconv import population as pop
from flaxconv.checkpoint import Checkpoints
from flaxconv.epochs import EpochPlan, epoch_plan
from flaxconv.fit import NonFiniteLossError
from flaxconv.history import History
from flaxconv.history import append as append_logs
from flaxconv.resume import check_config
from flaxconv.workdir import claim_workdir, write_json

#: Config keys that a resumed sweep may change: they do not alter the training.
RESUMABLE_CHANGES = ("epochs", "eval_batch_size", "workdir")
SHUFFLES = ("per-member", "shared")
DATA_SOURCES = ("auto", "raw", "tfds")
#: What each member's :class:`~flaxconv.history.History` records per epoch.
HISTORY_KEYS = ("loss", "accuracy", "test_loss", "test_accuracy")


class PopulationDivergedError(NonFiniteLossError):
    """Every member's training loss became NaN or infinite in ``epoch`` (0-based)."""

    def __init__(self, epoch: int, losses: list[float]):
        self.step, self.epoch, self.loss = None, epoch, losses
        FloatingPointError.__init__(
            self,
            f"every member diverged in epoch {epoch + 1} (training losses {losses}); "
            f"stopped (lower the learning rates or check the inputs). The last good "
            f"checkpoint, if any, is kept.",
        )


# --------------------------------------------------------------------------- config


def _learning_rates(spec: str) -> tuple[list[float] | None, tuple[float, float] | None]:
    """``"1e-3,3e-3"`` -> (the values, None); ``"logspace:FROM:TO"`` -> (None, (FROM, TO))."""
    error = ValueError(f"--learning-rates {spec!r}: expected numbers >= 0 separated by "
                       f"commas, or logspace:FROM:TO with FROM, TO > 0")
    try:
        if spec.startswith("logspace:"):
            parts = spec.split(":")
            low, high = float(parts[1]), float(parts[2])
            if len(parts) != 3 or not (low > 0 and high > 0):
                raise error
            return None, (low, high)
        values = [float(v) for v in spec.split(",")]
    except (ValueError, IndexError):
        raise error from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise error
    return values, None


def _seeds(spec: str | None) -> list[int] | None:
    """``"0,1,2"`` as checked seeds (:func:`flaxconv.experiment.check_seed`); None stays."""
    if spec is None:
        return None
    try:
        seeds = [int(s) for s in spec.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {spec!r}: expected integers separated by commas") from None
    for i, seed in enumerate(seeds):
        experiment.check_seed(seed, f"seed {i} of --seeds")
    return seeds


def _check_choice(flag: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ValueError(f"--{flag} {value!r}: expected one of {list(choices)}")


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The sweep's flags as one value per member; checks every flag before any data loads.

    Args:
      config: ``num_models`` (None: the length of a list given, else 4),
        ``learning_rates`` (a string, see the module doc; one value is every member's),
        ``seeds`` (a string of comma-separated seeds, one value is every member's; None:
        ``0..K-1``), and ``epochs``, ``batch_size``, ``eval_batch_size``,
        ``train_examples``, ``model``, ``optimizer``, ``shuffle``, ``data_source``,
        ``data_seed``.

    Returns:
      A new config whose ``num_models`` is K and whose ``learning_rates`` (floats) and
      ``seeds`` (ints) are lists of K values.

    Raises:
      ValueError: naming the flag, its value and what was expected.
    """
    for flag in ("epochs", "batch_size", "eval_batch_size"):
        if config[flag] < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {config[flag]}: expected >= 1")
    experiment.check_flags(config)
    k = config.num_models
    if k is not None and k < 1:
        raise ValueError(f"--num-models {k}: expected a positive number of members")
    _check_choice("model", config.model, fc.models.names())
    _check_choice("optimizer", config.optimizer, fc.optim.names())
    _check_choice("shuffle", config.shuffle, SHUFFLES)
    _check_choice("data-source", config.data_source, DATA_SOURCES)
    experiment.check_seed(config.data_seed, "--data-seed")
    rates, logspace = _learning_rates(config.learning_rates)
    seeds = _seeds(config.seeds)

    # K: explicit, else the length of a list given, else the default.
    lengths = [len(x) for x in (seeds, rates) if x is not None and len(x) > 1]
    k = k or (lengths[0] if lengths else 4)
    for name, values in (("learning rates", rates), ("seeds", seeds)):
        if values is not None and len(values) not in (1, k):
            flag = name.replace(" ", "-")
            raise ValueError(f"--{flag} gives {len(values)} {name} for {k} members")
    if logspace is not None:
        rates = np.geomspace(*logspace, k).tolist()
    seeds = list(range(k)) if seeds is None else seeds
    return ml_collections.ConfigDict({
        **config.to_dict(),
        "num_models": k,
        "learning_rates": rates * k if len(rates) == 1 else rates,
        "seeds": seeds * k if len(seeds) == 1 else seeds,
    })


# --------------------------------------------------------------------------- the experiment


def train_and_evaluate(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains the population of a :func:`resolve_config`'d ``config``; returns the results
    it writes to ``<workdir>/results.json``: per member its seed, learning rate, test and
    last training numbers and history; the ensemble's test numbers; the best member."""
    with claim_workdir(config.workdir):  # one run at a time in a workdir
        return _train_and_evaluate(config)


def _train_and_evaluate(config: ml_collections.ConfigDict) -> dict[str, Any]:
    datasets = experiment.load_datasets(config)
    (train_images, train_labels), (test_images, test_labels) = datasets.train, datasets.test
    k = config.num_models
    check_config(config.workdir, {key: value for key, value in config.to_dict().items()
                                  if key not in RESUMABLE_CHANGES})

    model = fc.models.get(config.model, num_classes=datasets.num_classes)
    # The rate given to make() is a placeholder: create_population sets each member's.
    tx = fc.optim.make(config.optimizer, learning_rate=1.0)
    states = pop.create_population(
        pop.keys_from_seeds(config.seeds), model, tx, train_images[:1],
        learning_rates=config.learning_rates,
    )
    # Members are split evenly over as many devices as divide K.
    devices = jax.devices()[: math.gcd(k, jax.device_count())]
    mesh = pop.population_mesh(devices)
    states = pop.shard_population(states, mesh)
    train = pop.replicate_data((train_images, train_labels), mesh)
    test = pop.replicate_data((test_images, test_labels), mesh)
    plan = epoch_plan(len(train_labels), config.batch_size)
    print(f"{k} x {config.model} ({fc.num_params(pop.select_member(states, 0).params):,} "
          f"parameters each), {config.optimizer}, {len(train_labels)} training examples, "
          f"batch {config.batch_size}, {plan.steps} steps/epoch, on {len(devices)} "
          f"{jax.default_backend()} device(s)", flush=True)

    start = time.perf_counter()
    data_seed = None if config.shuffle == "per-member" else config.data_seed
    states, histories, epoch_seconds = fit_population(
        states, train, test, plan, config.epochs, config.workdir,
        data_seed=data_seed, eval_batch_size=config.eval_batch_size,
    )
    train_seconds = time.perf_counter() - start

    # The last epoch's numbers per member (from the checkpoint when nothing was left to train).
    member_test = {name: np.array([h[f"test_{name}"][-1] for h in histories])
                   for name in ("loss", "accuracy")}
    print(pop.population_table(member_test, config.learning_rates, config.seeds))
    ensemble = fc.evaluate(states, *test, batch_size=config.eval_batch_size, ensemble=True)
    print(f"ensemble of {k}: test_loss {ensemble['loss']:.4f} - test_accuracy "
          f"{ensemble['accuracy']:.4f} ({len(test_labels)} test images)", flush=True)

    best = pop.best_member(member_test)
    members = [
        dict(seed=int(config.seeds[i]), learning_rate=float(config.learning_rates[i]),
             test_accuracy=h["test_accuracy"][-1], test_loss=h["test_loss"][-1],
             train_accuracy=h["accuracy"][-1], train_loss=h["loss"][-1], history=dict(h))
        for i, h in enumerate(histories)
    ]
    results = {
        "members": members,
        "ensemble_test_accuracy": ensemble["accuracy"],
        "ensemble_test_loss": ensemble["loss"],
        "best_member": {"index": best, **{n: members[best][n] for n in
                                          ("seed", "learning_rate", "test_accuracy")}},
        "epoch_seconds": epoch_seconds,  # the first includes compilation
        "train_seconds": train_seconds,
        "train_examples": len(train_labels),
        "test_examples": len(test_labels),
        "devices": [str(d) for d in devices],
        "backend": jax.default_backend(),
        "config": config.to_dict(),
    }
    path = os.path.join(config.workdir, "results.json")
    write_json(path, results)
    print(f"wrote {path}")
    return results


def _spread(values: Any) -> str:
    return f"{np.mean(values):.4f} ({np.min(values):.4f}..{np.max(values):.4f})"


def fit_population(
    states: Any,
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    plan: EpochPlan,
    epochs: int,
    workdir: str,
    *,
    data_seed: int | None = None,
    eval_batch_size: int = 500,
) -> tuple[Any, list[History], list[float]]:
    """Trains a population for the epochs left after the newest checkpoint in
    ``<workdir>/checkpoints``, evaluating every member on ``test`` and saving after each.

    Args:
      states: a population (:func:`flaxconv.population.create_population`); donated.
      train, test: ``(images, labels)`` arrays shared by the members.
      plan: the epoch's batches (:func:`flaxconv.epochs.epoch_plan` of ``train``).
      epochs: the total number of epochs, those already saved included.
      workdir: holds ``checkpoints/`` (and ``preempted`` state, see
        :mod:`flaxconv.preemption`).
      data_seed: None: member ``i`` visits each epoch's examples in the order ``fc.fit``
        would for its seed (:func:`flaxconv.population.order_seeds`); an int: every member
        sees the same batches, ``flaxconv.epochs.epoch_order(data_seed, epoch, N)``.
      eval_batch_size: examples per step of the test evaluation (``fc.evaluate``).

    Returns:
      The trained states; one :class:`~flaxconv.history.History` per member, with per-epoch
      lists of ``loss``, ``accuracy`` (training) and ``test_loss``, ``test_accuracy``;
      the seconds of each epoch's training (the first includes compilation).

    Raises:
      PopulationDivergedError: every member's loss is non-finite (that epoch is not saved).
      preemption.Preempted: SIGTERM came; the epoch in progress is finished and saved first.
    """
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), max_to_keep=2)
    stop = preemption.watch_sigterm()
    try:
        states, first, histories, epoch_seconds = _resume(checkpoints, states, epochs)
        # The states' rngs, which fix each member's orders, do not change in training.
        order = pop.order_seeds(states) if data_seed is None else data_seed
        for epoch in range(first, epochs):
            tick = time.perf_counter()
            states, sums = pop.train_population_epoch(
                states, *train, pop.population_indices(plan, order, epoch), plan.mask
            )
            total = jax.tree.map(lambda x: np.asarray(x).sum(-1), sums)  # [K] each
            count = np.maximum(total["count"], 1.0)
            logs = {"loss": total["loss_sum"] / count, "accuracy": total["correct"] / count}
            epoch_seconds.append(time.perf_counter() - tick)
            test_logs = fc.evaluate(states, *test, batch_size=eval_batch_size)
            logs.update({f"test_{name}": test_logs[name] for name in ("loss", "accuracy")})
            for i, history in enumerate(histories):
                append_logs(history, {name: np.asarray(logs[name])[i] for name in HISTORY_KEYS})
            _log_epoch(epoch, epochs, epoch_seconds[-1], logs)
            if not np.isfinite(logs["loss"]).any():
                raise PopulationDivergedError(epoch, np.asarray(logs["loss"]).tolist())
            checkpoints.save(epoch, states, {"epoch": epoch, "histories": histories,
                                             "epoch_seconds": epoch_seconds})
            if stop() and epoch + 1 < epochs:
                checkpoints.wait()  # the message says it is saved
                raise preemption.preempt(
                    workdir, states, epoch=epoch, epochs=epochs, steps=plan.steps,
                    sums=None, seconds=epoch_seconds[-1], reason=stop.reason,
                )
    finally:
        stop.close()
        checkpoints.close()  # the last save reaches the disk, or its error is raised
    return states, histories, epoch_seconds


def _resume(checkpoints: Checkpoints, states: Any, epochs: int):
    """``(states, first epoch to train, histories, epoch seconds)`` from the newest intact
    checkpoint, or a fresh start (the given states, 0, empty histories) when there is none."""
    restored = checkpoints.restore_latest(states)
    if restored is None:
        return states, 0, [History() for _ in range(pop.num_members(states))], []
    states, meta = restored
    done = int(meta["epoch"]) + 1
    print(f"Resuming from {checkpoints.directory}/{done - 1} (epoch {done}/{epochs} done)",
          flush=True)
    if "histories" in meta:
        histories = [History(h) for h in meta["histories"]]
    else:  # a checkpoint of the sweep before flaxconv.sweep: {name: per epoch, [K] values}
        histories = [History({name: [v[i] for v in values] for name, values in
                              meta["history"].items()}) for i in range(pop.num_members(states))]
    return states, done, histories, list(meta["epoch_seconds"])


def _log_epoch(epoch: int, epochs: int, seconds: float, logs: dict[str, Any]) -> None:
    """One line per epoch: each number as the members' mean (min..max)."""
    diverged = np.flatnonzero(~np.isfinite(logs["loss"]))
    note = f" - diverged: members {diverged.tolist()}" if diverged.size else ""
    print(f"epoch {epoch + 1}/{epochs} - {seconds:.1f}s - loss {_spread(logs['loss'])} - "
          f"accuracy {_spread(logs['accuracy'])} - test_accuracy "
          f"{_spread(logs['test_accuracy'])}{note}", flush=True)


__all__ = [
    "PopulationDivergedError",
    "fit_population",
    "resolve_config",
    "train_and_evaluate",
]
