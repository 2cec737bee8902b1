"""``TrainState``: everything a training step reads and writes, as one pytree.

A model is a ``flax.linen`` module or a ``flax.nnx`` module. A linen module is the state's
``model`` as it is; its ``params`` and ``batch_stats`` collections come from ``init``. An
NNX module is split once, as Flax's functional API does (``nnx.split``): the static
``GraphDef`` goes into an :class:`NNXModel`, the state's ``model``, and its variables
become plain nested dicts of arrays (``nnx.to_pure_dict``) in ``params`` (every
``nnx.Param``) and ``batch_stats`` (every other variable but the RNG state: BatchNorm's
``nnx.BatchStat`` and any variable of the user's own). Every step merges them back into a
fresh module (``nnx.merge``) inside the traced function, so the state stays a pytree of
arrays that ``jit``/``vmap``/``scan``/Orbax/shardings take as they are, and a step is a
pure function of its inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from flaxconv.kernels import policy_name


@dataclasses.dataclass(frozen=True, repr=False)
class NNXModel:
    """The static half of an NNX module split by :func:`split_nnx`: what ``state.model``
    holds for NNX models. Hashable, so it is static in the state's tree structure.

    :meth:`apply` has the signature of linen's ``Module.apply`` that the steps use, so every
    step, evaluation, population and feature-map function calls both kinds of model alike.

    Randomness: step ``t``'s ``rngs`` (``TrainState.step_rngs``: ``dropout`` and
    ``augment`` keys) become ``step = nnx.Rngs(**rngs)``. The module's own RNG streams
    (e.g. an ``nnx.Dropout(..., rngs=rngs)``'s) are reseeded from it with ``nnx.reseed``,
    one draw per stream name (a name other than ``dropout``/``augment``, such as
    ``default``, draws from ``step.dropout``), and a ``__call__`` that takes an ``rngs``
    argument gets ``step`` itself in training. So no hidden counter advances from one step
    to the next: same state, same masks.

    Attributes:
      graphdef: the module's ``nnx.GraphDef``.
      rng_leaves: ``(path, is_key, shape)`` of each ``nnx.RngState`` leaf (stream keys and
        counts); their values are not kept, since every call reseeds them.
      rng_tags: the names of the module's RNG streams, sorted.
      call_takes_rngs: whether the module's ``__call__`` has an ``rngs`` parameter.
      frozen_batch_norm: ``/``-joined paths of modules that run in inference mode even in
        training (``use_running_average=True``); set by :func:`flaxconv.finetune.freeze`.
    """

    graphdef: Any
    rng_leaves: tuple[tuple[tuple[Any, ...], bool, tuple[int, ...]], ...] = ()
    rng_tags: tuple[str, ...] = ()
    call_takes_rngs: bool = False
    frozen_batch_norm: tuple[str, ...] = ()

    @property
    def module_type(self) -> type:
        """The class of the split module (e.g. the user's ``CNN``)."""
        return self.graphdef.nodes[0].type

    def clone(self, **changes: Any) -> NNXModel:
        """A copy with ``changes`` to its fields (linen's ``Module.clone``)."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        # The module's classes and static attributes (kernel sizes, rates, ...) in graph
        # order: what fit compares to resume a workdir, so stable across processes (no
        # addresses of the functions the graphdef holds).
        types = [node.type.__name__ for node in self.graphdef.nodes
                 if isinstance(node, nnx.graphlib.NodeDef)
                 and issubclass(node.type, nnx.Module)]
        static = ", ".join(
            f"{key}={attr.value!r}" for key, attr in self.graphdef.attributes
            if isinstance(attr, nnx.graphlib.Static) and not str(key).startswith("_")
        )
        text = (f"NNXModel({self.module_type.__qualname__}, modules={types}, "
                f"frozen_batch_norm={self.frozen_batch_norm}, static=[{static}])")
        return re.sub(r" at 0x[0-9a-fA-F]+", "", text)

    def merge(self, params: Any, batch_stats: Any = None, *, train: bool = False,
              rngs: dict[str, jax.Array] | None = None) -> nnx.Module:
        """A new module with these variables, in training (``model.train()``) or inference
        (``model.eval()``) mode, its RNG streams reseeded from ``rngs`` (see the class).

        ``params``/``batch_stats``: nested dicts of arrays as in the state. Without
        ``rngs`` the streams keep a fixed key: NNX's inference mode draws no random numbers.
        ``state.model.merge(state.params, state.batch_stats)`` is the trained module, for
        use outside flaxconv. Inside a trace it is a pure function of the arrays.
        """
        step = None if rngs is None else nnx.Rngs(**rngs)
        return self._merge(params, batch_stats, train, rngs, step)

    def _merge(self, params, batch_stats, train, rngs, step):
        module = nnx.merge(self.graphdef, params, batch_stats or {}, self._rng_placeholders())
        if train:
            module.train()
        else:
            module.eval()
        if train and self.frozen_batch_norm:
            frozen = set(self.frozen_batch_norm)
            module.set_attributes(
                lambda path, _: "/".join(map(str, path)) in frozen,
                use_running_average=True, raise_if_not_found=False,
            )
        if step is not None and self.rng_tags:
            nnx.reseed(module, policy="match_shape", **{
                tag: step[tag if tag in rngs else "dropout"]() for tag in self.rng_tags
            })
        return module

    def _rng_placeholders(self) -> dict[Any, Any]:
        # nnx.merge needs a value for every variable; these are overwritten by the reseed.
        flat = {
            path: (jnp.broadcast_to(jax.random.key(0), shape) if is_key
                   else jnp.zeros(shape, jnp.uint32))
            for path, is_key, shape in self.rng_leaves
        }
        return nnx.traversals.unflatten_mapping(flat)

    def apply(self, variables: dict[str, Any], images: jax.Array, *, train: bool,
              rngs: dict[str, jax.Array] | None = None, mutable: Any = False,
              capture: tuple[str, ...] = ()) -> Any:
        """The module's forward pass as a pure function of arrays, like linen's ``apply``.

        Args:
          variables: ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` optional).
          images: float ``[B, H, W, C]``.
          train: training (``model.train()``) or inference (``model.eval()``) mode.
          rngs: the step's named keys (see the class); None in inference.
          mutable: truthy: also return the variables the pass updated (BatchNorm's running
            statistics in training) as ``{"batch_stats": ...}``, structured as the input's.
          capture: names of layers (see :func:`call_layers`) whose outputs to return too,
            as ``{"intermediates": {name: output of its first call}}``.

        Returns:
          ``logits``, or ``(logits, updates)`` when ``mutable`` or ``capture`` is set.
        """
        stats = variables.get("batch_stats", {})
        step = None if rngs is None else nnx.Rngs(**rngs)
        module = self._merge(variables["params"], stats, train, rngs, step)
        # The streams' reseed drew from `step` first, so a call-time Dropout gets new keys.
        kwargs = {"rngs": step} if train and step is not None and self.call_takes_rngs else {}
        updates: dict[str, Any] = {}
        if capture:
            logits, layers = call_layers(module, images, **kwargs)
            first: dict[str, Any] = {}
            for name, _, out in layers:
                first.setdefault(name, out)
            updates["intermediates"] = {name: first[name] for name in capture}
        else:
            logits = module(images, **kwargs)
        if mutable:
            now = dict(nnx.to_flat_state(nnx.state(module)))
            updates["batch_stats"] = nnx.traversals.unflatten_mapping({
                path: now[path].get_value() for path in nnx.traversals.flatten_mapping(stats)
            })
        return (logits, updates) if (mutable or capture) else logits


def split_nnx(module: nnx.Module) -> tuple[NNXModel, dict[str, Any], dict[str, Any]]:
    """``(NNXModel, params, batch_stats)`` of an NNX module, split once with ``nnx.split``.

    ``params`` holds every ``nnx.Param``, ``batch_stats`` every other variable except the
    RNG state (``nnx.RngState``, which each call reseeds), both as nested dicts of arrays
    keyed by attribute names (list items by int). The module itself is not changed, and
    its current train/eval mode does not matter.
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"expected a flax.nnx.Module; got {type(module).__name__}")
    # A twin (new module objects, the same variables) set to eval(), so the graphdef does
    # not depend on the mode the module was left in: each call sets the mode anyway.
    twin = nnx.merge(*nnx.split(module))
    twin.eval()
    graphdef, params, rng_state, batch_stats = nnx.split(twin, nnx.Param, nnx.RngState, ...)
    rng_flat = list(nnx.to_flat_state(rng_state))
    takes_rngs = callable(module) and "rngs" in inspect.signature(module).parameters
    model = NNXModel(
        graphdef=graphdef,
        rng_leaves=tuple(
            (tuple(path), isinstance(var, nnx.RngKey), tuple(np.shape(var.get_value())))
            for path, var in rng_flat
        ),
        rng_tags=tuple(sorted({var.tag for _, var in rng_flat})),
        call_takes_rngs=takes_rngs,
    )
    return model, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def call_layers(module: nnx.Module, images: jax.Array, **kwargs: Any
                ) -> tuple[Any, list[tuple[str, str, Any]]]:
    """``module(images, **kwargs)`` and its layers' outputs: ``(logits, [(name, type,
    output), ...])`` in call order.

    A layer is a submodule called while no other submodule (only the root) is running:
    the root's own layers, as in a Keras summary. ``name`` is its attribute path joined by
    ``/`` (``"conv1"``, ``"blocks/0"``), ``type`` its class name; a layer called twice is
    listed twice. Functions such as ``nnx.max_pool`` are not modules and are not listed.

    The calls are seen by wrapping ``__call__`` of the module classes while ``module``
    runs (as ``nnx.capture`` does for its method outputs), so it is not thread-safe; it is
    for summaries and feature maps, never for the training steps.
    """
    paths: dict[int, tuple[Any, ...]] = {}
    for path, sub in nnx.iter_modules(module):
        paths.setdefault(id(sub), tuple(path))
    layers: list[tuple[str, str, Any]] = []
    running: list[int] = []  # ids of the submodules being called, outermost first

    def wrap(original):
        @functools.wraps(original)
        def recorded(self, *args, **kw):
            path = paths.get(id(self))
            if not path or id(self) in running:  # the root, another module, or super()
                return original(self, *args, **kw)
            top = not running
            running.append(id(self))
            try:
                out = original(self, *args, **kw)
            finally:
                running.pop()
            if top:
                layers.append(("/".join(map(str, path)), type(self).__name__, out))
            return out
        return recorded

    classes = {}
    for _, sub in nnx.iter_modules(module):
        owner = next((c for c in type(sub).__mro__ if "__call__" in vars(c)), None)
        if owner is not None and owner not in classes:
            classes[owner] = vars(owner)["__call__"]
    with contextlib.ExitStack() as restore:
        for owner, original in classes.items():
            owner.__call__ = wrap(original)
            restore.callback(setattr, owner, "__call__", original)
        logits = module(images, **kwargs)
    return logits, layers


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
