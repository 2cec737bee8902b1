"""The summable statistics of one batch (:func:`stats_fn`, jitted by its callers) and the
host-side checks of what it is given, which it does not check itself.

:func:`stats_fn` turns logits and labels into counts that add up over batches: a
confusion matrix, top-k hits, ROC score histograms (over :func:`log_odds`) and the loss
sum, weighted by sample weights where given. Labels must lie in ``[0, classes)``
(:func:`check_labels`, against :func:`model_classes`) and weights be finite and >= 0
(:func:`check_sample_weight`); out-of-range labels would be dropped silently on device.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxconv.metrics.vocabulary import Spec
from flaxconv.state import TrainState
from flaxconv.steps import predict_fn


def log_odds(logits: jax.Array) -> jax.Array:
    """``log p_c - log(1 - p_c)`` of ``softmax(logits)``, ``[B, C]``, without the
    cancellation of ``1 - p_c`` when ``p_c`` is close to 1.

    For the top class the complement's log is a logsumexp over the other logits; for the
    others ``p_c <= 1/2`` and ``log1p(-p_c)`` is accurate.
    """
    logits = logits.astype(jnp.float32)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    top = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=bool)
    log_rest_top = jax.nn.logsumexp(jnp.where(top, -jnp.inf, logits), axis=-1, keepdims=True)
    log_rest_top -= jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    log_rest = jnp.where(top, log_rest_top, jnp.log1p(-jnp.exp(jnp.where(top, -1.0, log_p))))
    return log_p - log_rest


def stats_fn(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
    weight: jax.Array | None = None, *, spec: Spec
) -> dict[str, jax.Array]:
    """Summable statistics of one batch; pure (jit with ``spec`` static, scan, vmap).

    Args:
      logits: float ``[B, C]``.
      labels: int ``[B]`` in ``[0, C)`` (not checked here: see :func:`check_labels`).
      mask: ``[B]``, zero/False for padding rows; all rows count when None.
      weight: float ``[B]`` sample weights (>= 0, not checked here), or None.
      spec: from :func:`spec`.

    Returns:
      ``count`` int32 (unmasked rows), ``loss_sum`` float32 (weighted by ``weight``),
      ``confusion`` ``[C, C]``, ``top_k`` ``[len(spec.top_k)]`` (correct counts), and with
      ``auc`` ``roc_pos`` and ``roc_neg`` ``[C, roc_bins]`` (score histograms of each
      class's positives and negatives). These counts are int32, or float32 sums of
      ``weight`` when it is given and ``spec.weighted``; then ``weight_sum`` float32 too.
    """
    logits = logits.astype(jnp.float32)
    batch, classes = logits.shape
    labels = labels.astype(jnp.int32)
    valid = jnp.ones((batch,), jnp.int32) if mask is None else (mask > 0).astype(jnp.int32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # Padding rows may hold anything: a where, not a product, keeps a NaN there out.
    losses = jnp.where(valid > 0, losses, 0.0)
    loss_weight = valid if weight is None else valid * weight.astype(jnp.float32)
    count_weight = loss_weight if weight is not None and spec.weighted else valid
    pred = jnp.argmax(logits, -1)
    out = {
        "count": jnp.sum(valid),
        "loss_sum": jnp.sum(losses * loss_weight),
        "confusion": jnp.zeros((classes, classes), count_weight.dtype)
        .at[labels, pred].add(count_weight),
    }
    if count_weight.dtype != valid.dtype:
        out["weight_sum"] = jnp.sum(count_weight)
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)  # logits strictly above the label's
    ks = jnp.asarray(spec.top_k, jnp.int32)
    out["top_k"] = jnp.sum((rank[:, None] < ks[None, :]) * count_weight[:, None], axis=0)
    if spec.roc_bins:
        scale = spec.roc_bins / (2.0 * spec.roc_range)
        position = jnp.floor((log_odds(logits) + spec.roc_range) * scale)
        bins = jnp.clip(position, 0, spec.roc_bins - 1).astype(jnp.int32)  # [B, C]
        rows = jnp.broadcast_to(jnp.arange(classes), (batch, classes))
        is_positive = (labels[:, None] == rows).astype(count_weight.dtype)
        positive = is_positive * count_weight[:, None]
        negative = (1 - is_positive) * count_weight[:, None]
        zeros = jnp.zeros((classes, spec.roc_bins), count_weight.dtype)
        out["roc_pos"] = zeros.at[rows, bins].add(positive)
        out["roc_neg"] = zeros.at[rows, bins].add(negative)
    return out


# --- The checks of what stats_fn is given ------------------------------------------------


def check_labels(labels: Any, classes: int, what: str = "labels") -> None:
    """Rejects labels that are not integers in ``[0, classes)``, naming one bad value."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} are {labels.dtype}{list(labels.shape)}; expected int [N]")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)]
        raise ValueError(
            f"{what} hold {bad.size} value(s) outside [0, {classes}), e.g. {int(bad[0])}; "
            f"the model has {classes} classes"
        )


def check_sample_weight(sample_weight: Any, n: int, what: str = "sample_weight") -> np.ndarray:
    """``sample_weight`` as float32 ``[n]``, or a ValueError naming a value that is not a
    finite number >= 0 (or the shape, when it is not ``[n]``)."""
    weights = np.asarray(sample_weight)
    if weights.shape != (n,) or not (np.issubdtype(weights.dtype, np.floating)
                                     or np.issubdtype(weights.dtype, np.integer)):
        raise ValueError(
            f"{what} is {weights.dtype}{list(weights.shape)}; expected one number per "
            f"example, shape [{n}]"
        )
    weights = weights.astype(np.float32)
    bad = ~(np.isfinite(weights) & (weights >= 0))
    if bad.any():
        raise ValueError(
            f"{what} holds {int(bad.sum())} value(s) that are not finite numbers >= 0, "
            f"e.g. {float(weights[bad][0])} at index {int(np.flatnonzero(bad)[0])}"
        )
    return weights



def model_classes(state: TrainState) -> int:
    """The width of the model's logits (a population's members share it)."""
    probe = jax.ShapeDtypeStruct((1, *state.input_shape), jnp.float32)
    forward = jax.vmap(predict_fn, in_axes=(0, None)) if np.ndim(state.step) == 1 else predict_fn
    return int(jax.eval_shape(forward, state, probe).shape[-1])
