"""``TrainState``: everything a training step reads and writes, as one pytree."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from flaxconv.kernels import policy_name


class TrainState(struct.PyTreeNode):
    """The whole training state; a pytree, so it jits, vmaps, scans, shards and checkpoints.

    Attributes:
      step: ``int32[]`` number of optimizer updates applied so far.
      params: the model's ``params`` collection.
      batch_stats: the ``batch_stats`` collection (``{}`` for models without BatchNorm).
      opt_state: the Optax optimizer state.
      rng: ``uint32[2]`` raw key data; step ``t``'s randomness (dropout, augmentation) is
        ``fold_in(rng, t)``, so a step is a pure function of its inputs.
      model: the linen module (static: part of the tree structure, not a leaf).
      tx: the Optax optimizer (static).
      input_shape: ``(H, W, C)`` the model was built for (static); batches are checked
        against it when a step is traced.
      kernels: which formulations compute the model's convolutions and pools in every step
        (static; :mod:`flaxconv.kernels`): ``"auto"`` (the fastest measured on the backend
        the step is traced for), ``"xla"`` (opt out: XLA's own operations), or a backend's
        table, ``"cpu"``/``"gpu"``. ``state.replace(kernels="xla")`` switches a state over;
        being static, it retraces the steps rather than reusing a compiled one.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    model: nn.Module = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    input_shape: tuple[int, ...] = struct.field(pytree_node=False)
    kernels: str = struct.field(pytree_node=False, default="auto")

    def variables(self, params: Any = None) -> dict[str, Any]:
        """The variables dict for ``model.apply`` (``params`` overrides the state's)."""
        variables = {"params": self.params if params is None else params}
        if self.batch_stats:
            variables["batch_stats"] = self.batch_stats
        return variables

    def step_rngs(self) -> dict[str, jax.Array]:
        """The named rngs of the current step: ``dropout`` and ``augment``."""
        key = jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
        dropout, augment = jax.random.split(key)
        return {"dropout": dropout, "augment": augment}


def create_train_state(
    key: jax.Array,
    model: nn.Module,
    tx: optax.GradientTransformation,
    sample_input: Any,
    *,
    kernels: str | None = None,
) -> TrainState:
    """Initializes ``model`` and ``tx`` into a :class:`TrainState`.

    Args:
      key: a ``jax.random.key`` (or legacy ``PRNGKey``); split into the init key and the
        state's training rng.
      model: a linen module called as ``model(x, train=bool)`` that returns logits.
      tx: an Optax optimizer (e.g. from ``flaxconv.optim.make``).
      sample_input: an array (or anything with ``.shape``) of shape ``[N, H, W, C]``;
        only its shape is used. uint8 images are fine.
      kernels: the state's :attr:`TrainState.kernels`; None reads the environment variable
        ``FLAXCONV_KERNELS`` (default ``"auto"``).

    Returns:
      A state at step 0. Deterministic in ``key``.
    """
    shape = tuple(np.shape(sample_input))
    if len(shape) != 4:
        raise ValueError(f"sample_input has shape {shape}; expected [N, H, W, C]")
    kernels = policy_name(kernels)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    init_key, train_key = jax.random.split(key)
    variables = _init_variables(model, init_key, shape[1:])
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.key_data(train_key),
        model=model,
        tx=tx,
        input_shape=shape[1:],
        kernels=kernels,
    )


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_variables(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]):
    # Jitted once per (model, input shape): modules are hashable dataclasses.
    return model.init({"params": key}, jnp.zeros((1, *input_shape), jnp.float32), train=False)


def num_params(params: Any) -> int:
    """Total number of scalars in a parameter tree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
