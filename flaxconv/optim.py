"""The Optax optimizer factory, with Keras's option names and defaults.

>>> tx = flaxconv.optim.make("rmsprop", learning_rate=1e-3)       # Keras's RMSprop, exactly
>>> tx = flaxconv.optim.make("sgd", learning_rate=0.01, momentum=0.9, nesterov=True)
>>> tx = flaxconv.optim.make("adam", learning_rate=optax.cosine_decay_schedule(1e-3, 5000))

The learning rate is always injected into the optimizer state
(``optax.inject_hyperparams``): callbacks such as ReduceLROnPlateau and populations of
models with one learning rate each read and write it as
``opt_state.hyperparams["learning_rate"]`` without rebuilding the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Keras's option names and defaults per optimizer.
DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": dict(beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=None, nesterov=False),
    "rmsprop": dict(rho=0.9, momentum=0.0, epsilon=1e-7, centered=False, weight_decay=None),
    "sgd": dict(momentum=0.0, nesterov=False, weight_decay=None),
}
CLIP_OPTIONS = dict(clipnorm=None, global_clipnorm=None, clipvalue=None)


def names() -> tuple[str, ...]:
    """The optimizer names accepted by :func:`make`."""
    return tuple(DEFAULTS)


def _base(name: str, learning_rate: Any, o: dict[str, Any]) -> optax.GradientTransformation:
    if name == "rmsprop":
        # Keras adds epsilon inside the square root: lr * g / sqrt(v + eps).
        return optax.rmsprop(
            learning_rate,
            decay=o["rho"],
            eps=o["epsilon"],
            eps_in_sqrt=True,
            centered=o["centered"],
            momentum=o["momentum"] or None,
        )
    if name == "adam":
        # Keras's epsilon is the paper's "epsilon hat" (added to the uncorrected sqrt(v));
        # optax adds it to the bias-corrected one. They differ only in the first steps.
        if o["weight_decay"]:
            return optax.adamw(
                learning_rate, o["beta_1"], o["beta_2"], o["epsilon"],
                weight_decay=o["weight_decay"], nesterov=o["nesterov"],
            )
        return optax.adam(
            learning_rate, o["beta_1"], o["beta_2"], o["epsilon"], nesterov=o["nesterov"]
        )
    return optax.sgd(learning_rate, momentum=o["momentum"] or None, nesterov=o["nesterov"])


def make(
    name: str,
    learning_rate: float | Callable[[Any], Any] = 1e-3,
    **options: Any,
) -> optax.GradientTransformation:
    """An Optax optimizer with Keras's semantics for ``name``.

    Args:
      name: "adam", "rmsprop" or "sgd".
      learning_rate: a float or an Optax schedule (a function of the step count).
      **options: Keras's option names, defaults as in Keras:
        adam: ``beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=None, nesterov=False``
        (decoupled weight decay, AdamW, when set);
        rmsprop: ``rho=0.9, momentum=0.0, epsilon=1e-7, centered=False`` (epsilon inside
        the square root, as Keras; ``weight_decay`` adds ``wd * param`` to the update);
        sgd: ``momentum=0.0, nesterov=False, weight_decay=None``;
        all: ``clipnorm`` (per-parameter norm), ``global_clipnorm``, ``clipvalue``.

    Returns:
      An ``optax.GradientTransformation`` whose state carries
      ``hyperparams["learning_rate"]``.

    Raises:
      ValueError: an unknown optimizer or option, naming the valid ones; a learning rate
      that is neither a positive number nor a callable.
    """
    if name not in DEFAULTS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {list(DEFAULTS)}")
    valid = {**DEFAULTS[name], **CLIP_OPTIONS}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for optimizer {name!r}; expected some of {sorted(valid)}"
        )
    if not callable(learning_rate) and not (
        isinstance(learning_rate, int | float) and learning_rate > 0
    ):
        raise ValueError(
            f"learning_rate={learning_rate!r}; expected a positive number or an optax schedule"
        )
    o = {**valid, **options}

    def build(learning_rate):
        parts = []
        if o["clipvalue"] is not None:
            parts.append(optax.clip(o["clipvalue"]))
        if o["clipnorm"] is not None:
            # Keras's clipnorm clips each parameter's gradient by its own norm.
            parts.append(_clip_each_by_norm(o["clipnorm"]))
        if o["global_clipnorm"] is not None:
            parts.append(optax.clip_by_global_norm(o["global_clipnorm"]))
        if o["weight_decay"] and name != "adam":
            parts.append(optax.add_decayed_weights(o["weight_decay"]))
        parts.append(_base(name, learning_rate, o))
        return optax.chain(*parts) if len(parts) > 1 else parts[0]

    return optax.inject_hyperparams(build)(learning_rate=learning_rate)


def _clip_each_by_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales each gradient leaf so that its L2 norm is at most ``max_norm`` (Keras clipnorm)."""

    def update_fn(updates, state, params=None):
        del params
        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g)))
            return g * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def learning_rate(opt_state: Any) -> Any:
    """The current learning rate held in an optimizer state made by :func:`make`."""
    return opt_state.hyperparams["learning_rate"]


def set_learning_rate(opt_state: Any, value: Any) -> Any:
    """A copy of ``opt_state`` with its injected learning rate set to ``value``."""
    hyperparams = dict(opt_state.hyperparams)
    hyperparams["learning_rate"] = value
    return opt_state._replace(hyperparams=hyperparams)
