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

:func:`flaxconv.evaluation.evaluate` (``fc.evaluate``; ``fc.metrics.evaluate`` is deprecated) is the
engine that runs these over a dataset. In a loop of one's own: ``s = spec(names)``, sum
``stats_fn(logits, labels, mask, spec=s)`` (or ``stats_fn(logits, labels, mask, weight,
spec=s)``) over batches (it jits, scans and vmaps), then ``compute(sums, s)``.
:func:`compute` also finishes the sums of ``fc.train_step``/``fc.eval_step``.

Three parts, all reached as ``flaxconv.metrics.<name>``: the names and :class:`Spec`
(:mod:`flaxconv.metrics.vocabulary`), the per-batch statistics and the checks of their
inputs (:mod:`flaxconv.metrics.statistics`), and the finisher :func:`compute`
(:mod:`flaxconv.metrics.finish`).
"""

from __future__ import annotations

from flaxconv.metrics.finish import (
    compute,
    roc_auc_from_histograms,
)
from flaxconv.metrics.statistics import (
    check_labels,
    check_sample_weight,
    log_odds,
    model_classes,
    stats_fn,
)
from flaxconv.metrics.vocabulary import ALIASES, AVERAGES, NAMES, Spec, spec

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
