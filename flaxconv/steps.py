"""The pure training, evaluation and prediction steps.

A batch is a dict::

    {"image": uint8 or float[B, H, W, C],   # uint8 is scaled to [0, 1] on device
     "label": int[B],
     "mask":  bool[B],                      # optional; False rows (padding) count nowhere
     "weight": float[B]}                    # optional; Keras's sample_weight (see loss_fn)

Metrics come back as sums over the batch, so dataset-level numbers are exact sums over
batches (``flaxconv.metrics.compute(sums)`` finishes them into loss and accuracy):

    {"loss_sum": f32[], "correct": f32[], "count": f32[],     # eval_step adds "confusion"
     "invalid_labels": f32[]}

A label outside ``[0, num_classes)`` is never trained on silently: the update is the mean
over the other examples, the batch's ``loss_sum`` is NaN (``fc.fit`` would stop on it), and
``invalid_labels`` counts such examples. ``fc.fit`` and ``fc.evaluate`` refuse them
before any step, naming a bad value.

``train_step``, ``eval_step`` and ``predict`` are ``jax.jit``-ed and do not donate their
inputs (a caller's earlier state stays valid); ``*_fn`` are the same functions un-jitted,
for composing inside a caller's own ``jit``/``scan``/``vmap``. They are the steps that
``fc.fit``, ``fc.epochs`` and the populations run, too.

Every step calls the model through :func:`apply_model`, the one place where the kernel
seam (:mod:`flaxconv.kernels`) gives its convolutions and pools their fast formulations,
chosen by ``state.kernels``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxconv import kernels
from flaxconv.nnx_model import NNXModel
from flaxconv.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def prepare_images(images: jax.Array) -> jax.Array:
    """uint8 ``[B, H, W, C]`` in 0..255 → float32 in [0, 1]; float images pass unchanged."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) * (1.0 / 255.0)
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    raise TypeError(f"images have dtype {images.dtype}; expected uint8 (0..255) or a float dtype")


def check_images(state: TrainState, images: Any) -> None:
    """Raises a ValueError/TypeError naming the shape/dtype found and the one expected.

    Runs on shapes only, so inside a jitted step it costs nothing after tracing.
    """
    expected = ("B", *state.input_shape)
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[1:] != tuple(state.input_shape):
        raise ValueError(f"batch['image'] has shape {shape}; expected {expected}")
    dtype = jnp.dtype(images.dtype)
    if dtype != jnp.uint8 and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"batch['image'] has dtype {dtype}; expected uint8 (0..255) or a float dtype"
        )


def check_batch(state: TrainState, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Validates a batch (at trace time) and returns ``(images, labels, mask)``."""
    if not isinstance(batch, dict) or "image" not in batch or "label" not in batch:
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"batch is {got}; expected a dict with 'image' and 'label' (and 'mask')")
    images, labels = batch["image"], batch["label"]
    check_images(state, images)
    n = np.shape(images)[0]
    if tuple(np.shape(labels)) != (n,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"batch['label'] is {jnp.dtype(labels.dtype)}{list(np.shape(labels))}; "
            f"expected integer class ids of shape [{n}]"
        )
    mask = batch.get("mask")
    if mask is None:
        mask = jnp.ones((n,), jnp.float32)
    elif tuple(np.shape(mask)) != (n,):
        raise ValueError(f"batch['mask'] has shape {tuple(np.shape(mask))}; expected ({n},)")
    return prepare_images(images), labels.astype(jnp.int32), mask.astype(jnp.float32)


def batch_weight(batch: Batch) -> jax.Array | None:
    """``batch["weight"]`` (Keras's ``sample_weight``) as float32 ``[B]``, or None when the
    batch has none. Checked at trace time: shape ``[B]``, a real dtype. Its values are not
    checked here (they may be traced); :func:`flaxconv.fit` checks host arrays."""
    weight = batch.get("weight")
    if weight is None:
        return None
    n = np.shape(batch["image"])[0]
    dtype = jnp.dtype(weight.dtype if hasattr(weight, "dtype") else np.asarray(weight).dtype)
    if tuple(np.shape(weight)) != (n,) or not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
        raise ValueError(
            f"batch['weight'] is {dtype}{list(np.shape(weight))}; expected a real number per "
            f"example, shape [{n}]"
        )
    return jnp.asarray(weight).astype(jnp.float32)


def apply_model(state: TrainState, variables: Any, images: jax.Array, *, train: bool,
                rngs: dict[str, jax.Array] | None = None, **apply_kwargs: Any) -> Any:
    """``state.model.apply(variables, images, train=train, rngs=rngs, **apply_kwargs)``
    through the kernel seam: :func:`flaxconv.kernels.rewrite` with ``state.kernels``.

    ``state.model`` is a linen module or a :class:`flaxconv.nnx_model.NNXModel` (an NNX
    module's graphdef: ``apply`` merges the variables into a fresh module, sets its mode
    and runs it); see :func:`_forward`. ``apply_kwargs`` (``mutable``, and
    ``capture_intermediates`` for linen or ``capture`` for NNX) are static. Returns what
    ``apply`` returns, with the same values and gradients to float32 rounding.
    """

    forward = _forward(state, train, **apply_kwargs)
    return kernels.rewrite(forward, state.kernels)(variables, images, rngs)


def _forward(state: TrainState, train: bool, **apply_kwargs: Any):
    """The model's pass as a function of arrays only, the form the kernel seam takes.

    Both kinds of model dispatch through their own ``apply``: linen's ``Module.apply``, or
    :meth:`flaxconv.nnx_model.NNXModel.apply` (``nnx.merge`` of the variables, then
    ``model.train()``/``model.eval()`` and the RNG streams reseeded from ``rngs``), so
    NNX models reach the seam as the same pure function of (variables, images, rngs).
    """

    def forward(variables, images, rngs):
        return state.model.apply(variables, images, train=train, rngs=rngs, **apply_kwargs)

    return forward


def explain_kernels(state: TrainState, images: Any, train: bool = True
                    ) -> list[kernels.Choice]:
    """Which formulation computes each convolution and pool of ``state``'s model in its
    steps (``train=True``: the training pass; False: evaluation and prediction).

    ``images`` is anything with a ``shape`` ``[B, H, W, C]`` (and ``dtype``); nothing is
    computed. A :class:`flaxconv.kernels.Choice` per layer, in trace order; XLA's own
    operations (the fallback) read ``"xla (reason)"``.
    """
    check_images(state, images)
    x = jax.ShapeDtypeStruct(tuple(np.shape(images)), jnp.float32)
    mutable = ["batch_stats"] if train and state.batch_stats else False
    rngs = state.step_rngs() if train else None
    # An NNX module's operations carry no layer names unless its calls are scoped.
    named = {"name_layers": True} if isinstance(state.model, NNXModel) else {}
    return kernels.explain(_forward(state, train, mutable=mutable, **named), state.variables(),
                           x, rngs, policy=state.kernels)


def example_losses(logits: jax.Array, labels: jax.Array, mask: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy per example, float32 ``[B]``, and whether each unmasked label
    is outside ``[0, num_classes)`` (bool ``[B]``). Such an example's loss is NaN: a
    gather would otherwise wrap -1 to the last class, or read past the logits."""
    invalid = ((labels < 0) | (labels >= logits.shape[-1])) & (mask > 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.where(invalid, jnp.nan, losses), invalid


def batch_metrics(logits: jax.Array, labels: jax.Array, losses: jax.Array, mask: jax.Array,
                  invalid: jax.Array | None = None, weight: jax.Array | None = None):
    """Summable metrics of one batch: masked loss sum (weighted by ``weight`` when given),
    correct count, example count, and the count of unmasked examples whose label is out of
    range. ``loss_sum / count`` is then Keras's ``sum_over_batch_size`` loss; the correct
    count is not weighted, as Keras's ``metrics=`` (not ``weighted_metrics=``)."""
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    invalid = jnp.zeros_like(mask) if invalid is None else invalid.astype(jnp.float32)
    weighted = mask if weight is None else mask * weight
    return {
        "loss_sum": jnp.sum(jnp.where(mask > 0, losses, 0.0) * weighted),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
        "invalid_labels": jnp.sum(invalid),
    }


def loss_fn(
    params: Any, state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array,
    weight: jax.Array | None = None,
) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """Softmax cross-entropy over the unmasked examples, in training mode.

    Without ``weight`` the mean over the valid examples (unmasked, label in range). With a
    float32 ``[B]`` ``weight`` (Keras's ``sample_weight``; ``class_weight`` becomes one),
    Keras's ``sum_over_batch_size`` reduction: ``sum(weight * loss) / valid count`` (not
    divided by the sum of the weights, so weights of 0.5 halve the loss and the gradient).

    Returns ``(loss, (metric sums, new batch_stats))``; differentiable in ``params``.
    """
    mutable = ["batch_stats"] if state.batch_stats else False
    out = apply_model(state, state.variables(params), images, train=True,
                      rngs=state.step_rngs(), mutable=mutable)
    logits, updates = out if mutable else (out, {})
    logits = logits.astype(jnp.float32)
    losses, invalid = example_losses(logits, labels, mask)
    # The update is over the valid examples; the metrics keep the NaN loss. As Keras's
    # masks, padding changes the divisor to the valid count, never the weights.
    valid = mask * (1.0 - invalid)
    weighted = valid if weight is None else valid * weight
    loss = (jnp.sum(jnp.where(invalid, 0.0, losses) * weighted)
            / jnp.maximum(jnp.sum(valid), 1.0))
    metrics = batch_metrics(logits, labels, losses, mask, invalid, weight)
    return loss, (metrics, updates.get("batch_stats", state.batch_stats))


def train_step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One optimizer update on ``batch``; pure (see :data:`train_step`)."""
    images, labels, mask = check_batch(state, batch)
    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params, state, images, labels, mask, batch_weight(batch)
    )
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        batch_stats=batch_stats,
    )
    return new_state, metrics


def eval_step_fn(state: TrainState, batch: Batch) -> Metrics:
    """Metric sums of the model in inference mode on ``batch``; pure.

    Returns ``loss_sum``, ``correct``, ``count``, ``invalid_labels`` (float32 scalars) and
    ``confusion`` (float32 ``[num_classes, num_classes]``, rows = true class, columns =
    predicted; an out-of-range label has no row, and counts in ``invalid_labels``). A
    ``"weight"`` in the batch weights ``loss_sum`` only, as in :func:`train_step_fn`.
    """
    images, labels, mask = check_batch(state, batch)
    logits = apply_model(state, state.variables(), images, train=False).astype(jnp.float32)
    losses, invalid = example_losses(logits, labels, mask)
    metrics = batch_metrics(logits, labels, losses, mask, invalid, batch_weight(batch))
    num_classes = logits.shape[-1]
    onehot_true = jax.nn.one_hot(labels, num_classes) * mask[:, None]
    onehot_pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
    metrics["confusion"] = onehot_true.T @ onehot_pred
    return metrics


def predict_fn(state: TrainState, images: jax.Array) -> jax.Array:
    """Float32 logits ``[B, num_classes]`` in inference mode for uint8 or float images."""
    check_images(state, images)
    logits = apply_model(state, state.variables(), prepare_images(images), train=False)
    return logits.astype(jnp.float32)


#: ``train_step(state, batch) -> (state, metrics)``: jitted, no donation.
train_step = jax.jit(train_step_fn)
#: ``eval_step(state, batch) -> metrics``: jitted.
eval_step = jax.jit(eval_step_fn)
#: ``predict(state, images) -> logits``: jitted.
predict = jax.jit(predict_fn)


def add_metrics(a: Metrics | None, b: Metrics) -> Metrics:
    """Elementwise sum of two metric-sum dicts (``a`` may be None)."""
    return b if a is None else jax.tree.map(jnp.add, a, b)
