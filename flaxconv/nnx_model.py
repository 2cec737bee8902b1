"""NNX modules as pure functions of arrays: :func:`split_nnx` splits a ``flax.nnx`` module
once, as Flax's functional API does (``nnx.split``). The static ``GraphDef`` goes into an
:class:`NNXModel`, which a :class:`~flaxconv.state.TrainState` holds as its ``model``, and
the variables become plain nested dicts of arrays (``nnx.to_pure_dict``): ``params`` (every
``nnx.Param``) and ``batch_stats`` (every other variable but the RNG state: BatchNorm's
``nnx.BatchStat`` and any variable of the user's own). :meth:`NNXModel.apply` merges them
back into a fresh module (``nnx.merge``) inside the traced function, with the signature of
linen's ``Module.apply``, so every step, evaluation, population and feature-map function
calls both kinds of model alike, and a step stays a pure function of its inputs.
:func:`call_layers` runs a module and records its layers' outputs (summaries, feature maps);
:func:`call_named` runs it with each layer's operations named by its path (``explain_kernels``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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
              capture: tuple[str, ...] = (), name_layers: bool = False) -> Any:
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
          name_layers: trace each layer inside a ``jax.named_scope`` of its path (see
            :func:`call_named`), for introspection only.

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
        elif name_layers:
            logits = call_named(module, images, **kwargs)
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


@contextlib.contextmanager
def _submodule_calls(module: nnx.Module,
                     around: Callable[[tuple[Any, ...], tuple[Any, ...] | None, Any, Callable],
                                      Any]) -> Iterator[None]:
    """While active, each call of a submodule of ``module`` (not the root) returns
    ``around(path, parent, submodule, call)``: ``path`` its attribute path, ``parent`` the
    path of the submodule whose call it is inside (None at the top), ``call()`` the call
    itself. A submodule's call from inside its own (``super().__call__``) is not seen again.

    It wraps ``__call__`` of the module classes, as ``nnx.capture`` does for its method
    outputs, so it is not thread-safe: for summaries, feature maps and
    ``explain_kernels``, never for the training steps.
    """
    paths: dict[int, tuple[Any, ...]] = {}
    for path, sub in nnx.iter_modules(module):
        paths.setdefault(id(sub), tuple(path))
    running: list[tuple[int, tuple[Any, ...]]] = []  # (id, path), outermost first

    def wrap(original):
        @functools.wraps(original)
        def wrapped(self, *args, **kw):
            path = paths.get(id(self))
            if not path or any(id(self) == i for i, _ in running):  # root, other, super()
                return original(self, *args, **kw)
            parent = running[-1][1] if running else None
            running.append((id(self), path))
            try:
                return around(path, parent, self, lambda: original(self, *args, **kw))
            finally:
                running.pop()
        return wrapped

    classes = {}
    for _, sub in nnx.iter_modules(module):
        owner = next((c for c in type(sub).__mro__ if "__call__" in vars(c)), None)
        if owner is not None and owner not in classes:
            classes[owner] = vars(owner)["__call__"]
    with contextlib.ExitStack() as restore:
        for owner, original in classes.items():
            owner.__call__ = wrap(original)
            restore.callback(setattr, owner, "__call__", original)
        yield


def call_layers(module: nnx.Module, images: jax.Array, **kwargs: Any
                ) -> tuple[Any, list[tuple[str, str, Any]]]:
    """``module(images, **kwargs)`` and its layers' outputs: ``(logits, [(name, type,
    output), ...])`` in call order.

    A layer is a submodule called while no other submodule (only the root) is running:
    the root's own layers, as in a Keras summary. ``name`` is its attribute path joined by
    ``/`` (``"conv1"``, ``"blocks/0"``), ``type`` its class name; a layer called twice is
    listed twice. Functions such as ``nnx.max_pool`` are not modules and are not listed.
    Not thread-safe (see :func:`_submodule_calls`): for summaries and feature maps.
    """
    layers: list[tuple[str, str, Any]] = []

    def record(path, parent, sub, call):
        out = call()
        if parent is None:
            layers.append(("/".join(map(str, path)), type(sub).__name__, out))
        return out

    with _submodule_calls(module, record):
        logits = module(images, **kwargs)
    return logits, layers


def call_named(module: nnx.Module, images: jax.Array, **kwargs: Any) -> Any:
    """``module(images, **kwargs)`` inside a ``jax.named_scope`` of its class name, and
    each submodule's call inside one of its attribute path (``CNN/convs/0``,
    ``CNN/block/conv1``), so that a trace's operations name their layer as linen's do
    (``CNN/Conv_0``). For :func:`flaxconv.steps.explain_kernels`; not thread-safe (see
    :func:`_submodule_calls`).
    """
    def named(path, parent, sub, call):
        if parent is not None and path[:len(parent)] == parent:
            path = path[len(parent):]  # inside its parent's scope already
        with jax.named_scope("/".join(map(str, path))):
            return call()

    with _submodule_calls(module, named), jax.named_scope(type(module).__name__):
        return module(images, **kwargs)
