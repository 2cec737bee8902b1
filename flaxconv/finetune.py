"""Fine-tuning: train some layers of a model and keep the others exactly as they were.

The recipe of the seed notebooks (and of Keras's transfer-learning guide), as functions:

>>> state = fc.create_train_state(key, fc.models.get("dlwp_mnist", num_classes=24), tx, x)
>>> state = fc.checkpoint.restore_params("runs/mnist_convnet", state, include=("conv_*",))
>>> pretrained = jax.device_get(state)     # a host copy: fit donates (frees) the state's arrays
>>> base = ("conv_*",)                                     # the pretrained layers
>>> state = fc.finetune.freeze_state(state, fc.optim.make("rmsprop", 1e-3), base)
>>> state, _ = fc.fit(state, data, epochs=2)               # 1. the new head only
>>> state = fc.finetune.freeze_state(state, fc.optim.make("rmsprop", 1e-5), ("conv_0", "conv_1"))
>>> state, _ = fc.fit(state, data, epochs=2)               # 2. head + top conv block, low lr
>>> fc.finetune.changed_layers(pretrained, state)          # -> ['conv_2', 'head']

A frozen layer gets no update and no optimizer state (:func:`flaxconv.optim.freeze`); a
frozen BatchNorm layer also runs in inference mode, so it normalizes with the statistics
it was pretrained with and never updates them. Freezing a BatchNorm layer in the second
phase too (``"bn_*"`` in both pattern lists) keeps its statistics for good, as Keras
advises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from flaxconv import optim
from flaxconv.state import TrainState


def freeze_state(
    state: TrainState, tx: optax.GradientTransformation, frozen: str | Sequence[str] = ()
) -> TrainState:
    """``state`` set up to train all but the ``frozen`` layers with ``tx``.

    Args:
      state: a train state (e.g. with pretrained layers from
        :func:`flaxconv.checkpoint.restore_params`).
      tx: the optimizer for the trainable parameters (any Optax optimizer).
      frozen: layer-name patterns (``fnmatch`` on the layer path, see
        :func:`flaxconv.optim.layer_mask`); ``()`` trains everything.

    Returns:
      ``state`` with ``tx`` wrapped by :func:`flaxconv.optim.freeze`, a fresh optimizer
      state (moments for the trainable parameters only; ``step`` is kept), and a model
      whose frozen BatchNorm layers run in inference mode (its ``frozen_batch_norm``
      field, as on :class:`flaxconv.models.ConvStack` and
      :class:`flaxconv.nnx_model.NNXModel`). Params and batch_stats are the same arrays.

    Raises:
      ValueError: a pattern matches no parameter (the message lists the layers), or
        BatchNorm layers are frozen in a model without a ``frozen_batch_norm`` field.
    """
    frozen = (frozen,) if isinstance(frozen, str) else tuple(frozen)
    if frozen:
        optim.layer_mask(state.params, frozen, "frozen")  # fail now, not at tx.init
        tx = optim.freeze(tx, frozen)
    frozen_bn = _frozen_batch_norm(state.batch_stats, frozen)
    model = state.model
    if hasattr(model, "frozen_batch_norm"):
        model = model.clone(frozen_batch_norm=frozen_bn)
    elif frozen_bn:
        raise ValueError(
            f"freezing BatchNorm layers {list(frozen_bn)} needs a model with a "
            f"frozen_batch_norm field (like flaxconv.models.ConvStack) to run them in "
            f"inference mode; {type(model).__name__} has none"
        )
    return state.replace(model=model, tx=tx, opt_state=tx.init(state.params))


def _frozen_batch_norm(batch_stats: Any, frozen: tuple[str, ...]) -> tuple[str, ...]:
    """The layers of ``batch_stats`` that a ``frozen`` pattern matches, in tree order."""
    if not frozen or not jax.tree.leaves(batch_stats):
        return ()
    mask = traverse_util.flatten_dict(optim.layer_mask(batch_stats, frozen, strict=False))
    # map(str): an NNX model's list items are int keys.
    return tuple(dict.fromkeys("/".join(map(str, path[:-1])) for path, hit in mask.items() if hit))


def copy_layers(
    source: TrainState | Any, target: TrainState, include: str | Sequence[str] = ("*",)
) -> TrainState:
    """``target`` with the params and batch_stats of the ``include`` layers from ``source``.

    The in-memory twin of :func:`flaxconv.checkpoint.restore_params`: put a trained
    backbone under a new head, e.g. ``copy_layers(mnist_state, sign_state, ("conv_*",))``.

    Args:
      source: a TrainState, or a ``{"params": ..., "batch_stats": ...}`` dict of arrays.
      target: the state to update; its optimizer state is left as it is.
      include: layer-name patterns (see :func:`flaxconv.optim.layer_mask`) over the
        target's layers.

    Returns:
      ``target`` with those arrays replaced (cast to the target's dtype and placement).

    Raises:
      ValueError: a pattern matches no layer of ``target`` (listing its layers); an
        included layer that only one of the two has; arrays of different shapes, each named
        with both shapes.
    """
    paths = transfer_plan(source, target, include, source_name="source")
    flat = flat_variables(source)
    return replace_arrays(target, {p: flat[p] for p in paths})


def transfer_plan(
    source: TrainState | Any,
    target: TrainState,
    include: str | Sequence[str],
    source_name: str = "source",
) -> list[tuple[str, ...]]:
    """The ``(collection, layer..., name)`` paths to copy from ``source`` into ``target``.

    ``source`` leaves only need a ``.shape`` (arrays, ``jax.ShapeDtypeStruct``s or Orbax
    array metadata), so a checkpoint can be checked before anything is read.

    Raises:
      ValueError: see :func:`copy_layers`; ``source_name`` names the source in messages.
    """
    include = (include,) if isinstance(include, str) else tuple(include)
    optim.layer_mask(target.params, include, "include")  # every pattern must match
    wanted, selected = _included(target, include)
    flat, source_selected = _included(source, include)

    problems = []
    missing = ["/".join(p) for p in selected if p not in flat]
    if missing:
        layers = sorted({"/".join(p[1:-1]) for p in flat})
        problems.append(f"{missing} are not there (its layers: {layers})")
    extra = ["/".join(p) for p in source_selected if p not in wanted]
    if extra:
        problems.append(f"{extra} match include but are not in the model")
    for p in selected:
        if p in flat and tuple(flat[p].shape) != tuple(np.shape(wanted[p])):
            problems.append(
                f"{'/'.join(p)} has shape {tuple(flat[p].shape)} there but "
                f"{tuple(np.shape(wanted[p]))} in the model"
            )
    if problems:
        raise ValueError(
            f"cannot copy layers {list(include)} from the {source_name}: "
            + "; ".join(problems)
            + "; choose the layers to copy with include"
        )
    return selected


def _included(tree: TrainState | Any, include: tuple[str, ...]):
    """``(flat_variables(tree), the paths of it that the layer patterns include)``."""
    flat = flat_variables(tree)
    masks = {
        collection: traverse_util.flatten_dict(
            optim.layer_mask(_collection(tree, collection), include, strict=False)
        )
        for collection in ("params", "batch_stats")
    }
    return flat, [p for p in flat if masks[p[0]].get(p[1:], False)]


def _collection(tree: TrainState | Any, collection: str) -> Any:
    if isinstance(tree, TrainState):
        return getattr(tree, collection)
    return tree.get(collection) or {}


def replace_arrays(target: TrainState, arrays: dict[tuple[str, ...], Any]) -> TrainState:
    """``target`` with the leaves at ``arrays``' paths (as :func:`flat_variables` names them)
    replaced, each cast to the old leaf's dtype and put on its sharding."""
    new = {}
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(getattr(target, collection))
        if not flat:
            continue
        for path, old in flat.items():
            value = arrays.get((collection, *path))
            if value is not None:
                value = jnp.asarray(value, old.dtype)
                flat[path] = jax.device_put(value, getattr(old, "sharding", None))
        new[collection] = traverse_util.unflatten_dict(flat)
    return target.replace(**new)


def changed_layers(before: TrainState | Any, after: TrainState | Any) -> list[str]:
    """The layers whose params or batch_stats differ bit for bit between two states.

    Compares the raw bytes of every leaf (so ``-0.0`` differs from ``0.0`` and a NaN equals
    itself); a layer present in one state only counts as changed.

    Args:
      before, after: TrainStates, or ``{"params": ..., "batch_stats": ...}`` dicts.

    Returns:
      Layer paths (``"conv_0"``, ``"bn_0"``, ``"head"``), sorted.
    """
    a, b = flat_variables(before), flat_variables(after)
    changed = set()
    for path in a.keys() | b.keys():
        if path not in a or path not in b or not _same_bits(a[path], b[path]):
            changed.add("/".join(path[1:-1]))
    return sorted(changed)


def flat_variables(state: TrainState | Any) -> dict[tuple[str, ...], Any]:
    """``{("params" | "batch_stats", layer..., name): array}`` of a state or variables dict.

    Raises:
      TypeError: ``state`` is neither a TrainState nor a dict of those collections.
    """
    if isinstance(state, TrainState):
        state = {"params": state.params, "batch_stats": state.batch_stats}
    if not hasattr(state, "keys") or not set(state.keys()) <= {"params", "batch_stats"}:
        got = sorted(state.keys()) if hasattr(state, "keys") else type(state).__name__
        raise TypeError(
            f"expected a TrainState or a {{'params': ..., 'batch_stats': ...}} dict; got {got}"
        )
    return traverse_util.flatten_dict(state)


def _same_bits(x: Any, y: Any) -> bool:
    x, y = np.asarray(x), np.asarray(y)
    return x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()


__all__ = [
    "changed_layers",
    "copy_layers",
    "flat_variables",
    "freeze_state",
    "replace_arrays",
    "transfer_plan",
]
