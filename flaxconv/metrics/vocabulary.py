"""The metric vocabulary: the names :func:`spec` accepts and the :class:`Spec` they make.

The names are Keras's (``model.compile(metrics=[...])``): ``loss``, ``accuracy``,
``top_<k>`` (``sparse_top_k_categorical_accuracy`` is ``top_5``), ``precision``,
``recall`` and ``f1_score`` (plain, or with an average in the name: ``f1_score_micro``),
``auc`` and ``confusion``; the older names in :data:`ALIASES` stay accepted and are
reported under the name asked for. A :class:`Spec` is hashable: it is the static argument
that tells :func:`flaxconv.metrics.stats_fn` what to count and
:func:`flaxconv.metrics.compute` what to report. Plain Python, no arrays.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

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
# name -> its key in the per-class scores of flaxconv.metrics.finish._precision_recall_f1
_SCORE_OF = {"precision": "precision", "recall": "recall", "f1_score": "f1", "f1": "f1"}
#: What ``average`` may be: scikit-learn's and Keras's ``F1Score``'s choices.
AVERAGES = ("macro", "micro", "weighted", None)
_FIXED = {"loss", "accuracy", *_SCORE_OF, "auc", "roc_auc", "confusion", *_KERAS_TOP_K} | {
    f"{score}_{average}" for score in _SCORE_OF for average in AVERAGES if average
}


def canonical(name: str) -> str:
    """``name`` in Keras's vocabulary (``f1`` -> ``f1_score``, ``roc_auc`` -> ``auc``)."""
    return ALIASES.get(name, name)


def top_k_of(name: str) -> int | None:
    """The k of ``top_<k>`` or ``sparse_top_k_categorical_accuracy``; None otherwise."""
    if name in _KERAS_TOP_K:
        return _KERAS_TOP_K[name]
    match = re.fullmatch(r"top_(\d+)", name)
    return int(match[1]) if match and int(match[1]) >= 1 else None


def score_average(name: str) -> tuple[str, str | None] | None:
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
        k = top_k_of(name)
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
    bins = roc_bins if any(canonical(n) == "auc" for n in names) else 0
    return Spec(tuple(names), tuple(sorted(set(top_k))), bins, float(roc_range), average,
                weighted_metrics)
