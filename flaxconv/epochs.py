"""Whole epochs inside XLA: the device-resident fast path.

The dataset lives on the device as uint8 (MNIST's 60,000 images are 47 MB); an epoch is
one jitted ``lax.scan`` of :func:`flaxconv.steps.train_step_fn` over a seeded permutation,
so no Python runs per batch. The last partial batch is padded and masked, and every epoch
has the same shapes, so nothing recompiles after the first call.

>>> images, labels = jax.device_put((train_images_uint8, train_labels))
>>> plan = epoch_plan(len(labels), batch_size=64)
>>> state, sums = train_epoch(state, images, labels, plan.indices(key), plan.mask)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxconv.state import TrainState
from flaxconv.steps import Batch, Metrics, eval_step_fn, train_step_fn


class EpochPlan(NamedTuple):
    """How ``num_examples`` split into ``steps`` fixed-size batches of ``batch_size``.

    ``mask`` is bool ``[steps, batch_size]``: False marks the padding of the last batch.
    """

    num_examples: int
    batch_size: int
    steps: int
    mask: jax.Array

    def indices(self, key: jax.Array | None) -> jax.Array:
        """int32 ``[steps, batch_size]`` example indices: a permutation by ``key``, or the
        natural order when ``key`` is None; padding slots point at example 0."""
        n, total = self.num_examples, self.steps * self.batch_size
        order = jnp.arange(n) if key is None else jax.random.permutation(key, n)
        order = jnp.pad(order.astype(jnp.int32), (0, total - n))
        return order.reshape(self.steps, self.batch_size)


def epoch_plan(num_examples: int, batch_size: int, drop_remainder: bool = False) -> EpochPlan:
    """The :class:`EpochPlan` for a dataset of ``num_examples`` at ``batch_size``."""
    if not isinstance(batch_size, int | np.integer) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r}; expected a positive integer")
    if num_examples <= 0:
        raise ValueError(f"the dataset has {num_examples} examples; expected at least one")
    steps = num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)
    if steps == 0:
        raise ValueError(
            f"batch_size={batch_size} with drop_remainder leaves no batch of "
            f"{num_examples} examples"
        )
    valid = np.arange(steps * batch_size) < num_examples
    return EpochPlan(num_examples, int(batch_size), steps, jnp.asarray(valid.reshape(steps, -1)))


def gather_batch(images: jax.Array, labels: jax.Array, idx: jax.Array, mask: jax.Array):
    """The batch dict for example indices ``idx`` (images stay uint8 until the step)."""
    return {"image": images[idx], "label": labels[idx], "mask": mask}


def train_epoch_fn(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    mask: jax.Array,
) -> tuple[TrainState, Metrics]:
    """Trains on ``indices.shape[0]`` batches with one ``lax.scan``; pure, not jitted.

    Args:
      state: the train state.
      images: uint8 (or float) ``[N, H, W, C]``, on the device.
      labels: int32 ``[N]``.
      indices: int32 ``[S, B]`` example indices per step (see :meth:`EpochPlan.indices`).
      mask: bool ``[S, B]``; False rows are padding.

    Returns:
      The new state and per-step metric sums, each ``[S]`` (sum them for the epoch; the
      per-step losses tell which step went non-finite).
    """

    def body(state, xs):
        idx, m = xs
        return train_step_fn(state, gather_batch(images, labels, idx, m))

    return jax.lax.scan(body, state, (indices, mask))


def sum_over_batches(
    batch_sums: Callable[[Batch], Metrics],
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    mask: jax.Array,
) -> Metrics:
    """``batch_sums`` of every batch, added up in one ``lax.scan``; pure, not jitted.

    Args:
      batch_sums: a batch dict (``image``, ``label``, ``mask``: see :func:`gather_batch`)
        -> a pytree of arrays in which the padding rows (``mask`` False) count zero.
      images: ``[N, H, W, C]``; labels: int32 ``[N]``.
      indices: int32 ``[S, B]``, the examples of each batch; mask: bool ``[S, B]``.

    Returns:
      The pytree of ``batch_sums`` summed over the ``S`` batches.
    """

    def body(total, xs):
        sums = batch_sums(gather_batch(images, labels, *xs))
        return jax.tree.map(jnp.add, total, sums), None

    first = jax.eval_shape(batch_sums, gather_batch(images, labels, indices[0], mask[0]))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    return jax.lax.scan(body, zeros, (indices, mask))[0]


def evaluate_fn(
    state: TrainState, images: jax.Array, labels: jax.Array, indices: jax.Array, mask: jax.Array
) -> Metrics:
    """Summed :func:`flaxconv.steps.eval_step_fn` metrics over all batches; pure."""
    return sum_over_batches(partial(eval_step_fn, state), images, labels, indices, mask)


#: :func:`train_epoch_fn` jitted, donating the incoming state: the library's loops. Inside
#: your own ``jax.jit``, call :func:`train_epoch_fn` instead.
train_epoch = jax.jit(train_epoch_fn, donate_argnums=0)
#: :func:`evaluate_fn` jitted.
evaluate_arrays = jax.jit(evaluate_fn)


def evaluate(
    state: TrainState, images, labels, batch_size: int = 1000
) -> Metrics:
    """Exact metric sums of ``state`` on a whole array dataset, in a few jitted calls.

    ``images`` uint8/float ``[N, H, W, C]`` and ``labels`` int ``[N]``, numpy or device
    arrays. Every example counts once (the last batch is padded and masked).
    """
    plan = epoch_plan(len(labels), min(batch_size, len(labels)))
    return evaluate_arrays(
        state, jnp.asarray(images), jnp.asarray(labels, jnp.int32), plan.indices(None), plan.mask
    )
