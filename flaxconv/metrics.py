"""The metric vocabulary: summable per-batch statistics and the one finisher.

Every metric here is a function of integer counts that add up over batches, so a dataset's
numbers are the same however it is split into batches (padding rows masked out). The names
are Keras's (``model.compile(metrics=[...])``); the older names stay accepted as aliases
and are reported under the name asked for:

* the confusion matrix ``[C, C]`` (rows: true class, columns: argmax prediction) gives
  ``accuracy``, and per-class, macro, micro and support-weighted ``precision``, ``recall``
  and ``f1_score`` (alias ``f1``) exactly (see :func:`compute`);
* ``top_<k>`` counts the examples whose label is among the ``k`` largest logits (a label
  tied with the k-th logit counts as inside), exactly; Keras's
  ``sparse_top_k_categorical_accuracy`` is ``top_5``;
* ``auc`` (alias ``roc_auc``; one-vs-rest ROC per class, macro mean) comes from per-class
  histograms of the
  scores of positives and negatives, ``roc_bins`` bins over the log-odds
  ``log p_c - log(1 - p_c)`` in ``[-roc_range, roc_range]`` (clipped at the ends). The
  log-odds are a monotone function of the softmax probability, so the AUC of either score
  is the same number; binning them spreads out the probabilities that crowd near 0 and 1.
  Pairs of a positive and a negative in different bins are ordered exactly; a pair in the
  same bin is counted as a tie (1/2), so the error is at most half the fraction of pairs
  that share a bin. That bound is computed from the same histograms and returned as
  ``auc_max_error`` (typically < 1e-3 at the default 4096 bins).
* ``loss`` is the mean softmax cross-entropy (a float sum: split-independent up to
  float rounding).

Sample weights (Keras's ``sample_weight``, fractional, >= 0) turn the counts into weighted
sums: each example adds its weight instead of 1 to the confusion matrix, the top-k counts and
the ROC histograms (Keras's ``weighted_metrics``, scikit-learn's ``sample_weight``), and the
loss is Keras's ``sum_over_batch_size`` reduction, ``sum(w * loss) / N``.

>>> numbers = fc.evaluate(state, test_images, test_labels,
...                       ("accuracy", "top_5", "precision", "recall", "f1_score", "auc",
...                        "confusion"))
>>> numbers["f1_score"], numbers["f1_score_per_class"], numbers["confusion"]

:func:`flaxconv.evaluation.evaluate` (``fc.evaluate``, also ``fc.metrics.evaluate``) is the
engine that runs these over a dataset. In a loop of one's own: ``s = spec(names)``, sum
``stats_fn(logits, labels, mask, spec=s)`` (or ``stats_fn(logits, labels, mask, weight,
spec=s)``) over batches (it jits, scans and vmaps), then ``compute(sums, s)``.
:func:`compute` also finishes the sums of ``fc.train_step``/``fc.eval_step``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxconv import _deprecation
from flaxconv.state import TrainState
from flaxconv.steps import predict_fn

#: The metric names :func:`spec` accepts (Keras's); ``top_<k>`` for any k >= 1, and
#: ``precision``, ``recall``, ``f1_score`` with an average in the name (``f1_score_weighted``,
#: ``recall_micro``, ...).
NAMES = ("loss", "accuracy", "top_<k>", "sparse_top_k_categorical_accuracy", "precision",
         "recall", "f1_score", "<precision|recall|f1_score>_<macro|micro|weighted>", "auc",
         "confusion")
#: Older names, still accepted and reported under the name given: name -> Keras's name.
ALIASES = {"f1": "f1_score", "roc_auc": "auc"}
#: Keras's name for ``top_5`` (``keras.metrics.SparseTopKCategoricalAccuracy``'s default k).
_KERAS_TOP_K = {"sparse_top_k_categorical_accuracy": 5}
_SCORES = ("precision", "recall", "f1")  # the keys of _precision_recall_f1
_SCORE_OF = {"precision": "precision", "recall": "recall", "f1_score": "f1", "f1": "f1"}
#: What ``average`` may be: scikit-learn's and Keras's ``F1Score``'s choices.
AVERAGES = ("macro", "micro", "weighted", None)
_FIXED = {"loss", "accuracy", *_SCORE_OF, "auc", "roc_auc", "confusion", *_KERAS_TOP_K} | {
    f"{score}_{average}" for score in _SCORE_OF for average in AVERAGES if average
}


def _canonical(name: str) -> str:
    """``name`` in Keras's vocabulary (``f1`` -> ``f1_score``, ``roc_auc`` -> ``auc``)."""
    return ALIASES.get(name, name)


def _top_k_of(name: str) -> int | None:
    """The k of ``top_<k>`` or ``sparse_top_k_categorical_accuracy``; None otherwise."""
    if name in _KERAS_TOP_K:
        return _KERAS_TOP_K[name]
    match = re.fullmatch(r"top_(\d+)", name)
    return int(match[1]) if match and int(match[1]) >= 1 else None


def _score_average(name: str) -> tuple[str, str | None] | None:
    """``(score, average)`` for a precision/recall/F1 name (``f1_score_micro`` ->
    ``("f1", "micro")``; a plain name has average None); None for other names."""
    for prefix, score in _SCORE_OF.items():
        if name == prefix:
            return score, None
        if name.startswith(prefix + "_") and name[len(prefix) + 1:] in AVERAGES:
            return score, name[len(prefix) + 1:]
    return None


class Spec(NamedTuple):
    """What :func:`stats_fn` counts and :func:`compute` reports (hashable: a static arg).

    ``average`` is how the plain names ``precision``/``recall``/``f1_score`` average over
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
        (``"accuracy,top_5,f1_score"``).
      roc_bins: histogram bins per class for ``auc``.
      roc_range: the bins cover log-odds in ``[-roc_range, roc_range]``.
      average: what ``precision``, ``recall`` and ``f1_score`` report: ``"macro"``, ``"micro"``,
        ``"weighted"`` (a float) or None (the per-class array); the averages are scikit-learn's.
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
        k = _top_k_of(name)
        if k is not None:
            top_k.append(k)
        elif name not in _FIXED:
            raise ValueError(
                f"unknown metric {name!r}; expected some of {list(NAMES)} (or the older "
                f"names {sorted(ALIASES)})"
            )
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
    bins = roc_bins if any(_canonical(n) == "auc" for n in names) else 0
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


def _precision_recall_f1(confusion: Any) -> dict[str, np.ndarray]:
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


def _average_scores(confusion: Any, average: str | None = "macro") -> dict[str, Any]:
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
        * None: the per-class float64 ``[C]`` arrays of :func:`_precision_recall_f1`.

    Returns:
      ``{"precision", "recall", "f1"}``: floats (0.0 when nothing counts), or arrays for
      ``average=None``.
    """
    if average not in AVERAGES:
        raise ValueError(f"average={average!r}; expected one of {list(AVERAGES)}")
    scores = _precision_recall_f1(confusion)
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


def compute(sums: dict[str, Any], spec: Spec | None = None) -> dict[str, Any]:
    """The metrics named in ``spec`` from summed statistics (host side): the one finisher.

    Args:
      sums: summed :func:`stats_fn` statistics (:func:`flaxconv.evaluation.evaluate_sums`),
        or summed ``fc.train_step``/``fc.eval_step`` metrics (``loss_sum``, ``correct``,
        ``count``, eval_step's ``confusion``). A leading member axis (``count`` of shape
        ``[K]``: a population) gives every value that axis.
      spec: from :func:`spec`; None reports ``loss`` and ``accuracy``.

    Returns:
      Plain Python floats for scalars and numpy arrays otherwise, under the names asked
      for: ``loss``, ``accuracy``, ``top_<k>``; ``precision``/``recall``/``f1_score``
      (``spec.average``: macro by default) with ``<name>_per_class`` ``[C]``, and
      ``<name>_<average>`` as named; ``auc`` (macro over classes with positives and
      negatives) with ``auc_per_class`` ``[C]`` (NaN where undefined) and
      ``auc_max_error``; ``confusion`` ``[C, C]`` (int64, or float64 weighted sums); and
      always ``count``. For a population, each is stacked over members (float64 ``[K]``
      for a scalar).

      With weighted counts (``weight_sum`` in ``sums``) accuracy and top-k are fractions of
      the total weight; ``loss`` is always ``loss_sum / count`` (Keras's
      ``sum_over_batch_size``).

    Raises:
      ValueError: ``sums`` lack what a metric needs (train_step's sums hold no confusion
        matrix), or have more than one leading axis.
    """
    spec = _LOSS_ACCURACY if spec is None else spec
    sums = jax.device_get(sums)
    members = np.ndim(sums["count"])
    if members > 1:
        raise ValueError(
            f"sums['count'] has shape {np.shape(sums['count'])}; expected [] (one model) or "
            "[K] (a population): sum over steps first"
        )
    if members == 1:
        per_member = [compute(jax.tree.map(lambda x, i=i: x[i], sums), spec)
                      for i in range(len(sums["count"]))]
        return {key: np.stack([m[key] for m in per_member]) for key in per_member[0]}
    count = int(sums["count"])
    weighted = "weight_sum" in sums
    n = float(sums["weight_sum"]) if weighted else max(count, 1)
    n = n if n > 0 else 1.0  # nothing counted: the ratios are 0
    out: dict[str, Any] = {"count": count}
    if "confusion" not in sums:
        needs = [name for name in spec.names if name not in ("loss", "accuracy")]
        if needs or "correct" not in sums:
            raise ValueError(
                f"sums have keys {sorted(sums)}: no confusion matrix for {needs or ['accuracy']}; "
                "expected the statistics of flaxconv.evaluation.evaluate_sums or eval_step"
            )
        for name in spec.names:
            total = sums["loss_sum"] if name == "loss" else sums["correct"]
            out[name] = float(total) / max(count, 1)
        return out
    confusion = np.asarray(sums["confusion"], np.float64 if weighted else np.int64)
    per_class = _precision_recall_f1(confusion)
    for name in spec.names:
        kind, k, score = _canonical(name), _top_k_of(name), _score_average(name)
        if kind == "loss":
            out[name] = float(sums["loss_sum"]) / max(count, 1)
        elif kind == "accuracy":
            out[name] = float(np.trace(confusion)) / n
        elif k is not None:
            out[name] = float(sums["top_k"][spec.top_k.index(k)]) / n
        elif score is not None:
            score_name, average = score
            base = name if average is None else name[: -len(average) - 1]
            out[name] = _average_scores(confusion, average or spec.average)[score_name]
            out[f"{base}_per_class"] = per_class[score_name]
        elif kind == "auc":
            auc, error = roc_auc_from_histograms(sums["roc_pos"], sums["roc_neg"])
            defined = ~np.isnan(auc)
            out[name] = float(auc[defined].mean()) if defined.any() else float("nan")
            out[f"{name}_per_class"] = auc
            out[f"{name}_max_error"] = (
                float(error[defined].mean()) if defined.any() else float("nan")
            )
        elif kind == "confusion":
            out["confusion"] = confusion
    return out


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


def _summarize(sums: dict[str, Any]) -> dict[str, Any]:
    """The old ``fc.summarize``: ``{"loss", "accuracy"}`` of summed step metrics (floats,
    or ``[K]`` arrays with a member axis), through :func:`compute`. Numbers already
    finished (``fc.evaluate``'s, which used to return sums) pass through."""
    out = sums if "loss_sum" not in sums and "correct" not in sums else compute(sums)
    return {"loss": out["loss"], "accuracy": out["accuracy"]}


def model_classes(state: TrainState) -> int:
    """The width of the model's logits (a population's members share it)."""
    probe = jax.ShapeDtypeStruct((1, *state.input_shape), jnp.float32)
    forward = jax.vmap(predict_fn, in_axes=(0, None)) if np.ndim(state.step) == 1 else predict_fn
    return int(jax.eval_shape(forward, state, probe).shape[-1])


_LOSS_ACCURACY = spec(("loss", "accuracy"))

_DEPRECATED: _deprecation.Aliases = {
    "num_classes": ("flaxconv.metrics.model_classes (flaxconv.data.num_classes is a "
                    "dataset's)", lambda: model_classes),
    # Helpers of compute, private now; kept one release.
    "average_scores": ("flaxconv.metrics.compute (names such as 'f1_score_micro')",
                       lambda: _average_scores),
    "precision_recall_f1": ("flaxconv.metrics.compute (the '<name>_per_class' arrays)",
                            lambda: _precision_recall_f1),
}


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        # The engine that runs this vocabulary is fc.metrics.evaluate too (one object, not
        # a copy); looked up on use because flaxconv.evaluation imports this module.
        return importlib.import_module("flaxconv.evaluation").evaluate
    return _deprecation.resolve(__name__, name, _DEPRECATED)


__all__ = [
    "ALIASES",
    "AVERAGES",
    "NAMES",
    "Spec",
    "check_labels",
    "check_sample_weight",
    "compute",
    "log_odds",
    "model_classes",
    "roc_auc_from_histograms",
    "spec",
    "stats_fn",
]
