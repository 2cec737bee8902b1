"""The Optax optimizer factory, with Keras's option names, defaults and update rules.

>>> tx = flaxconv.optim.make("rmsprop", learning_rate=1e-3)       # Keras's RMSprop, exactly
>>> tx = flaxconv.optim.make("sgd", learning_rate=0.01, momentum=0.9, nesterov=True)
>>> tx = flaxconv.optim.make("adam", learning_rate=optax.cosine_decay_schedule(1e-3, 5000))
>>> tx = flaxconv.optim.make("rmsprop", 1e-3, frozen=("conv_*", "bn_*"))  # train the head only
>>> tx = flaxconv.optim.make("adam", 1e-3, weight_decay=1e-4, exclude_from_weight_decay="*/bias")
>>> tx = flaxconv.optim.make("sgd", 0.1, use_ema=True, ema_momentum=0.99)
>>> averaged = flaxconv.optim.ema_params(state.opt_state, state.params)

The learning rate is always injected into the optimizer state
(``optax.inject_hyperparams``): callbacks such as ReduceLROnPlateau and populations of
models with one learning rate each read and write it as
``opt_state.hyperparams["learning_rate"]`` without rebuilding the optimizer.

Freezing (fine-tuning) is by layer-name pattern: :func:`freeze` restricts any optimizer to
the trainable parameters (``optax.masked``) and gives the frozen ones zero updates: no
change, and no optimizer state (moments are kept for the trainable leaves only).
``make(..., frozen=...)`` is ``freeze`` applied inside the learning-rate injection.

One update of :func:`make`'s optimizer is Keras's ``optimizer.apply`` (``keras/src/
optimizers/base_optimizer.py``), in Keras's order: clip the gradients; the optimizer's own
step; decoupled weight decay ``x -= lr * wd * x``; the moving average of the weights
(``use_ema``), which every ``ema_overwrite_frequency`` steps replaces the weights.

Where each part lives (all of it is reached as ``flaxconv.optim.<name>``):

* :mod:`flaxconv.optim.factory`: :func:`make`, its options and their checks, and the
  injected learning rate (:func:`learning_rate`, :func:`set_learning_rate`);
* :mod:`flaxconv.optim.transforms`: the Keras update rules Optax lacks, as plain
  ``GradientTransformation`` objects (:func:`scale_by_adam`, :func:`weight_ema` and
  :func:`ema_params`, per-parameter ``clipnorm``);
* :mod:`flaxconv.optim.freezing`: layer-name patterns over parameter trees
  (:func:`layer_names`, :func:`layer_mask`) and :func:`freeze`.
"""

from flaxconv.optim.factory import (
    CLIP_OPTIONS,
    COMMON_OPTIONS,
    DEFAULTS,
    learning_rate,
    make,
    names,
    set_learning_rate,
)
from flaxconv.optim.freezing import freeze, layer_mask, layer_names
from flaxconv.optim.transforms import (
    EPSILON_PLACEMENTS,
    ScaleByAdamState,
    WeightEmaState,
    ema_params,
    scale_by_adam,
    weight_ema,
)

__all__ = [
    "CLIP_OPTIONS",
    "COMMON_OPTIONS",
    "DEFAULTS",
    "EPSILON_PLACEMENTS",
    "ScaleByAdamState",
    "WeightEmaState",
    "ema_params",
    "freeze",
    "layer_mask",
    "layer_names",
    "learning_rate",
    "make",
    "names",
    "scale_by_adam",
    "set_learning_rate",
    "weight_ema",
]
