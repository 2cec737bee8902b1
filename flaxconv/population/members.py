"""A population's members: K train states stacked on a leading member axis — creating
them (:func:`create_population`, :func:`keys_from_seeds`), taking one out
(:func:`select_member`) or putting them together (:func:`stack_members`), counting them
(:func:`num_members`) and giving each its learning rate (:func:`set_learning_rates`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxconv import optim
from flaxconv.state import TrainState, create_train_state


def keys_from_seeds(seeds: Sequence[int]) -> jax.Array:
    """Typed keys ``[K]``, member ``i`` being ``jax.random.key(seeds[i])``.

    So member ``i`` of ``create_population(keys_from_seeds(seeds), ...)`` starts exactly
    where ``create_train_state(jax.random.key(seeds[i]), ...)`` does.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty; expected at least one seed")
    return jnp.stack([jax.random.key(s) for s in seeds])


def _as_member_keys(keys_or_key: jax.Array, num_models: int | None) -> jax.Array:
    """Typed keys ``[K]`` from one key (split into ``num_models``) or a batch of keys."""
    keys = keys_or_key
    if not jnp.issubdtype(jnp.asarray(keys).dtype, jax.dtypes.prng_key):
        raw = np.asarray(keys)
        if raw.dtype != np.uint32 or raw.ndim not in (1, 2):
            raise ValueError(
                f"keys_or_key is {raw.dtype}{list(raw.shape)}; expected a jax.random.key, "
                "a [K] array of them, or legacy uint32 PRNGKey data ([2] or [K, 2])"
            )
        keys = jax.random.wrap_key_data(jnp.asarray(raw))
    if keys.ndim == 0:
        if num_models is None:
            raise ValueError("one key was given, so num_models is needed to split it")
        if not isinstance(num_models, int | np.integer) or num_models < 1:
            raise ValueError(f"num_models={num_models!r}; expected a positive integer")
        return jax.random.split(keys, int(num_models))
    if keys.ndim != 1 or keys.shape[0] == 0:
        raise ValueError(f"keys have shape {keys.shape}; expected one key or a [K] batch of keys")
    if num_models is not None and num_models != keys.shape[0]:
        raise ValueError(f"num_models={num_models} but {keys.shape[0]} keys were given")
    return keys


def num_members(states: TrainState) -> int:
    """K, the size of the member axis of a population; a clear error for a single state."""
    step = np.shape(states.step)
    if len(step) != 1:
        raise ValueError(
            f"state.step has shape {step}; expected [K]: a population from create_population "
            "(a single TrainState has no member axis)"
        )
    return int(step[0])


def set_learning_rates(states: TrainState, learning_rates: Any) -> TrainState:
    """A copy of ``states`` with member ``i``'s learning rate set to ``learning_rates[i]``.

    Args:
      states: a population whose optimizer comes from :func:`flaxconv.optim.make` (the
        learning rate is injected into ``opt_state.hyperparams["learning_rate"]``).
      learning_rates: ``K`` finite, non-negative numbers (0 freezes a member: a control).

    Raises:
      ValueError: the wrong number of rates, a negative or non-finite rate, an optimizer
      without an injected learning rate, or one whose learning rate is a schedule (the
      schedule would overwrite the value at every step).
    """
    k = num_members(states)
    lrs = np.asarray(learning_rates, np.float64).reshape(-1)
    if lrs.shape != (k,):
        raise ValueError(f"got {lrs.size} learning rates for {k} members; expected {k}")
    if not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
        raise ValueError(f"learning_rates={lrs.tolist()}; expected finite numbers >= 0")
    current = optim.learning_rate(states.opt_state)  # a clear ValueError if not injected
    schedules = optax.tree_utils.tree_get(states.opt_state, "hyperparams_states") or {}
    if "learning_rate" in schedules:
        raise ValueError(
            "the optimizer's learning rate is a schedule, which recomputes it every step; "
            "per-member learning rates need a constant learning_rate in optim.make"
        )
    value = np.asarray(lrs, current.dtype)
    if isinstance(current, jax.Array):  # not for the abstract states create_population checks
        value = jax.device_put(value, current.sharding)
    return states.replace(opt_state=optim.set_learning_rate(states.opt_state, value))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_population(keys, model, tx, input_shape):
    # Only the input shape is static: no data is baked into the compiled init, and a
    # second population of the same model, optimizer and size reuses the compilation.
    spec = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.vmap(lambda key: create_train_state(key, model, tx, spec))(keys)


def create_population(
    keys_or_key: jax.Array,
    model: nn.Module | Any,
    tx: optax.GradientTransformation,
    sample_input: Any,
    num_models: int | None = None,
    learning_rates: Any = None,
) -> TrainState:
    """K independently initialized train states, stacked on a leading member axis.

    Member ``i`` is exactly ``create_train_state(keys[i], model, tx, sample_input)`` (the
    initialization is that function under ``jax.vmap``, and threefry draws the same bits
    batched or not), with its learning rate then set to ``learning_rates[i]``.

    Args:
      keys_or_key: typed keys ``[K]`` (e.g. :func:`keys_from_seeds`), or one key that is
        split into ``num_models``; legacy uint32 ``[K, 2]`` / ``[2]`` keys work too.
      model: the linen module, shared by all members; or an NNX model as for
        :func:`flaxconv.create_train_state`: a function ``rngs -> nnx.Module`` (each
        member built from its own key) or a module (every member starts from its
        variables).
      tx: the Optax optimizer, shared (per-member learning rates need
        :func:`flaxconv.optim.make`, see :func:`set_learning_rates`).
      sample_input: anything with shape ``[N, H, W, C]``; only the shape is used.
      num_models: K, needed when ``keys_or_key`` is a single key.
      learning_rates: ``K`` non-negative numbers, or None to keep ``tx``'s.

    Returns:
      A :class:`TrainState` whose leaves have a leading axis ``K``.
    """
    keys = _as_member_keys(keys_or_key, num_models)
    shape = tuple(np.shape(sample_input))
    if len(shape) != 4:
        raise ValueError(f"sample_input has shape {shape}; expected [N, H, W, C]")
    if learning_rates is not None:
        # Checked on the traced shapes first, so a bad rate fails before compiling.
        abstract = _init_population.eval_shape(keys, model, tx, shape[1:])
        set_learning_rates(abstract, learning_rates)
    states = _init_population(keys, model, tx, shape[1:])
    if learning_rates is not None:
        states = set_learning_rates(states, learning_rates)
    return states


def select_member(states: TrainState, i: int) -> TrainState:
    """Member ``i`` as an ordinary :class:`TrainState` (for ``fc.predict``, checkpoints...)."""
    k = num_members(states)
    if not isinstance(i, int | np.integer) or not -k <= i < k:
        raise IndexError(f"member index {i!r} is out of range for a population of {k}")
    return jax.tree.map(lambda x: x[i], states)


def stack_members(members: Sequence[TrainState]) -> TrainState:
    """The population made of ordinary states (inverse of :func:`select_member`).

    All members must share ``model``, ``tx`` and ``input_shape`` (the tree structure).
    """
    members = list(members)
    if not members:
        raise ValueError("stack_members got no states")
    structure = jax.tree.structure(members[0])
    for i, member in enumerate(members[1:], 1):
        if jax.tree.structure(member) != structure:
            raise ValueError(
                f"member {i} has a different model, optimizer, input shape or parameter "
                "tree than member 0; a population shares all of them"
            )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *members)
