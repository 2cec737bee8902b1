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

import os
import sys

import ml_collections
from ml_collections.config_dict import placeholder

# data and pop are not used here: flaxconv.sweep loads and trains through them, and the
# tests patch them (data.load, pop.train_population_epoch) through this script's namespace.
from flaxconv import data, experiment, sweep  # noqa: F401
from flaxconv import population as pop  # noqa: F401

PROG = os.path.basename(__file__)


def get_config() -> ml_collections.ConfigDict:
    """The sweep's flags; :func:`flaxconv.sweep.resolve_config` makes them per member."""
    return ml_collections.ConfigDict(dict(
        dataset="mnist", data_source="auto", model="dlwp_mnist", optimizer="rmsprop",
        num_models=placeholder(int),  # K; default: the number of seeds or rates given, else 4
        learning_rates="1e-3",  # comma list (one value: every member) or logspace:FROM:TO
        seeds=placeholder(str),  # comma list, one per member (one value: all alike); 0..K-1
        epochs=1, batch_size=64,
        shuffle="per-member",  # or "shared": every member sees the same batches
        data_seed=0,  # the shared order's seed
        train_examples=0,  # > 0: train on the first N training examples only (quick runs)
        eval_batch_size=500, workdir="runs/mnist_sweep",
    ))


def parse_flags(argv: list[str] | None = None) -> ml_collections.ConfigDict:
    """The resolved config from command-line flags; a bad flag exits with one error line."""
    return experiment.parse_flags(get_config(), argv, __doc__, resolve=sweep.resolve_config,
                                  prog=PROG)


def main(argv: list[str] | None = None) -> int:
    return experiment.cli(get_config(), __doc__, argv, run=sweep.train_and_evaluate,
                          resolve=sweep.resolve_config, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
