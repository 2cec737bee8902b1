"""Populations: K models trained at once by ``jax.vmap`` — seeds, sweeps, ensembles.

A *population* is an ordinary :class:`~flaxconv.state.TrainState` whose every leaf has a
leading member axis ``K``: ``params["conv_0"]["kernel"]`` is ``[K, 3, 3, 1, 32]``, ``step``
is ``int32[K]``, the injected learning rate is ``float32[K]``. The static fields (``model``,
``tx``, ``input_shape``) are shared, so all members have one architecture and one optimizer
family; they differ in their initialization key, their learning rate and (optionally)
their data order. Nothing else is special: ``jax.vmap(fc.train_step, in_axes=(0, None))``
trains a population on one batch, and the functions here are that idea applied to whole
device-resident epochs (:mod:`flaxconv.epochs`). On CPU, where a vmapped member trains
slower than a lone model, :func:`train_population_epoch` lets the members take turns inside
the one compiled epoch instead (``vmap_size``, :func:`resolve_vmap_size`).

>>> states = create_population(keys_from_seeds(range(8)), model, tx, images[:1],
...                            learning_rates=np.geomspace(1e-4, 1e-2, 8))
>>> plan = fc.epochs.epoch_plan(len(labels), batch_size=64)
>>> order = population_indices(plan, order_seeds(states), epoch=0)  # [8, S, B]: fit's orders
>>> states, sums = train_population_epoch(states, images, labels, order, plan.mask)
>>> print(population_table(fc.evaluate(states, test_images, test_labels)))  # per member
>>> probs = ensemble_predict(states, test_images[:100])         # mean of member softmaxes

With ``population_indices(plan, order_seeds(states), epoch)`` (or, the same, the keys
``jax.vmap(flaxconv.epochs.data_order_key, in_axes=(0, None))(states, epoch)``), each member
sees the data order ``fc.fit`` would give it (:func:`flaxconv.epochs.epoch_order` of its own
seed), so member ``i`` ends where
``fc.fit`` of its seed and learning rate does (``experiments/mnist_sweep.py`` does this).

The member axis can be placed across devices (:func:`shard_population`): with D devices
each holds and trains K/D members, running the same code.

Also here, because it is the same trick with the batch axis instead of the member axis:
:func:`per_example_grads`.

The package, one concern a module (each name is also here, as ``flaxconv.population.<name>``):

* :mod:`~flaxconv.population.members`: creating, selecting and stacking members, their
  learning rates.
* :mod:`~flaxconv.population.training`: the population epoch, its data orders and how many
  members are vmapped at once.
* :mod:`~flaxconv.population.results`: the ensemble's predictions, the best member, the
  per-member table.
* :mod:`~flaxconv.population.sharding`: the member axis across devices.
* :mod:`~flaxconv.population.per_example`: per-example gradients.
"""

from __future__ import annotations

from flaxconv.evaluation import ensemble_log_probs, ensemble_log_probs_fn
from flaxconv.population.members import (
    create_population,
    keys_from_seeds,
    num_members,
    select_member,
    set_learning_rates,
    stack_members,
)
from flaxconv.population.per_example import per_example_grads, per_example_grads_fn
from flaxconv.population.results import (
    best_member,
    ensemble_predict,
    ensemble_predict_fn,
    population_table,
)
from flaxconv.population.sharding import (
    MEMBERS,
    population_mesh,
    replicate_data,
    shard_population,
)
from flaxconv.population.training import (
    order_seeds,
    population_indices,
    train_population_epoch,
    train_population_epoch_fn,
)

# Reachable here, as before the split, though not in __all__.
from flaxconv.population.training import resolve_vmap_size as resolve_vmap_size

__all__ = [
    "MEMBERS",
    "create_population",
    "best_member",
    "ensemble_log_probs",
    "ensemble_log_probs_fn",
    "ensemble_predict",
    "ensemble_predict_fn",
    "keys_from_seeds",
    "num_members",
    "per_example_grads",
    "per_example_grads_fn",
    "order_seeds",
    "population_indices",
    "population_mesh",
    "population_table",
    "replicate_data",
    "select_member",
    "set_learning_rates",
    "shard_population",
    "stack_members",
    "train_population_epoch",
    "train_population_epoch_fn",
]
