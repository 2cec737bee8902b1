"""Dataset-level classification metrics from summable per-batch statistics.

Every metric here is a function of integer counts that add up over batches, so a dataset's
numbers are the same however it is split into batches (padding rows masked out):

* the confusion matrix ``[C, C]`` (rows: true class, columns: argmax prediction) gives
  ``accuracy``, and per-class, macro, micro and support-weighted ``precision``, ``recall``
  and ``f1`` exactly (see :func:`average_scores`);
* ``top_<k>`` counts the examples whose label is among the ``k`` largest logits (a label
  tied with the k-th logit counts as inside), exactly;
* ``roc_auc`` (one-vs-rest per class, macro mean) comes from per-class histograms of the
  scores of positives and negatives, ``roc_bins`` bins over the log-odds
  ``log p_c - log(1 - p_c)`` in ``[-roc_range, roc_range]`` (clipped at the ends). The
  log-odds are a monotone function of the softmax probability, so the AUC of either score
  is the same number; binning them spreads out the probabilities that crowd near 0 and 1.
  Pairs of a positive and a negative in different bins are ordered exactly; a pair in the
  same bin is counted as a tie (1/2), so the error is at most half the fraction of pairs
  that share a bin. That bound is computed from the same histograms and returned as
  ``roc_auc_max_error`` (typically < 1e-3 at the default 4096 bins).
* ``loss`` is the mean softmax cross-entropy (a float sum: split-independent up to
  float rounding).

Sample weights (Keras's ``sample_weight``, fractional, >= 0) turn the counts into weighted
sums: each example adds its weight instead of 1 to the confusion matrix, the top-k counts and
the ROC histograms (Keras's ``weighted_metrics``, scikit-learn's ``sample_weight``), and the
loss is Keras's ``sum_over_batch_size`` reduction, ``sum(w * loss) / N``.

>>> numbers = fc.metrics.evaluate(state, test_images, test_labels,
...                               ("accuracy", "top_5", "precision", "recall", "f1",
...                                "roc_auc", "confusion"))
>>> numbers["f1"], numbers["f1_per_class"], numbers["confusion"]

In a loop of one's own: ``s = spec(names)``, sum ``stats_fn(logits, labels, mask, spec=s)``
(or ``stats_fn(logits, labels, mask, weight, spec=s)``) over batches (it jits, scans and
vmaps), then ``compute(sums, s)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxconv import epochs as ep
from flaxconv.state import TrainState
from flaxconv.steps import predict_fn

#: The metric names :func:`spec` accepts; ``top_<k>`` for any k >= 1, and ``precision``,
#: ``recall``, ``f1`` with an average in the name (``f1_weighted``, ``recall_micro``, ...).
NAMES = ("loss", "accuracy", "top_<k>", "precision", "recall", "f1",
         "<precision|recall|f1>_<macro|micro|weighted>", "roc_auc", "confusion")
_SCORES = ("precision", "recall", "f1")
#: What ``average`` may be: scikit-learn's and Keras's ``F1Score``'s choices.
AVERAGES = ("macro", "micro", "weighted", None)
_FIXED = {"loss", "accuracy", *_SCORES, "roc_auc", "confusion"} | {
    f"{score}_{average}" for score in _SCORES for average in AVERAGES if average
}


class Spec(NamedTuple):
    """What :func:`stats_fn` counts and :func:`compute` reports (hashable: a static arg).

    ``average`` is how the plain names ``precision``/``recall``/``f1`` average over
    classes; ``weighted`` whether sample weights weight the counts or only the loss.
    """

    names: tuple[str, ...]
    top_k: tuple[int, ...]
    roc_bins: int
    roc_range: float
    average: str | None = "macro"
    weighted: bool = True


def spec(
    metrics: Sequence[str] | str = ("loss", "accuracy"),
    *,
    roc_bins: int = 4096,
    roc_range: float = 40.0,
    average: str | None = "macro",
    weighted_metrics: bool = True,
) -> Spec:
    """Checks metric names and returns their :class:`Spec`.

    Args:
      metrics: names from :data:`NAMES`, or one comma-separated string
        (``"accuracy,top_5,f1"``).
      roc_bins: histogram bins per class for ``roc_auc``.
      roc_range: the bins cover log-odds in ``[-roc_range, roc_range]``.
      average: what ``precision``, ``recall`` and ``f1`` report: ``"macro"``, ``"micro"``,
        ``"weighted"`` (a float) or None (the per-class array); see :func:`average_scores`.
        A name with its own average (``f1_micro``) ignores it.
      weighted_metrics: with sample weights, whether they weight every metric (Keras's
        ``weighted_metrics=``) or only the loss (False: Keras's ``metrics=``).

    Raises:
      ValueError: an unknown name (naming the valid ones), average, or a bad bin setting.
    """
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    names, top_k = [], []
    for name in metrics:
        match = re.fullmatch(r"top_(\d+)", name)
        if match and int(match[1]) >= 1:
            top_k.append(int(match[1]))
        elif name not in _FIXED:
            raise ValueError(f"unknown metric {name!r}; expected some of {list(NAMES)}")
        if name not in names:
            names.append(name)
    if not isinstance(roc_bins, int) or roc_bins < 2:
        raise ValueError(f"roc_bins={roc_bins!r}; expected an integer >= 2")
    if not roc_range > 0:
        raise ValueError(f"roc_range={roc_range!r}; expected a positive number")
    if average not in AVERAGES:
        raise ValueError(f"average={average!r}; expected one of {list(AVERAGES)}")
    if not isinstance(weighted_metrics, bool):
        raise ValueError(f"weighted_metrics={weighted_metrics!r}; expected True or False")
    bins = roc_bins if "roc_auc" in names else 0
    return Spec(tuple(names), tuple(sorted(set(top_k))), bins, float(roc_range), average,
                weighted_metrics)


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
      ``roc_auc`` ``roc_pos`` and ``roc_neg`` ``[C, roc_bins]`` (score histograms of each
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


def precision_recall_f1(confusion: Any) -> dict[str, np.ndarray]:
    """Per-class precision, recall and F1 from a confusion matrix (rows true, cols pred).

    ``precision_c = TP / (TP + FP)``, ``recall_c = TP / (TP + FN)``,
    ``f1_c = 2 TP / (2 TP + FP + FN)``; 0 where the denominator is 0 (scikit-learn's
    ``zero_division=0``). ``present`` marks the classes that occur as a label or a
    prediction: the macro averages are over those (as scikit-learn without ``labels=``).
    """
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    predicted, actual = confusion.sum(0), confusion.sum(1)

    def ratio(num, den):
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    return {
        "precision": ratio(tp, predicted),
        "recall": ratio(tp, actual),
        "f1": ratio(2 * tp, predicted + actual),
        "present": (predicted + actual) > 0,
    }


def average_scores(confusion: Any, average: str | None = "macro") -> dict[str, Any]:
    """``precision``, ``recall`` and ``f1`` of a confusion matrix, averaged over classes.

    Args:
      confusion: ``[C, C]`` counts or weighted sums (rows true, columns predicted).
      average: scikit-learn's (and Keras's ``F1Score``'s) choices:

        * ``"macro"``: the plain mean of the per-class values over the classes that occur
          as a label or a prediction (scikit-learn without ``labels=``);
        * ``"weighted"``: their mean weighted by each class's support (its row sum),
          ``sum_c support_c * score_c / sum_c support_c``;
        * ``"micro"``: the ratios of the counts summed over classes,
          ``sum TP / (sum TP + sum FP)`` etc.; with one label per example all three equal
          the accuracy;
        * None: the per-class float64 ``[C]`` arrays of :func:`precision_recall_f1`.

    Returns:
      ``{"precision", "recall", "f1"}``: floats (0.0 when nothing counts), or arrays for
      ``average=None``.
    """
    if average not in AVERAGES:
        raise ValueError(f"average={average!r}; expected one of {list(AVERAGES)}")
    scores = precision_recall_f1(confusion)
    if average is None:
        return {name: scores[name] for name in _SCORES}
    confusion = np.asarray(confusion, np.float64)
    if average == "micro":
        tp, total = float(np.trace(confusion)), float(confusion.sum())
        # Summed over classes, FP and FN both count every wrong prediction once.
        value = tp / total if total > 0 else 0.0
        return {name: value for name in _SCORES}
    if average == "weighted":
        support = confusion.sum(1)
        if not support.sum() > 0:
            return {name: 0.0 for name in _SCORES}
        return {name: float(np.average(scores[name], weights=support)) for name in _SCORES}
    present = scores["present"]
    return {name: float(scores[name][present].mean()) if present.any() else 0.0
            for name in _SCORES}


def roc_auc_from_histograms(positives: Any, negatives: Any) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest ROC AUC per class from score histograms, and its error bound.

    Args:
      positives, negatives: counts ``[C, bins]`` of each class's positive and negative
        examples per score bin (bins in increasing score order).

    Returns:
      ``(auc, max_error)``, each float64 ``[C]``: ``auc = P(s_pos > s_neg) + P(tie) / 2``
      with pairs in one bin counted as ties, and ``max_error`` = half the fraction of
      pairs that share a bin, which bounds ``|auc - exact AUC|``. NaN for a class without
      positives or without negatives.
    """
    pos = np.asarray(positives, np.float64)
    neg = np.asarray(negatives, np.float64)
    below = np.cumsum(neg, axis=-1) - neg  # negatives in strictly lower bins
    pairs = pos.sum(-1) * neg.sum(-1)
    same_bin = np.sum(pos * neg, axis=-1)
    wins = np.sum(pos * below, axis=-1) + 0.5 * same_bin
    with np.errstate(invalid="ignore", divide="ignore"):
        defined = pairs > 0
        auc = np.where(defined, wins / np.where(defined, pairs, 1), np.nan)
        error = np.where(defined, 0.5 * same_bin / np.where(defined, pairs, 1), np.nan)
    return auc, error


def compute(sums: dict[str, Any], spec: Spec) -> dict[str, Any]:
    """The metrics named in ``spec`` from summed :func:`stats_fn` statistics (host side).

    Returns plain Python floats for scalars and numpy arrays otherwise: ``loss``,
    ``accuracy``, ``top_<k>``; ``precision``/``recall``/``f1`` (``spec.average``: macro by
    default) with ``<name>_per_class`` ``[C]``, and ``<name>_<average>`` as named;
    ``roc_auc`` (macro over classes with positives and negatives) with
    ``roc_auc_per_class`` ``[C]`` (NaN where undefined) and ``roc_auc_max_error``;
    ``confusion`` ``[C, C]`` (int64, or float64 weighted sums); and always ``count``.

    With weighted counts (``weight_sum`` in ``sums``) accuracy and top-k are fractions of the
    total weight; ``loss`` is always ``loss_sum / count`` (Keras's ``sum_over_batch_size``).
    """
    sums = jax.device_get(sums)
    count = int(sums["count"])
    weighted = "weight_sum" in sums
    n = float(sums["weight_sum"]) if weighted else max(count, 1)
    n = n if n > 0 else 1.0  # nothing counted: the ratios are 0
    confusion = np.asarray(sums["confusion"], np.float64 if weighted else np.int64)
    out: dict[str, Any] = {"count": count}
    per_class = precision_recall_f1(confusion)
    for name in spec.names:
        if name == "loss":
            out["loss"] = float(sums["loss_sum"]) / max(count, 1)
        elif name == "accuracy":
            out["accuracy"] = float(np.trace(confusion)) / n
        elif name.startswith("top_"):
            out[name] = float(sums["top_k"][spec.top_k.index(int(name[4:]))]) / n
        elif name in _SCORES:
            out[name] = average_scores(confusion, spec.average)[name]
            out[f"{name}_per_class"] = per_class[name]
        elif name.split("_")[0] in _SCORES:
            score, average = name.split("_")
            out[name] = average_scores(confusion, average)[score]
            out[f"{score}_per_class"] = per_class[score]
        elif name == "roc_auc":
            auc, error = roc_auc_from_histograms(sums["roc_pos"], sums["roc_neg"])
            defined = ~np.isnan(auc)
            out["roc_auc"] = float(auc[defined].mean()) if defined.any() else float("nan")
            out["roc_auc_per_class"] = auc
            out["roc_auc_max_error"] = (
                float(error[defined].mean()) if defined.any() else float("nan")
            )
        elif name == "confusion":
            out["confusion"] = confusion
    return out


@partial(jax.jit, static_argnames="spec")
def _evaluate_arrays(state, images, labels, weights, indices, mask, spec):
    """Summed :func:`stats_fn` of every batch ``indices[s]`` in one ``lax.scan``; pure.
    ``weights`` is float32 ``[N]`` or None."""

    def batch_stats(idx, m):
        logits = predict_fn(state, images[idx])
        weight = None if weights is None else weights[idx]
        return stats_fn(logits, labels[idx], m, weight, spec=spec)

    def body(total, xs):
        return jax.tree.map(jnp.add, total, batch_stats(*xs)), None

    first = jax.eval_shape(batch_stats, indices[0], mask[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    return jax.lax.scan(body, zeros, (indices, mask))[0]


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


def num_classes(state: TrainState) -> int:
    """The width of the model's logits."""
    probe = jax.ShapeDtypeStruct((1, *state.input_shape), jnp.float32)
    return int(jax.eval_shape(predict_fn, state, probe).shape[-1])


def evaluate(
    state: TrainState,
    images: Any,
    labels: Any,
    metrics: Sequence[str] | str = ("loss", "accuracy"),
    *,
    sample_weight: Any = None,
    average: str | None = "macro",
    weighted_metrics: bool = True,
    batch_size: int = 1000,
    roc_bins: int = 4096,
    roc_range: float = 40.0,
) -> dict[str, Any]:
    """The ``metrics`` of ``state`` in inference mode on a whole array dataset.

    One jitted ``lax.scan`` over fixed-size batches (the last one padded and masked);
    every example counts exactly once.

    Args:
      state: a train state.
      images: uint8/float ``[N, H, W, C]``, numpy or device arrays.
      labels: int ``[N]`` in ``[0, num_classes)``.
      metrics: names from :data:`NAMES` (or a comma-separated string).
      sample_weight: float ``[N]``, finite and >= 0 (Keras's ``sample_weight``), or None.
        The loss becomes ``sum(w * loss) / N`` (Keras's ``sum_over_batch_size``) and, with
        ``weighted_metrics``, every count a sum of weights (see the module docstring).
      average: how ``precision``/``recall``/``f1`` average over classes (:func:`spec`).
      weighted_metrics: False weights the loss only (Keras's ``metrics=``).
      batch_size: examples per scan step.
      roc_bins, roc_range: the ``roc_auc`` histograms (see the module docstring).

    Returns:
      See :func:`compute`.

    Raises:
      ValueError: an unknown metric or average, labels outside the model's classes,
        mismatched sizes, a sample weight that is negative or not finite (named).
    """
    s = spec(metrics, roc_bins=roc_bins, roc_range=roc_range, average=average,
             weighted_metrics=weighted_metrics)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    check_labels(labels, num_classes(state))
    weights = None
    if sample_weight is not None:
        weights = jnp.asarray(check_sample_weight(sample_weight, len(labels)))
    plan = ep.epoch_plan(len(labels), min(batch_size, len(labels)))
    sums = _evaluate_arrays(
        state, jnp.asarray(images), jnp.asarray(labels, jnp.int32), weights,
        plan.indices(None), plan.mask, s,
    )
    return compute(sums, s)


__all__ = [
    "AVERAGES",
    "NAMES",
    "Spec",
    "average_scores",
    "check_labels",
    "check_sample_weight",
    "compute",
    "evaluate",
    "log_odds",
    "num_classes",
    "precision_recall_f1",
    "roc_auc_from_histograms",
    "spec",
    "stats_fn",
]
