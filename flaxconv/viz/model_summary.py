"""The model table: Keras's ``model.summary()`` and the rows behind it.

:func:`layer_table` lists a model's layers in call order, with output shapes and parameter
counts, from one abstract (shape-only) pass: no arrays are allocated and nothing is
compiled. :func:`summary` formats it as Keras does, with frozen layers (by layer-name
pattern, :func:`flaxconv.optim.layer_mask`) counted as non-trainable. No matplotlib here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxconv.nnx_model import NNXModel, call_layers, split_nnx
from flaxconv.optim.freezing import key_name, layer_mask
from flaxconv.state import TrainState


def layer_table(
    model: nn.Module | nnx.Module | TrainState, input_shape: tuple[int, ...] | None = None
) -> list[tuple]:
    """Rows ``(name, layer type, output shape, trainable params, non-trainable params)`` of
    the model's layers, in call order, from one abstract (shape-only) pass.

    A linen model's layers are its direct submodules (type from the name: ``conv_0`` is a
    ``Conv``); an NNX model's are the submodules its ``__call__`` calls directly
    (:func:`flaxconv.nnx_model.call_layers`: name ``"conv1"`` or ``"blocks/0"``, type the class
    name). Variables that no listed layer holds (e.g. all of an NNX module bridged to linen
    by ``nnx.bridge.to_linen``, whose inner layers linen does not see) get one row per
    top-level name with type and output shape None, so the rows always add up to the
    model's totals.

    Args:
      model: a linen module, an NNX module, or a TrainState (its model and input shape).
      input_shape: ``(H, W, C)``; needed for a bare module.
    """
    return _table(model, input_shape)[1]


def _table(model, input_shape):
    """``(model name, rows, params tree)``: see :func:`layer_table`; the params are arrays or
    ``jax.ShapeDtypeStruct``s."""
    if isinstance(model, TrainState):
        state, input_shape = model, model.input_shape
        if isinstance(state.model, NNXModel):
            return _nnx_table(state.model, state.params, state.batch_stats, input_shape)
        model = state.model
    if input_shape is None:
        raise ValueError("summary needs input_shape=(H, W, C) for a bare module")
    input_shape = tuple(input_shape)
    if isinstance(model, nnx.Module):
        return _nnx_table(*split_nnx(model), input_shape)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model is a {type(model).__name__}; expected a linen or NNX module or a TrainState"
        )
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    call_order: list[str] = []  # pytrees sort dict keys; record the order while tracing

    def forward(x):
        key = jax.random.key(0)  # "dropout" for bridged NNX modules, as create_train_state
        variables = model.init({"params": key, "dropout": key}, x, train=False)
        _, state = model.apply(
            variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        call_order.extend(state["intermediates"])
        return variables, state["intermediates"]

    variables, intermediates = jax.eval_shape(forward, x)
    params = variables.get("params", {})
    others = [v for k, v in variables.items() if k not in ("params", "intermediates")]
    layers = [
        (name, _layer_type(name), intermediates[name]["__call__"][0])
        for name in call_order if name != "__call__"
    ]
    return type(model).__name__, _rows(layers, params, others), params


def _nnx_table(model: NNXModel, params, batch_stats, input_shape):
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    found: list[tuple[str, str]] = []

    def forward(variables, x):
        module = model.merge(variables["params"], variables["batch_stats"])
        _, layers = call_layers(module, x)
        found.extend((name, kind) for name, kind, _ in layers)
        return [out for _, _, out in layers]

    outs = jax.eval_shape(forward, {"params": params, "batch_stats": batch_stats}, x)
    first: dict[str, tuple[str, Any]] = {}
    for (name, kind), out in zip(found, outs, strict=True):
        first.setdefault(name, (kind, out))  # a layer called twice is one row
    layers = [(name, kind, out) for name, (kind, out) in first.items()]
    return model.module_type.__name__, _rows(layers, params, [batch_stats]), params


def _rows(layers: list[tuple[str, str, Any]], params: Any, others: list[Any]) -> list[tuple]:
    """Summary rows of ``layers`` (name, type, output), their variable counts, and one row
    per top-level name of the variables no layer holds."""
    trainable, fixed = _sizes(params), [_sizes(tree) for tree in others]
    rows = []
    for name, kind, out in layers:
        shape = ("None", *out.shape[1:]) if hasattr(out, "shape") else None
        rows.append((name, kind, shape, _total(trainable, name),
                     sum(_total(f, name) for f in fixed)))
    names = [name for name, _, _ in layers]
    rest: dict[str, list[int]] = {}
    for sizes, column in [(trainable, 0), *((f, 1) for f in fixed)]:
        for path, size in sizes.items():
            if not any(_under(path, name) for name in names):
                rest.setdefault(path.split("/")[0], [0, 0])[column] += size
    rows += [(name, None, None, p, q) for name, (p, q) in rest.items()]
    return rows


def _sizes(tree: Any) -> dict[str, int]:
    """``{"layer/.../leaf": number of scalars}`` of a variable tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(key_name(k) for k in path): int(np.prod(np.shape(leaf)))
            for path, leaf in leaves}


def _under(path: str, layer: str) -> bool:
    """Whether the ``/``-joined variable ``path`` belongs to ``layer``."""
    return path == layer or path.startswith(layer + "/")


def _total(sizes: dict[str, int], layer: str) -> int:
    return sum(size for path, size in sizes.items() if _under(path, layer))


def _layer_type(name: str) -> str:
    prefix = name.rsplit("_", 1)[0] if name[-1].isdigit() else name
    return {
        "conv": "Conv",
        "bn": "BatchNorm",
        "pool": "MaxPool",
        "flatten": "Flatten",
        "dense": "Dense",
        "head": "Dense",
        "dropout": "Dropout",
    }.get(prefix, prefix)


def summary(
    model: nn.Module | nnx.Module | TrainState,
    input_shape: tuple[int, ...] | None = None,
    *,
    frozen: str | Sequence[str] = (),
) -> str:
    """Keras's ``model.summary()`` as a string: layer, output shape, params, and totals.

    Args:
      model: a linen module (a bridged ``nnx.bridge.to_linen`` one too), an NNX module, or
        a TrainState (its model and input shape are used). See :func:`layer_table` for
        which layers are listed; the totals count every variable of the model.
      input_shape: ``(H, W, C)``; taken from the state when a TrainState is given.
      frozen: layer-name patterns of frozen layers (as given to
        :func:`flaxconv.finetune.freeze`); their parameters count as non-trainable, as in
        Keras. BatchNorm statistics (every non-parameter variable) always do.
    """
    name, rows, params = _table(model, input_shape)
    frozen_count = 0
    if frozen:
        mask = layer_mask(params, frozen, "frozen")
        frozen_count = sum(
            int(np.prod(leaf.shape))
            for leaf, hit in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)
            if hit
        )
    header = ("Layer (type)", "Output Shape", "Param #")
    lines = [
        (n if t is None else f"{n} ({t})",
         "?" if s is None else "(" + ", ".join(map(str, s)) + ")", f"{p + q:,}")
        for n, t, s, p, q in rows
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) + 2 for i in range(3)]
    rule = "─" * sum(widths)
    fmt = lambda r: f"{r[0]:<{widths[0]}}{r[1]:<{widths[1]}}{r[2]:>{widths[2]}}"  # noqa: E731
    total = sum(r[3] + r[4] for r in rows)
    trainable = sum(r[3] for r in rows) - frozen_count
    out = [f'Model: "{name}"', rule, fmt(header), rule]
    out += [fmt(r) for r in lines]
    out += [
        rule,
        f" Total params: {total:,}",
        f" Trainable params: {trainable:,}",
        f" Non-trainable params: {total - trainable:,}",
        rule,
    ]
    return "\n".join(out)
