"""Inspection: a Keras-like model summary and training-curve plots (matplotlib, Agg)."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxconv.state import TrainState


def layer_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple]:
    """Rows ``(name, layer type, output shape, trainable params, non-trainable params)`` of
    the model's direct submodules, in call order, from one abstract (shape-only) pass."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    call_order: list[str] = []  # pytrees sort dict keys; record the order while tracing

    def forward(x):
        variables = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(
            variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        call_order.extend(state["intermediates"])
        return variables, state["intermediates"]

    variables, intermediates = jax.eval_shape(forward, x)
    params = variables.get("params", {})
    stats = variables.get("batch_stats", {})
    rows = []
    for name in call_order:
        if name == "__call__":
            continue
        out = intermediates[name]["__call__"][0]
        rows.append(
            (name, _layer_type(name), ("None", *out.shape[1:]),
             _count(params.get(name, {})), _count(stats.get(name, {})))
        )
    return rows


def _count(tree: Any) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


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


def summary(model: nn.Module | TrainState, input_shape: tuple[int, ...] | None = None) -> str:
    """Keras's ``model.summary()`` as a string: layer, output shape, params, and totals.

    Args:
      model: a linen module, or a TrainState (its model and input shape are used).
      input_shape: ``(H, W, C)``; taken from the state when a TrainState is given.
    """
    if isinstance(model, TrainState):
        model, input_shape = model.model, model.input_shape
    if input_shape is None:
        raise ValueError("summary needs input_shape=(H, W, C) for a bare module")
    rows = layer_table(model, tuple(input_shape))
    header = ("Layer (type)", "Output Shape", "Param #")
    lines = [
        (f"{n} ({t})", "(" + ", ".join(map(str, s)) + ")", f"{p + q:,}") for n, t, s, p, q in rows
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) + 2 for i in range(3)]
    rule = "─" * sum(widths)
    fmt = lambda r: f"{r[0]:<{widths[0]}}{r[1]:<{widths[1]}}{r[2]:>{widths[2]}}"  # noqa: E731
    trainable = sum(r[3] for r in rows)
    total = trainable + sum(r[4] for r in rows)
    out = [f'Model: "{type(model).__name__}"', rule, fmt(header), rule]
    out += [fmt(r) for r in lines]
    out += [
        rule,
        f" Total params: {total:,}",
        f" Trainable params: {trainable:,}",
        f" Non-trainable params: {total - trainable:,}",
        rule,
    ]
    return "\n".join(out)


def plot_history(history: dict[str, list[float]], path: str | os.PathLike) -> str:
    """Loss and accuracy curves (train vs validation, per epoch) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            values = history.get(key)
            if values:
                ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)
