"""One evaluation engine: a model, a population (each member) or an ensemble on a dataset.

Every metric is a summable statistic of one batch (:func:`flaxconv.metrics.stats_fn`: a
confusion matrix, top-k counts, ROC histograms, a loss sum). The statistics of every batch
are added up in one jitted ``lax.scan`` (:data:`evaluate_sums`) and finished on the host
by :func:`flaxconv.metrics.compute`, so the numbers do not depend on the batch size (the
last batch is padded and masked). The names are Keras's (``accuracy``, ``precision``,
``recall``, ``f1_score``, ``sparse_top_k_categorical_accuracy``, ``auc``, ``loss``; see
:data:`flaxconv.metrics.NAMES`).

>>> fc.evaluate(state, test_images, test_labels, ("accuracy", "f1_score", "top_5"))
{'count': 10000, 'accuracy': 0.9912, 'f1_score': 0.9911, 'f1_score_per_class': ..., ...}
>>> fc.evaluate(states, test_images, test_labels)             # a population: [K] per metric
>>> fc.evaluate(states, test_images, test_labels, ensemble=True)  # mean of member softmaxes

A population is a :class:`~flaxconv.state.TrainState` whose leaves have a leading member
axis (``step`` is ``int32[K]``, see :mod:`flaxconv.population`). ``fc.fit``'s validation,
the experiments and the populations all evaluate here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxconv import epochs as ep
from flaxconv import metrics as metrics_lib
from flaxconv.checks import check_images
from flaxconv.state import TrainState
from flaxconv.steps import predict_fn


def _is_population(state: TrainState) -> bool:
    """Whether ``state`` is a population: its ``step`` has a member axis (``int32[K]``)."""
    return np.ndim(state.step) == 1


def ensemble_log_probs_fn(states: TrainState, images: jax.Array) -> jax.Array:
    """``log(mean_k softmax(logits_k))``, float32 ``[B, C]``, of a population of K; pure.

    Computed as ``logsumexp_k(log_softmax(logits_k)) - log K`` so that a class every
    member finds unlikely still has a finite log-probability.
    """
    if not _is_population(states):
        raise ValueError(
            f"states.step has shape {tuple(np.shape(states.step))}; expected [K]: a population"
        )
    k = np.shape(states.step)[0]
    logits = jax.vmap(predict_fn, in_axes=(0, None))(states, images)
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, -1), axis=0) - math.log(k)


#: ``ensemble_log_probs(states, images) -> [B, C]``: jitted :func:`ensemble_log_probs_fn`.
ensemble_log_probs = jax.jit(ensemble_log_probs_fn)


def evaluate_sums_fn(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    mask: jax.Array,
    weights: jax.Array | None = None,
    *,
    spec: metrics_lib.Spec,
    ensemble: bool = False,
) -> dict[str, jax.Array]:
    """The :func:`flaxconv.metrics.stats_fn` statistics of every batch, summed; pure.

    Args:
      state: a train state, or a population of K members (``step`` of shape ``[K]``).
      images: uint8/float ``[N, H, W, C]``; labels: int32 ``[N]`` in ``[0, C)``.
      indices: int32 ``[S, B]``, the examples of each batch; mask: bool ``[S, B]``, False
        on padding (see :meth:`flaxconv.epochs.EpochPlan.indices`).
      weights: float32 ``[N]`` sample weights, or None.
      spec: what to count (:func:`flaxconv.metrics.spec`); static under ``jit``.
      ensemble: with a population, evaluate the mean of the member softmaxes (its
        log-probabilities are the logits: the loss is the ensemble's negative
        log-likelihood, the prediction its argmax) instead of each member.

    Returns:
      The summed statistics (see :func:`flaxconv.metrics.stats_fn`); for a population
      without ``ensemble`` each has a leading member axis ``[K]``. Finish them with
      :func:`flaxconv.metrics.compute`.
    """
    if ensemble and not _is_population(state):
        raise ValueError("ensemble=True needs a population (state.step of shape [K]); "
                         f"got state.step of shape {tuple(np.shape(state.step))}")
    logits_fn = ensemble_log_probs_fn if ensemble else predict_fn

    def scan(state):
        def batch_stats(idx, m):
            weight = None if weights is None else weights[idx]
            return metrics_lib.stats_fn(logits_fn(state, images[idx]), labels[idx], m, weight,
                                        spec=spec)

        def body(total, xs):
            return jax.tree.map(jnp.add, total, batch_stats(*xs)), None

        first = jax.eval_shape(batch_stats, indices[0], mask[0])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
        return jax.lax.scan(body, zeros, (indices, mask))[0]

    if _is_population(state) and not ensemble:
        return jax.vmap(scan)(state)
    return scan(state)


#: :func:`evaluate_sums_fn` jitted (``spec`` and ``ensemble`` static); no donation.
evaluate_sums = jax.jit(evaluate_sums_fn, static_argnames=("spec", "ensemble"))


def evaluate(
    state: TrainState,
    images: Any,
    labels: Any,
    metrics: Sequence[str] | str = ("loss", "accuracy"),
    *,
    batch_size: int | None = None,
    sample_weight: Any = None,
    ensemble: bool = False,
    average: str | None = "macro",
    weighted_metrics: bool = True,
    roc_bins: int = 4096,
    roc_range: float = 40.0,
) -> dict[str, Any]:
    """The ``metrics`` of a model, of each member of a population, or of their ensemble,
    in inference mode on a whole array dataset (Keras's ``model.evaluate``).

    One jitted call of :data:`evaluate_sums` (a ``lax.scan`` over fixed-size batches, the
    last one padded and masked), then :func:`flaxconv.metrics.compute`: every example
    counts exactly once.

    Args:
      state: a train state, or a population of K members (``step`` of shape ``[K]``).
      images: uint8/float ``[N, H, W, C]``, numpy or device arrays.
      labels: int ``[N]`` in ``[0, num_classes)``.
      metrics: names from :data:`flaxconv.metrics.NAMES` (or a comma-separated string).
      batch_size: examples per scan step; default 1000 for a model, 500 for a population
        (all members run on each batch: memory grows as ``K * batch_size`` activations).
      sample_weight: float ``[N]``, finite and >= 0 (Keras's ``sample_weight``), or None.
        The loss becomes ``sum(w * loss) / N`` (Keras's ``sum_over_batch_size``) and, with
        ``weighted_metrics``, every count a sum of weights.
      ensemble: with a population, evaluate the mean of the member softmaxes.
      average: how ``precision``/``recall``/``f1_score`` average over classes
        (:func:`flaxconv.metrics.spec`).
      weighted_metrics: False weights the loss only (Keras's ``metrics=``).
      roc_bins, roc_range: the ``auc`` histograms (see :mod:`flaxconv.metrics`).

    Returns:
      See :func:`flaxconv.metrics.compute`: plain floats (and numpy arrays) for a model or
      an ensemble; for a population each value has a leading member axis (float64 ``[K]``
      for a scalar metric).

    Raises:
      ValueError: an unknown metric or average, labels outside the model's classes,
        NaN or infinite pixels (:func:`flaxconv.checks.check_images`, which also warns
        about float images that look unscaled), mismatched sizes, a bad batch size, a
        sample weight that is negative or not finite (named), or ``ensemble=True`` for a
        single model.
    """
    s = metrics_lib.spec(metrics, roc_bins=roc_bins, roc_range=roc_range, average=average,
                         weighted_metrics=weighted_metrics)
    if ensemble and not _is_population(state):
        raise ValueError("ensemble=True needs a population (state.step of shape [K]); "
                         f"got state.step of shape {tuple(np.shape(state.step))}")
    if batch_size is None:
        batch_size = 500 if _is_population(state) else 1000
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    check_images(images)
    metrics_lib.check_labels(labels, metrics_lib.model_classes(state))
    weights = None
    if sample_weight is not None:
        weights = jnp.asarray(metrics_lib.check_sample_weight(sample_weight, len(labels)))
    if not isinstance(batch_size, int | np.integer) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r}; expected a positive integer")
    plan = ep.epoch_plan(len(labels), min(batch_size, len(labels)))
    sums = evaluate_sums(state, jnp.asarray(images), jnp.asarray(labels, jnp.int32),
                         plan.indices(None), plan.mask, weights, spec=s, ensemble=ensemble)
    return metrics_lib.compute(sums, s)


# ----------------------------------------------------------- the old raw-sum entry points
__all__ = [
    "ensemble_log_probs",
    "ensemble_log_probs_fn",
    "evaluate",
    "evaluate_sums",
    "evaluate_sums_fn",
]
