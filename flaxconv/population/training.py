"""A population's training epoch: every member's device-resident epoch in one compiled
call (:func:`train_population_epoch`), the members vmapped side by side or taking turns
(:func:`resolve_vmap_size`), each in its own data order or a shared one
(:func:`population_indices`, :func:`order_seeds`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxconv.epochs import EpochPlan, epoch_order, order_seed, train_epoch_fn
from flaxconv.population.members import num_members
from flaxconv.state import TrainState
from flaxconv.steps import Metrics

# Members vmapped together per backend, from benchmarks/population_speed.py: on CPU a
# vmapped member runs slower than an unbatched one (batched matmuls, no Eigen
# convolutions), so members there take turns inside the one compiled epoch; elsewhere all
# of them are vmapped.
_AUTO_VMAP_SIZE = {"cpu": 1}


def resolve_vmap_size(vmap_size: int | None, num_models: int, backend: str | None = None) -> int:
    """How many members train side by side under ``vmap``; the rest take turns.

    ``None`` picks per backend (``jax.default_backend()`` at trace time): 1 on CPU, all
    ``num_models`` elsewhere. A larger number is clipped to ``num_models``; below 1 is an error.
    """
    if vmap_size is None:
        return min(_AUTO_VMAP_SIZE.get(backend or jax.default_backend(), num_models), num_models)
    if not isinstance(vmap_size, int | np.integer) or vmap_size < 1:
        raise ValueError(f"vmap_size={vmap_size!r}; expected a positive integer or None")
    return min(int(vmap_size), num_models)


def _vmapped_kernels(kernels: str) -> str:
    # Under vmap with per-member kernels a convolution becomes a grouped convolution, slow
    # on XLA:CPU; as im2col it is a batched matmul (flaxconv.kernels.policy).
    return "im2col" if kernels in ("auto", "cpu") else kernels



def order_seeds(states: TrainState) -> list[int]:
    """Each member's data-order seed, :func:`flaxconv.epochs.order_seed` of its rng: the
    seed ``fc.fit`` would shuffle that member's data with."""
    return [int(seed) for seed in np.asarray(jax.vmap(order_seed)(states))]


def population_indices(plan: EpochPlan, order: Any, epoch: int = 0) -> jax.Array:
    """The example order of one population epoch, from :func:`flaxconv.epochs.epoch_order`.

    Args:
      plan: from :func:`flaxconv.epochs.epoch_plan`.
      order: None → the natural order, int32 ``[S, B]``; one int seed or one PRNG key →
        every member sees the same batches, ``[S, B]``; a sequence of K int seeds (e.g.
        :func:`order_seeds`) or a ``[K]`` batch of keys → member ``i`` gets its own
        permutation, int32 ``[K, S, B]``. A seed ``s`` gives ``epoch_order(s, epoch, N)``,
        a key :func:`flaxconv.epochs.key_order` of it (``epoch`` unused: a key carries it).
      epoch: the epoch, a non-negative int, for seeds.

    Computed on the host (numpy), not traced.
    """
    if order is None:
        return plan.indices(None)
    n = plan.num_examples
    if isinstance(order, int | np.integer):
        return plan.indices(epoch_order(order, epoch, n))
    legacy = isinstance(order, jax.Array) and order.dtype == jnp.uint32 and (
        order.shape[-1:] == (2,))  # raw key data, jax.random.PRNGKey's [2] or [K, 2]
    if legacy or isinstance(order, jax.Array) and jnp.issubdtype(order.dtype,
                                                                  jax.dtypes.prng_key):
        keys = jax.random.wrap_key_data(order) if legacy else order
        if keys.ndim > 1:
            raise ValueError(f"order has keys of shape {keys.shape}; expected one key or [K]")
        return plan.indices(keys) if keys.ndim == 0 else jnp.stack(
            [plan.indices(key) for key in keys])
    return jnp.stack([plan.indices(epoch_order(seed, epoch, n)) for seed in order])


def _check_epoch_shapes(k: int, indices: Any, mask: Any) -> None:
    """A ValueError naming ``indices`` or ``mask`` when their shapes do not fit a
    population of ``k`` (static shapes: checked when tracing, before any vmap does)."""
    shape = tuple(np.shape(indices))
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != k):
        raise ValueError(
            f"indices has shape {shape}; expected [S, B] (shared order) or [{k}, S, B] "
            f"(one order per member) for a population of {k}"
        )
    if tuple(np.shape(mask)) != shape[-2:]:
        raise ValueError(f"mask has shape {tuple(np.shape(mask))}; expected {shape[-2:]}")


def train_population_epoch_fn(
    states: TrainState,
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    mask: jax.Array,
    vmap_size: int | None = None,
) -> tuple[TrainState, Metrics]:
    """:func:`flaxconv.epochs.train_epoch_fn` for every member at once; pure, not jitted.

    Args:
      states: a population, leaves ``[K, ...]``.
      images: uint8 (or float) ``[N, H, W, C]``, shared by all members.
      labels: int32 ``[N]``, shared.
      indices: int32 ``[S, B]`` (all members see the same batches) or ``[K, S, B]`` (a
        data order per member), see :func:`population_indices`.
      mask: bool ``[S, B]``; False slots are padding (the same for every order).
      vmap_size: members trained side by side by ``jax.vmap``; groups of them take turns
        (``jax.lax.map``) inside the same compiled epoch. None: per backend, see
        :func:`resolve_vmap_size` (static under ``jit``). Every choice gives each member
        the same result, up to float rounding.

    Returns:
      The trained population and metric sums per member and step, each ``[K, S]``.

    Raises:
      ValueError: ``indices`` or ``mask`` has the wrong shape (checked on the static
      shapes, so before tracing the epoch).
    """
    k = num_members(states)
    _check_epoch_shapes(k, indices, mask)
    size = resolve_vmap_size(vmap_size, k)
    per_member = np.ndim(indices) == 3

    def member_epoch(state, member_indices):
        return train_epoch_fn(state, images, labels, member_indices, mask)

    if size == k and k > 1:  # one member alone runs the unbatched step, like a lone model
        vmapped = states.replace(kernels=_vmapped_kernels(states.kernels))
        run = jax.vmap(member_epoch, in_axes=(0, 0 if per_member else None))
        new, sums = run(vmapped, indices)
        return new.replace(kernels=states.kernels), sums
    if per_member:
        return jax.lax.map(lambda xs: member_epoch(*xs), (states, indices),
                           batch_size=size if size > 1 else None)
    return jax.lax.map(lambda state: member_epoch(state, indices), states,
                       batch_size=size if size > 1 else None)


# Donates the population: the library's loop owns it, and K copies of the model and
# optimizer state would otherwise be live twice at the end of each epoch.
_train_population_epoch_jit = jax.jit(
    train_population_epoch_fn, donate_argnums=0, static_argnames="vmap_size"
)


# The arguments, their types and their meaning are train_population_epoch_fn's: wraps
# sets __wrapped__, so inspect.signature and help() show its typed signature, and this
# keeps its own name and docstring (assigned=()).
@functools.wraps(train_population_epoch_fn, assigned=())
def train_population_epoch(states, images, labels, indices, mask, vmap_size=None):
    """Jitted :func:`train_population_epoch_fn`, same arguments and results; donates
    ``states`` (do not reuse them).

    Sum the returned ``[K, S]`` metrics over the last axis for the epoch. A wrong
    ``indices`` or ``mask`` shape gets an error naming it, before anything is donated.
    ``vmap_size=None`` vmaps all members of a population spread over several devices
    (:func:`~flaxconv.population.shard_population`: each device trains its own members;
    decided here, from the concrete ``states``' sharding, which a trace does not see) and
    otherwise picks per backend (:func:`resolve_vmap_size`).
    """
    step = states.step
    if vmap_size is None and isinstance(step, jax.Array) and len(step.sharding.device_set) > 1:
        vmap_size = num_members(states)
    return _train_population_epoch_jit(states, images, labels, indices, mask,
                                       vmap_size=vmap_size)
