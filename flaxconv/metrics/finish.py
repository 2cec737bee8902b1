"""The one finisher: :func:`compute` turns summed statistics into the metrics (host side).

It takes the sums of :func:`flaxconv.metrics.stats_fn` (what
:func:`flaxconv.evaluation.evaluate_sums` returns) and those of ``fc.train_step`` and
``fc.eval_step``, for one model or a population (a leading member axis), and returns
plain floats and numpy arrays. Precision, recall and F1 come exactly from the confusion
matrix (:func:`_precision_recall_f1`, averaged as scikit-learn does); the ROC AUC and its
error bound from the score histograms (:func:`roc_auc_from_histograms`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from flaxconv.metrics.vocabulary import AVERAGES, Spec, canonical, score_average, spec, top_k_of

_SCORES = ("precision", "recall", "f1")  # the keys of _precision_recall_f1


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
        kind, k, score = canonical(name), top_k_of(name), score_average(name)
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


_LOSS_ACCURACY = spec(("loss", "accuracy"))
