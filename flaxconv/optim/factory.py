"""The optimizer factory :func:`make`: Keras's optimizers and options on Optax, and the
learning rate it injects into the optimizer state.

:func:`make` checks every option against Keras's names and ranges, then builds the chain
``clip -> the optimizer's step -> decoupled weight decay -> moving average of the weights``
(:mod:`flaxconv.optim.transforms` holds the Keras rules Optax lacks), restricted to the
trainable parameters by :func:`flaxconv.optim.freezing.freeze`, all inside
``optax.inject_hyperparams`` so that :func:`learning_rate` and :func:`set_learning_rate`
read and write ``opt_state.hyperparams["learning_rate"]`` without rebuilding anything.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from flaxconv.optim.freezing import as_patterns, freeze, layer_mask
from flaxconv.optim.transforms import (
    EPSILON_PLACEMENTS,
    clip_each_by_norm,
    scale_by_adam,
    weight_ema,
)

# Keras's option names and defaults per optimizer (epsilon_placement is flaxconv's).
DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": dict(beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, weight_decay=None,
                 nesterov=False, epsilon_placement="keras"),
    "rmsprop": dict(rho=0.9, momentum=0.0, epsilon=1e-7, centered=False, weight_decay=None),
    "sgd": dict(momentum=0.0, nesterov=False, weight_decay=None),
}
CLIP_OPTIONS = dict(clipnorm=None, global_clipnorm=None, clipvalue=None)
# Keras's base-optimizer options, taken by every optimizer; exclude_from_weight_decay is
# Keras's method of that name, given here as layer-name patterns (see layer_mask).
COMMON_OPTIONS = dict(**CLIP_OPTIONS, use_ema=False, ema_momentum=0.99,
                      ema_overwrite_frequency=None, exclude_from_weight_decay=())

# The valid values of numeric options: a test and its description for the error message.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "momentum": (lambda x: 0 <= x <= 1, "a number in [0, 1]"),
    "rho": (lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "beta_1": (lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "beta_2": (lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "epsilon": (lambda x: x >= 0, "a number >= 0"),
    "weight_decay": (lambda x: x >= 0, "None or a number >= 0"),
    "clipnorm": (lambda x: x > 0, "None or a number > 0"),
    "global_clipnorm": (lambda x: x > 0, "None or a number > 0"),
    "clipvalue": (lambda x: x > 0, "None or a number > 0"),
    "ema_momentum": (lambda x: 0 <= x <= 1, "a number in [0, 1]"),
}
_FLAGS = ("amsgrad", "nesterov", "centered", "use_ema")


def names() -> tuple[str, ...]:
    """The optimizer names accepted by :func:`make`."""
    return tuple(DEFAULTS)


def _is_number(x: Any) -> bool:
    # numbers.Real takes Python and NumPy scalars; bool is an int but no number here,
    # and NaN fails every range test.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_options(o: dict[str, Any]) -> None:
    """Raises a ValueError naming the first option outside its valid values."""
    for key, (ok, expected) in _RANGES.items():
        if key not in o or (o[key] is None and expected.startswith("None")):
            continue
        if not (_is_number(o[key]) and ok(o[key])):
            raise ValueError(f"{key}={o[key]!r}; expected {expected}")
    for key in _FLAGS:
        if key in o and not isinstance(o[key], bool):
            raise ValueError(f"{key}={o[key]!r}; expected True or False")
    frequency = o["ema_overwrite_frequency"]
    if frequency is not None and not (
        isinstance(frequency, numbers.Integral) and not isinstance(frequency, bool)
        and frequency >= 1
    ):
        raise ValueError(
            f"ema_overwrite_frequency={frequency!r}; expected None or an integer >= 1"
        )
    if o.get("epsilon_placement", "keras") not in EPSILON_PLACEMENTS:
        raise ValueError(
            f"epsilon_placement={o['epsilon_placement']!r}; expected one of "
            f"{list(EPSILON_PLACEMENTS)}"
        )
    clips = {k: o[k] for k in CLIP_OPTIONS if o[k] is not None}
    if len(clips) > 1:  # as Keras: which one would win is not obvious
        raise ValueError(f"clipping options {clips}; expected at most one of {list(CLIP_OPTIONS)}")


def _base(name: str, learning_rate: Any, o: dict[str, Any]) -> optax.GradientTransformation:
    if name == "rmsprop":
        # Keras adds epsilon inside the square root, lr * g / sqrt(v + eps), and its
        # momentum accumulates these lr-scaled steps, as optax.rmsprop does.
        return optax.rmsprop(
            learning_rate,
            decay=o["rho"],
            eps=o["epsilon"],
            eps_in_sqrt=True,
            centered=o["centered"],
            momentum=o["momentum"] or None,
        )
    if name == "adam":
        return optax.chain(
            scale_by_adam(
                o["beta_1"], o["beta_2"], o["epsilon"], amsgrad=o["amsgrad"],
                nesterov=o["nesterov"], epsilon_placement=o["epsilon_placement"],
            ),
            optax.scale_by_learning_rate(learning_rate),
        )
    # optax's trace sums raw gradients and the current learning rate scales the sum;
    # Keras's sums lr-scaled gradients. The same for a constant learning rate.
    return optax.sgd(learning_rate, momentum=o["momentum"] or None, nesterov=o["nesterov"])


def make(
    name: str,
    learning_rate: float | Callable[[Any], Any] = 1e-3,
    *,
    frozen: str | Sequence[str] = (),
    **options: Any,
) -> optax.GradientTransformation:
    """An Optax optimizer with Keras's semantics for ``name``.

    Args:
      name: "adam", "rmsprop" or "sgd".
      learning_rate: a number >= 0 or an Optax schedule (a function of the step count).
      frozen: layer-name patterns of parameters that get no update and no optimizer state
        (see :func:`freeze`); checked against the parameters when the optimizer is
        initialized. BatchNorm statistics are not parameters: to keep them too, freeze
        with :func:`flaxconv.finetune.freeze`, which also runs those layers in inference
        mode.
      **options: Keras's option names, defaults and valid ranges as in Keras:
        adam: ``beta_1=0.9, beta_2=0.999`` (in [0, 1)), ``epsilon=1e-7, amsgrad=False,
        nesterov=False`` and ``epsilon_placement="keras"``: Keras's update
        ``lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)``;
        ``"optax"`` gives optax.adam's ``lr * m_hat / (sqrt(v_hat) + epsilon)`` (see
        :func:`scale_by_adam`);
        rmsprop: ``rho=0.9`` (in [0, 1)), ``momentum=0.0, epsilon=1e-7, centered=False``
        (epsilon inside the square root, as Keras);
        sgd: ``momentum=0.0`` (in [0, 1]), ``nesterov=False``; with momentum, optax's
        trace of gradients is scaled by the current learning rate, where Keras's
        velocity sums ``lr * g``: the same unless the learning rate changes;
        all: ``weight_decay=None``: Keras's decoupled decay ``x -= lr * wd * x`` at each
        step, apart from the gradient step (for adam that is AdamW);
        ``exclude_from_weight_decay=()``: layer-name patterns (see :func:`layer_mask`,
        e.g. ``"*/bias"``, ``"bn_*"``) of parameters that are not decayed (Keras takes
        substrings of variable names: its ``["bias"]`` is ``"*/bias"`` here);
        ``clipnorm`` (each parameter's gradient by its own norm), ``global_clipnorm``,
        ``clipvalue``: at most one of them;
        ``use_ema=False, ema_momentum=0.99, ema_overwrite_frequency=None``: keep Keras's
        moving average of the weights in the optimizer state (see :func:`weight_ema`); every
        ``ema_overwrite_frequency`` steps the weights are replaced by it. Keras's ``fit``
        also replaces them at the end of training; flaxconv's does not: take
        :func:`ema_params` yourself.

    Returns:
      An ``optax.GradientTransformation`` whose state carries
      ``hyperparams["learning_rate"]``.

    Raises:
      ValueError: an unknown optimizer or option, naming the valid ones; an option out of
      its range, naming the value and the range; more than one clipping option; (at
      ``init``) a ``frozen`` or ``exclude_from_weight_decay`` pattern that matches no
      parameter, listing the layer names.
    """
    if name not in DEFAULTS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {list(DEFAULTS)}")
    valid = {**DEFAULTS[name], **COMMON_OPTIONS}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for optimizer {name!r}; expected some of {sorted(valid)}"
        )
    if not callable(learning_rate) and not (_is_number(learning_rate) and learning_rate >= 0):
        raise ValueError(
            f"learning_rate={learning_rate!r}; expected a number >= 0 or an optax schedule"
        )
    o = {**valid, **options}
    _check_options(o)
    frozen = as_patterns(frozen, "frozen")
    excluded = as_patterns(o["exclude_from_weight_decay"], "exclude_from_weight_decay")

    def build(learning_rate):
        parts = []
        if o["clipvalue"] is not None:
            parts.append(optax.clip(o["clipvalue"]))
        if o["clipnorm"] is not None:
            # Keras's clipnorm clips each parameter's gradient by its own norm.
            parts.append(clip_each_by_norm(o["clipnorm"]))
        if o["global_clipnorm"] is not None:
            parts.append(optax.clip_by_global_norm(o["global_clipnorm"]))
        parts.append(_base(name, learning_rate, o))
        if o["weight_decay"]:
            # Keras: x -= lr * wd * x, beside (not through) the moments and the momentum.
            mask = _decayed(excluded) if excluded else None
            parts.append(optax.add_decayed_weights(-learning_rate * o["weight_decay"], mask))
        if o["use_ema"]:
            parts.append(weight_ema(o["ema_momentum"], o["ema_overwrite_frequency"]))
        tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
        # Inside the injection, so the learning rate stays at opt_state.hyperparams and
        # clipping, weight decay and the average see the trainable parameters only (as
        # Keras's do).
        return freeze(tx, frozen) if frozen else tx

    tx = optax.inject_hyperparams(build)(learning_rate=learning_rate)
    if not (o["weight_decay"] and excluded):
        return tx

    def init_fn(params):
        # Checked here, against all the parameters: inside, frozen ones are hidden.
        layer_mask(params, excluded, "exclude_from_weight_decay")
        return tx.init(params)

    return tx._replace(init=init_fn)


def _decayed(excluded: tuple[str, ...]) -> Callable[[Any], Any]:
    """The weight-decay mask: True for the leaves outside the ``excluded`` layers."""

    def mask(params):
        # Not strict: inside freeze the frozen leaves are hidden; make checks at init.
        return jax.tree.map(lambda e: not e, layer_mask(params, excluded, strict=False))

    return mask


# --- The injected learning rate ----------------------------------------------------------


def _hyperparams(opt_state: Any) -> dict[str, Any]:
    # Found wherever the injection sits, e.g. inside a researcher's optax.chain.
    hyperparams = optax.tree_utils.tree_get(opt_state, "hyperparams")
    if not isinstance(hyperparams, dict) or "learning_rate" not in hyperparams:
        raise ValueError(
            f"the optimizer state {type(opt_state).__name__} holds no injected learning rate; "
            "build the optimizer with flaxconv.optim.make or optax.inject_hyperparams"
        )
    return hyperparams


def learning_rate(opt_state: Any) -> Any:
    """The current learning rate held in an optimizer state made by :func:`make` (also when
    wrapped by :func:`freeze`)."""
    return _hyperparams(opt_state)["learning_rate"]


def set_learning_rate(opt_state: Any, value: Any) -> Any:
    """A copy of ``opt_state`` with its injected learning rate set to ``value``."""
    hyperparams = dict(_hyperparams(opt_state))
    # The old dtype, so that a jitted step sees the same types and does not retrace.
    hyperparams["learning_rate"] = jnp.asarray(value, jnp.result_type(hyperparams["learning_rate"]))
    if hasattr(opt_state, "hyperparams"):
        return opt_state._replace(hyperparams=hyperparams)
    return optax.tree_utils.tree_set(opt_state, hyperparams=hyperparams)

