"""The plan of an epoch: how N examples split into fixed-size batches, on one device or
split over the devices of a mesh, and the example indices of each step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxconv import parallel
from flaxconv.epochs.order import key_order, padding_mask
from flaxconv.state import TrainState


class EpochPlan(NamedTuple):
    """How ``num_examples`` split into ``steps`` fixed-size batches of ``batch_size``.

    ``mask`` is bool ``[steps, batch_size]``: False marks the padding of the last batch.
    """

    num_examples: int
    batch_size: int
    steps: int
    mask: jax.Array

    def indices(self, order: Any = None) -> jax.Array:
        """int32 ``[steps, batch_size]`` example indices, the last batch padded with
        example 0 (masked).

        Args:
          order: None, the natural order; an int ``[num_examples]`` permutation (e.g.
            :func:`~flaxconv.epochs.epoch_order`); or a PRNG key, standing for
            :func:`~flaxconv.epochs.key_order` of it. Computed on the host, not traced.
        """
        n, total = self.num_examples, self.steps * self.batch_size
        if order is None:
            order = np.arange(n, dtype=np.int32)
        elif isinstance(order, jax.Array) and (
            jnp.issubdtype(order.dtype, jax.dtypes.prng_key)
            or (order.dtype == jnp.uint32 and order.shape == (2,))  # raw jax.random.PRNGKey
        ):
            order = key_order(order, n)
        order = np.asarray(order)
        if order.shape != (n,) or not np.issubdtype(order.dtype, np.integer):
            raise ValueError(
                f"order has shape {order.shape} and dtype {order.dtype}; expected a key or "
                f"int [{n}] example indices"
            )
        order = np.pad(order.astype(np.int32), (0, total - n))  # padding reads example 0
        return jnp.asarray(order.reshape(self.steps, self.batch_size))


class DataParallelPlan(EpochPlan):
    """An :class:`EpochPlan` whose ``mask`` and ``indices`` are split on their batch axis
    over a mesh axis (``P(None, "data")``).

    Handed to :func:`~flaxconv.epochs.train_epoch` with a replicated state and dataset,
    step ``s`` gathers ``images[indices[s]]`` with split indices, so each device gathers
    and trains on its own ``B / D`` rows; the data order is the single-device one.
    """

    __slots__ = ()

    def indices(self, order: Any = None) -> jax.Array:
        """As :meth:`EpochPlan.indices`, placed like ``mask``."""
        return jax.device_put(super().indices(order), self.mask.sharding)


def epoch_plan(
    num_examples: int,
    batch_size: int,
    drop_remainder: bool = False,
    *,
    mesh: Mesh | None = None,
    axis: str = parallel.DATA,
) -> EpochPlan:
    """The plan for a dataset of ``num_examples`` at ``batch_size``.

    Args:
      num_examples, batch_size: positive ints.
      drop_remainder: drop the last partial batch instead of padding it.
      mesh: split every batch over ``axis`` of this mesh: a :class:`DataParallelPlan`;
        None: an :class:`EpochPlan` on the default device.

    Raises:
      ValueError: a bad ``batch_size``, no examples, no batch left, or (with a mesh) a
        ``batch_size`` that does not split evenly over the axis.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or (
        batch_size <= 0
    ):
        raise ValueError(f"batch_size={batch_size!r}; expected a positive integer")
    if num_examples <= 0:
        raise ValueError(f"the dataset has {num_examples} examples; expected at least one")
    steps = num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)
    if steps == 0:
        raise ValueError(
            f"batch_size={batch_size} with drop_remainder leaves no batch of "
            f"{num_examples} examples"
        )
    valid = padding_mask(num_examples, steps * batch_size).reshape(steps, batch_size)
    if mesh is None:
        return EpochPlan(num_examples, int(batch_size), steps, jnp.asarray(valid))
    parallel.check_batch_size(int(batch_size), mesh, axis)
    split = NamedSharding(mesh, PartitionSpec(None, axis))
    return DataParallelPlan(num_examples, int(batch_size), steps, parallel._put(valid, split))


def place_for_fit(
    state: TrainState, images: Any, labels: Any, batch_size: int
) -> tuple[TrainState, jax.Array, jax.Array, DataParallelPlan]:
    """What ``fit`` trains on with array data: replicated state and dataset, split plan.

    The mesh is the one ``state`` is already placed on (see
    :func:`flaxconv.parallel.replicate`) when it has a ``"data"`` axis, else
    :func:`flaxconv.parallel.data_mesh` over all devices.

    Returns:
      ``(state, images, labels, plan)``: ``images`` as given (uint8 stays uint8),
      ``labels`` int32, both replicated; ``plan`` a :class:`DataParallelPlan`.

    Raises:
      ValueError: ``batch_size`` does not split evenly over the mesh's devices.
    """
    mesh = parallel.mesh_of(state.params) or parallel.data_mesh()
    plan = epoch_plan(len(labels), batch_size, mesh=mesh)
    state = parallel.replicate(state, mesh)
    images = parallel.replicate(
        images if isinstance(images, jax.Array) else np.asarray(images), mesh
    )
    labels = parallel.replicate(np.asarray(labels, np.int32), mesh)
    return state, images, labels, plan
