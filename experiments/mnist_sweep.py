"""A population of MNIST convnets trained at once: seeds, learning-rate sweeps, an ensemble.

    python experiments/mnist_sweep.py --num-models 8 --epochs 1
    python experiments/mnist_sweep.py --num-models 8 --learning-rates logspace:1e-4:1e-2 --seeds 0
    python experiments/mnist_sweep.py --num-models 2 --train-examples 2000 --workdir runs/quick

Every member is the DLWP convnet recipe (``experiments/mnist_convnet.py``) with its own seed
and learning rate; all K train together in one vmapped, device-resident ``lax.scan`` per
epoch, split over the available devices when there are several. With ``--shuffle
per-member`` (the default) member ``i`` sees the data order ``fc.fit`` uses for its seed, so
it ends where ``mnist_convnet.py --seed <seed_i>`` would (same optimizer, learning rate,
batch size, no validation split). Prints a line per epoch, the per-member table and the
ensemble's test accuracy, and writes ``<workdir>/results.json``.

Every epoch ends with a checkpoint of the whole population in ``<workdir>/checkpoints/``:
running the same command again resumes after the last saved epoch (a workdir of another
configuration is refused), and SIGTERM stops the run after the epoch in progress, saved,
with exit status 143 (:mod:`flaxconv.preemption`). A run in which every member diverged
stops with an error (exit status 1) instead of training NaNs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

import flaxconv as fc
from flaxconv import data, preemption
from flaxconv import population as pop
from flaxconv.checkpoint import Checkpoints
from flaxconv.epochs import epoch_plan
from flaxconv.experiment import check_seed, report_errors
from flaxconv.fit import NonFiniteLossError, data_order_key
from flaxconv.steps import summarize
from flaxconv.workdir import check_config, claim_workdir, write_json

# Flags that a resumed sweep may change: they do not alter the training.
RESUMABLE_CHANGES = ("epochs", "eval_batch_size", "workdir")


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


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            dataset="mnist",
            data_source="auto",
            model="dlwp_mnist",
            optimizer="rmsprop",
            num_models=4,
            learning_rates=[1e-3],  # one value is shared by every member
            seeds=None,  # default 0..K-1
            epochs=1,
            batch_size=64,
            shuffle="per-member",  # or "shared": every member sees the same batches
            data_seed=0,  # the shared order's seed
            train_examples=0,  # 0 = the whole training split
            eval_batch_size=500,
            workdir="runs/mnist_sweep",
        )
    )


# --------------------------------------------------------------------------- flags


def _parse_learning_rates(spec: str) -> tuple[list[float] | None, tuple[float, float] | None]:
    """``"1e-3,3e-3"`` or ``"logspace:FROM:TO"`` (K log-spaced values, both ends included)."""
    if spec.startswith("logspace:"):
        parts = spec.split(":")
        low, high = float(parts[1]), float(parts[2])  # ValueError/IndexError: caller reports
        if len(parts) != 3 or not (low > 0 and high > 0):
            raise ValueError
        return None, (low, high)
    values = [float(v) for v in spec.split(",")]
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError
    return values, None


def parse_flags(argv: list[str] | None = None) -> ml_collections.ConfigDict:
    """The config from command-line flags; a bad flag exits with one ``error:`` line."""
    config = default_config()
    parser = argparse.ArgumentParser(
        prog="mnist_sweep.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--num-models", type=int, default=None,
                        help="K members (default: the number of seeds or rates given, else 4)")
    parser.add_argument("--learning-rates", default="1e-3",
                        help="comma list (one value: every member) or logspace:FROM:TO")
    parser.add_argument("--seeds", default=None,
                        help="comma list, one per member (one value: every member starts "
                             "from the same initialization); default 0..K-1")
    parser.add_argument("--epochs", type=int, default=config.epochs)
    parser.add_argument("--batch-size", type=int, default=config.batch_size)
    parser.add_argument("--optimizer", default=config.optimizer, help=str(fc.optim.names()))
    parser.add_argument("--model", default=config.model, help=str(fc.models.names()))
    parser.add_argument("--dataset", default=config.dataset)
    parser.add_argument("--data-source", default=config.data_source,
                        choices=("auto", "raw", "tfds"))
    parser.add_argument("--shuffle", default=config.shuffle, choices=("per-member", "shared"))
    parser.add_argument("--data-seed", type=int, default=config.data_seed)
    parser.add_argument("--train-examples", type=int, default=config.train_examples,
                        help="train on the first N examples only (0: all), for quick runs")
    parser.add_argument("--eval-batch-size", type=int, default=config.eval_batch_size)
    parser.add_argument("--workdir", default=config.workdir)
    args = parser.parse_args(argv)

    for flag in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected >= 1")
    if args.train_examples < 0:
        parser.error(f"--train-examples {args.train_examples}: expected >= 0 (0: all)")
    if args.num_models is not None and args.num_models < 1:
        parser.error(f"--num-models {args.num_models}: expected a positive number of members")
    if args.model not in fc.models.names():
        parser.error(f"--model {args.model!r}: expected one of {list(fc.models.names())}")
    if args.optimizer not in fc.optim.names():
        parser.error(f"--optimizer {args.optimizer!r}: expected one of {list(fc.optim.names())}")
    try:
        rates, logspace = _parse_learning_rates(args.learning_rates)
    except (ValueError, IndexError):
        parser.error(f"--learning-rates {args.learning_rates!r}: expected numbers >= 0 "
                     "separated by commas, or logspace:FROM:TO with FROM, TO > 0")
    try:
        seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
        for i, seed in enumerate(seeds or ()):
            check_seed(seed, f"seed {i} of --seeds")
        check_seed(args.data_seed, "--data-seed")
    except ValueError as error:
        parser.error(f"--seeds {args.seeds!r}: expected integers separated by commas"
                     if "expected an integer" not in str(error) else str(error))

    # K: explicit, else the length of a list given, else the default.
    lengths = [len(x) for x in (seeds, rates) if x is not None and len(x) > 1]
    k = args.num_models or (lengths[0] if lengths else config.num_models)
    if rates is not None and len(rates) not in (1, k):
        parser.error(f"--learning-rates gives {len(rates)} learning rates for {k} members")
    if seeds is not None and len(seeds) not in (1, k):
        parser.error(f"--seeds gives {len(seeds)} seeds for {k} members")
    if logspace is not None:
        rates = np.geomspace(*logspace, k).tolist()
    config.update(
        dict(
            num_models=k,
            learning_rates=rates * k if len(rates) == 1 else rates,
            seeds=list(range(k)) if seeds is None else (seeds * k if len(seeds) == 1 else seeds),
            **{key: getattr(args, key) for key in (
                "epochs", "batch_size", "optimizer", "model", "dataset", "data_source",
                "shuffle", "data_seed", "train_examples", "eval_batch_size", "workdir")},
        )
    )
    return config


# --------------------------------------------------------------------------- the experiment


def _spread(values: np.ndarray) -> str:
    return f"{np.mean(values):.4f} ({np.min(values):.4f}..{np.max(values):.4f})"


def train_and_evaluate(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains the population described by ``config``; returns the results it writes."""
    with claim_workdir(config.workdir):  # one run at a time in a workdir
        return _train_and_evaluate(config)


def _train_and_evaluate(config: ml_collections.ConfigDict) -> dict[str, Any]:
    train_images, train_labels = data.load(config.dataset, "train", source=config.data_source)
    test_images, test_labels = data.load(config.dataset, "test", source=config.data_source)
    if config.train_examples:
        if config.train_examples > len(train_labels):
            raise ValueError(f"--train-examples {config.train_examples} is more than the "
                             f"{len(train_labels)} training examples")
        train_images = train_images[: config.train_examples]
        train_labels = train_labels[: config.train_examples]
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = config.num_models
    check_config(config.workdir, {key: value for key, value in config.to_dict().items()
                                  if key not in RESUMABLE_CHANGES})

    model = fc.models.get(config.model, num_classes=num_classes)
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
    train = pop.replicate((train_images, train_labels), mesh)
    test = pop.replicate((test_images, test_labels), mesh)
    plan = epoch_plan(len(train_labels), config.batch_size)
    print(f"{k} x {config.model} ({fc.num_params(pop.select_member(states, 0).params):,} "
          f"parameters each), {config.optimizer}, {len(train_labels)} training examples, "
          f"batch {config.batch_size}, {plan.steps} steps/epoch, on {len(devices)} "
          f"{jax.default_backend()} device(s)", flush=True)

    checkpoints = Checkpoints(os.path.join(config.workdir, "checkpoints"), max_to_keep=2)
    stop = preemption.watch_sigterm()
    try:
        states, history, epoch_seconds, train_seconds = _train(
            config, states, train, test, plan, checkpoints, stop
        )
    finally:
        stop.close()
        checkpoints.close()  # the last save reaches the disk, or its error is raised

    # The last epoch's numbers, [K] each (from the checkpoint when nothing was left to train).
    last = {name: np.asarray(values[-1]) for name, values in history.items()}
    member_test = {"loss": last["test_loss"], "accuracy": last["test_accuracy"]}
    print(pop.population_table(member_test, config.learning_rates, config.seeds))
    ensemble = summarize(pop.ensemble_evaluate(states, *test, config.eval_batch_size))
    print(f"ensemble of {k}: test_loss {ensemble['loss']:.4f} - test_accuracy "
          f"{ensemble['accuracy']:.4f} ({len(test_labels)} test images)", flush=True)

    best = pop.best_member(member_test)
    members = [
        dict(seed=int(config.seeds[i]), learning_rate=float(config.learning_rates[i]),
             test_accuracy=float(member_test["accuracy"][i]),
             test_loss=float(member_test["loss"][i]),
             train_accuracy=float(last["accuracy"][i]), train_loss=float(last["loss"][i]),
             history={name: [epoch_values[i] for epoch_values in values]
                      for name, values in history.items()})
        for i in range(k)
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


def _train(config, states, train, test, plan, checkpoints: Checkpoints, stop):
    """The epochs left after the newest checkpoint in ``checkpoints``; each is saved.

    Returns:
      The states, the history (per-epoch lists of ``[K]`` member values of ``loss``,
      ``accuracy``, ``test_loss``, ``test_accuracy``), the seconds of each epoch and the
      training seconds of this call.

    Raises:
      PopulationDivergedError: every member's loss is non-finite (that epoch is not saved).
      preemption.Preempted: ``stop()`` became true (SIGTERM); the epoch in progress is
        finished and saved first.
    """
    history: dict[str, list[list[float]]] = {"loss": [], "accuracy": [], "test_loss": [],
                                             "test_accuracy": []}
    epoch_seconds: list[float] = []
    first = 0
    restored = checkpoints.restore_latest(states)
    if restored is not None:
        states, meta = restored
        first = int(meta["epoch"]) + 1
        history, epoch_seconds = meta["history"], meta["epoch_seconds"]
        print(f"Resuming from {checkpoints.directory}/{first - 1} (epoch {first}/"
              f"{config.epochs} done)", flush=True)
    start = time.perf_counter()
    for epoch in range(first, config.epochs):
        if config.shuffle == "per-member":
            keys = jax.vmap(data_order_key, in_axes=(0, None))(states, epoch)
        else:
            keys = jax.random.fold_in(jax.random.key(config.data_seed), epoch)
        indices = pop.population_indices(plan, keys)
        tick = time.perf_counter()
        states, sums = pop.train_population_epoch(states, *train, indices, plan.mask)
        logs = summarize(jax.tree.map(lambda x: np.asarray(x).sum(-1), sums))
        epoch_seconds.append(time.perf_counter() - tick)
        logs.update({f"test_{n}": v for n, v in summarize(
            pop.evaluate_population(states, *test, config.eval_batch_size)).items()})
        for name in history:
            history[name].append(np.asarray(logs[name]).tolist())
        diverged = np.flatnonzero(~np.isfinite(logs["loss"]))
        note = f" - diverged: members {diverged.tolist()}" if diverged.size else ""
        print(f"epoch {epoch + 1}/{config.epochs} - {epoch_seconds[-1]:.1f}s - "
              f"loss {_spread(logs['loss'])} - accuracy {_spread(logs['accuracy'])} - "
              f"test_accuracy {_spread(logs['test_accuracy'])}{note}", flush=True)
        if diverged.size == config.num_models:
            raise PopulationDivergedError(epoch, np.asarray(logs["loss"]).tolist())
        checkpoints.save(epoch, states, {"epoch": epoch, "history": history,
                                         "epoch_seconds": epoch_seconds})
        if stop() and epoch + 1 < config.epochs:
            checkpoints.wait()  # the message says it is saved
            raise preemption.preempt(
                config.workdir, states, epoch=epoch, epochs=config.epochs, steps=plan.steps,
                sums=None, seconds=epoch_seconds[-1], reason=stop.reason,
            )
    return states, history, epoch_seconds, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    config = parse_flags(argv)
    return report_errors(lambda: train_and_evaluate(config))


if __name__ == "__main__":
    sys.exit(main())
