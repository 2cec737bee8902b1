"""``TrainState``: everything a training step reads and writes, as one pytree.

A model is a ``flax.linen`` module or a ``flax.nnx`` module. A linen module is the state's
``model`` as it is; its ``params`` and ``batch_stats`` collections come from ``init``. An
NNX module is split once (:mod:`flaxconv.nnx_model`): the state's ``model`` is its static
:class:`~flaxconv.nnx_model.NNXModel`, and its variables are nested dicts of arrays in
``params`` and ``batch_stats``, merged back into a module inside every step. So the state
stays a pytree of arrays that ``jit``/``vmap``/``scan``/Orbax/shardings take as they are,
and a step is a pure function of its inputs.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from flaxconv.kernels import policy_name
from flaxconv.nnx_model import NNXModel, call_layers, split_nnx  # noqa: F401 - re-exported


class TrainState(struct.PyTreeNode):
    """The whole training state; a pytree, so it jits, vmaps, scans, shards and checkpoints.

    Attributes:
      step: ``int32[]`` number of optimizer updates applied so far.
      params: the model's ``params`` collection (linen), or its ``nnx.Param`` values as
        nested dicts of arrays (NNX, :func:`split_nnx`).
      batch_stats: the ``batch_stats`` collection (linen), or every other NNX variable
        but the RNG state (``nnx.BatchStat`` ...); ``{}`` for models without BatchNorm.
      opt_state: the Optax optimizer state.
      rng: ``uint32[2]`` raw key data; step ``t``'s randomness (dropout, augmentation) is
        ``fold_in(rng, t)``, so a step is a pure function of its inputs.
      model: the linen module, or the :class:`NNXModel` of an NNX module (static: part
        of the tree structure, not a leaf). Both have ``apply(variables, images, *,
        train, rngs=None, mutable=False)``, which is how the steps call them.
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
    model: nn.Module | NNXModel = struct.field(pytree_node=False)
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
    model: nn.Module | nnx.Module | Any,
    tx: optax.GradientTransformation,
    sample_input: Any,
    *,
    kernels: str | None = None,
) -> TrainState:
    """Initializes ``model`` and ``tx`` into a :class:`TrainState`.

    Args:
      key: a ``jax.random.key`` (or legacy ``PRNGKey``); split into the init key and the
        state's training rng.
      model: a model that returns logits, one of
        - a linen module called as ``model(x, train=bool)``; ``init`` gets the init key;
        - an NNX module called as ``model(x)`` (optionally ``model(x, rngs=...)``), whose
          training and inference modes are NNX's ``model.train()``/``model.eval()``.
          Its variables are taken as they are (NNX initializes at construction), split
          once by :func:`split_nnx` and copied; the module is left unchanged;
        - a function ``rngs -> nnx.Module``, e.g. the NNX class itself or a
          ``functools.partial`` of it, called as ``model(rngs=nnx.Rngs(init_key))``: the
          NNX counterpart of ``init``, which :func:`flaxconv.create_population` needs to
          give each member its own initialization.
      tx: an Optax optimizer (e.g. from ``flaxconv.optim.make``).
      sample_input: an array (or anything with ``.shape``) of shape ``[N, H, W, C]``;
        only its shape is used. uint8 images are fine.
      kernels: the state's :attr:`TrainState.kernels`; None reads the environment variable
        ``FLAXCONV_KERNELS`` (default ``"auto"``).

    Returns:
      A state at step 0. Deterministic in ``key`` (for an NNX module instance: in ``key``
      and the module).
    """
    shape = tuple(np.shape(sample_input))
    if len(shape) != 4:
        raise ValueError(f"sample_input has shape {shape}; expected [N, H, W, C]")
    kernels = policy_name(kernels)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    init_key, train_key = jax.random.split(key)
    if isinstance(model, nn.Module):
        variables = _init_variables(model, init_key, shape[1:])
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
    else:
        model, params, batch_stats = split_nnx(_nnx_module(model, init_key))
        # Copies: fc.fit donates the state's buffers, which must not be the module's.
        params, batch_stats = jax.tree.map(jnp.copy, (params, batch_stats))
        # One abstract pass, as linen's init makes: a wrong input shape fails here.
        x = jax.ShapeDtypeStruct((1, *shape[1:]), jnp.float32)
        jax.eval_shape(functools.partial(model.apply, train=False),
                       {"params": params, "batch_stats": batch_stats}, x)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        # One compiled program instead of an eager op (and its compile) per leaf.
        opt_state=_jit_once(tx.init)(params),
        rng=jax.random.key_data(train_key),
        model=model,
        tx=tx,
        input_shape=shape[1:],
        kernels=kernels,
    )


def _nnx_module(model: Any, key: jax.Array) -> nnx.Module:
    """``model`` if it is an NNX module, else ``model(rngs=nnx.Rngs(key))`` checked to be one."""
    if isinstance(model, nnx.Module):
        return model
    if not callable(model):
        raise TypeError(
            f"model is a {type(model).__name__}; expected a flax.linen Module, a flax.nnx "
            "Module or a function rngs -> nnx.Module"
        )
    module = model(rngs=nnx.Rngs(key))
    if not isinstance(module, nnx.Module):
        raise TypeError(
            f"model(rngs=...) returned a {type(module).__name__}; expected a flax.nnx Module"
        )
    return module


#: XLA options for the programs that run once per state (initialization): on CPU, XLA's
#: backend optimizations take about 1 s to compile a convnet's init and save microseconds
#: of its run. Known to jaxlib 0.10 through 0.12; ``tests/test_steps.py`` fails when the
#: installed jaxlib no longer accepts them (then initialization compiles as usual).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _jit_once(fn, **jit_kwargs):
    """``jax.jit(fn)`` compiled with :data:`INIT_COMPILER_OPTIONS` on CPU; an XLA that
    refuses them gets the plain ``jax.jit(fn)``. Each form keeps jit's own cache."""
    fast = jax.jit(fn, compiler_options=INIT_COMPILER_OPTIONS, **jit_kwargs)
    plain = jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args):
        if jax.default_backend() != "cpu":
            return plain(*args)
        try:
            return fast(*args)
        except Exception as error:  # noqa: BLE001 - only the options' own refusal is ours
            if not any(option in str(error) for option in INIT_COMPILER_OPTIONS):
                raise
            return plain(*args)

    return call


def _init_variables_fn(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]):
    # Jitted once per (model, input shape): modules are hashable dataclasses. A "dropout"
    # stream too, for NNX modules bridged by nnx.bridge.to_linen whose nnx.Dropout takes its
    # rngs at construction; linen's params do not depend on it.
    rngs = {"params": key, "dropout": key}
    return model.init(rngs, jnp.zeros((1, *input_shape), jnp.float32), train=False)


_init_variables = _jit_once(_init_variables_fn, static_argnums=(0, 2))


def num_params(params: Any) -> int:
    """Total number of scalars in a parameter tree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
