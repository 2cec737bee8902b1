"""Dataset-level classification metrics from summable per-batch statistics.

Every metric here is a function of integer counts that add up over batches, so a dataset's
numbers are the same however it is split into batches (padding rows masked out):

* the confusion matrix ``[C, C]`` (rows: true class, columns: argmax prediction) gives
  ``accuracy``, and per-class and macro ``precision``, ``recall`` and ``f1`` exactly;
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

>>> numbers = fc.metrics.evaluate(state, test_images, test_labels,
...                               ("accuracy", "top_5", "precision", "recall", "f1",
...                                "roc_auc", "confusion"))
>>> numbers["f1"], numbers["f1_per_class"], numbers["confusion"]

In a loop of one's own: ``s = spec(names)``, sum ``stats_fn(logits, labels, mask, spec=s)``
over batches (it jits, scans and vmaps), then ``compute(sums, s)``.
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

#: The metric names :func:`spec` accepts; ``top_<k>`` for any k >= 1.
NAMES = ("loss", "accuracy", "top_<k>", "precision", "recall", "f1", "roc_auc", "confusion")
_FIXED = set(NAMES) - {"top_<k>"}


class Spec(NamedTuple):
    """What :func:`stats_fn` counts and :func:`compute` reports (hashable: a static arg)."""

    names: tuple[str, ...]
    top_k: tuple[int, ...]
    roc_bins: int
    roc_range: float


def spec(
    metrics: Sequence[str] | str = ("loss", "accuracy"),
    *,
    roc_bins: int = 4096,
    roc_range: float = 40.0,
) -> Spec:
    """Checks metric names and returns their :class:`Spec`.

    Args:
      metrics: names from :data:`NAMES`, or one comma-separated string
        (``"accuracy,top_5,f1"``).
      roc_bins: histogram bins per class for ``roc_auc``.
      roc_range: the bins cover log-odds in ``[-roc_range, roc_range]``.

    Raises:
      ValueError: an unknown name (naming the valid ones) or a bad bin setting.
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
    bins = roc_bins if "roc_auc" in names else 0
    return Spec(tuple(names), tuple(sorted(set(top_k))), bins, float(roc_range))


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
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *, spec: Spec
) -> dict[str, jax.Array]:
    """Summable statistics of one batch; pure (jit with ``spec`` static, scan, vmap).

    Args:
      logits: float ``[B, C]``.
      labels: int ``[B]`` in ``[0, C)`` (not checked here: see :func:`check_labels`).
      mask: ``[B]``, zero/False for padding rows; all rows count when None.
      spec: from :func:`spec`.

    Returns:
      ``count`` int32, ``loss_sum`` float32, ``confusion`` int32 ``[C, C]``, ``top_k``
      int32 ``[len(spec.top_k)]`` (correct counts), and with ``roc_auc`` ``roc_pos`` and
      ``roc_neg`` int32 ``[C, roc_bins]`` (score histograms of each class's positives and
      negatives).
    """
    logits = logits.astype(jnp.float32)
    batch, classes = logits.shape
    labels = labels.astype(jnp.int32)
    weight = jnp.ones((batch,), jnp.int32) if mask is None else (mask > 0).astype(jnp.int32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    pred = jnp.argmax(logits, -1)
    out = {
        "count": jnp.sum(weight),
        "loss_sum": jnp.sum(losses * weight),
        "confusion": jnp.zeros((classes, classes), jnp.int32).at[labels, pred].add(weight),
    }
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)  # logits strictly above the label's
    ks = jnp.asarray(spec.top_k, jnp.int32)
    out["top_k"] = jnp.sum((rank[:, None] < ks[None, :]) * weight[:, None], axis=0)
    if spec.roc_bins:
        scale = spec.roc_bins / (2.0 * spec.roc_range)
        position = jnp.floor((log_odds(logits) + spec.roc_range) * scale)
        bins = jnp.clip(position, 0, spec.roc_bins - 1).astype(jnp.int32)  # [B, C]
        rows = jnp.broadcast_to(jnp.arange(classes), (batch, classes))
        positive = (labels[:, None] == rows).astype(jnp.int32) * weight[:, None]
        negative = (1 - positive) * weight[:, None]
        zeros = jnp.zeros((classes, spec.roc_bins), jnp.int32)
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
    ``accuracy``, ``top_<k>``; ``precision``/``recall``/``f1`` (macro) with
    ``<name>_per_class`` ``[C]``; ``roc_auc`` (macro over classes with positives and
    negatives) with ``roc_auc_per_class`` ``[C]`` (NaN where undefined) and
    ``roc_auc_max_error``; ``confusion`` int64 ``[C, C]``; and always ``count``.
    """
    sums = jax.device_get(sums)
    count = int(sums["count"])
    n = max(count, 1)
    confusion = np.asarray(sums["confusion"], np.int64)
    out: dict[str, Any] = {"count": count}
    scores = precision_recall_f1(confusion)
    for name in spec.names:
        if name == "loss":
            out["loss"] = float(sums["loss_sum"]) / n
        elif name == "accuracy":
            out["accuracy"] = float(np.trace(confusion)) / n
        elif name.startswith("top_"):
            out[name] = float(sums["top_k"][spec.top_k.index(int(name[4:]))]) / n
        elif name in ("precision", "recall", "f1"):
            present = scores["present"]
            out[name] = float(scores[name][present].mean()) if present.any() else 0.0
            out[f"{name}_per_class"] = scores[name]
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
def _evaluate_arrays(state, images, labels, indices, mask, spec):
    def batch_stats(batch):
        logits = predict_fn(state, batch["image"])
        return stats_fn(logits, batch["label"], batch["mask"], spec=spec)

    return ep.sum_over_batches(batch_stats, images, labels, indices, mask)


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
      batch_size: examples per scan step.
      roc_bins, roc_range: the ``roc_auc`` histograms (see the module docstring).

    Returns:
      See :func:`compute`.

    Raises:
      ValueError: an unknown metric, labels outside the model's classes, mismatched sizes.
    """
    s = spec(metrics, roc_bins=roc_bins, roc_range=roc_range)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    check_labels(labels, num_classes(state))
    plan = ep.epoch_plan(len(labels), min(batch_size, len(labels)))
    sums = _evaluate_arrays(
        state, jnp.asarray(images), jnp.asarray(labels, jnp.int32), plan.indices(None),
        plan.mask, s,
    )
    return compute(sums, s)


__all__ = [
    "NAMES",
    "Spec",
    "check_labels",
    "compute",
    "evaluate",
    "log_odds",
    "num_classes",
    "precision_recall_f1",
    "roc_auc_from_histograms",
    "spec",
    "stats_fn",
]
