"""A population's outputs once trained: the ensemble's predictions
(:func:`ensemble_predict`, the mean of the members' softmaxes; ``fc.evaluate(states, ...,
ensemble=True)`` and :func:`flaxconv.evaluation.ensemble_log_probs` are the evaluation
module's), the best member (:func:`best_member`) and a per-member table
(:func:`population_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxconv import metrics as metrics_lib
from flaxconv.population.members import num_members
from flaxconv.state import TrainState
from flaxconv.steps import predict_fn


def ensemble_predict_fn(states: TrainState, images: jax.Array) -> jax.Array:
    """The ensemble's class probabilities: the mean of the members' softmax; pure.

    Args:
      states: a population of K members.
      images: uint8/float ``[B, H, W, C]``, the same images for every member.

    Returns:
      float32 ``[B, C]``, ``mean_k softmax(logits_k)``; rows sum to 1. Inference mode.
    """
    num_members(states)
    logits = jax.vmap(predict_fn, in_axes=(0, None))(states, images)
    return jnp.mean(jax.nn.softmax(logits, -1), axis=0)


#: ``ensemble_predict(states, images) -> probs [B, C]``: jitted :func:`ensemble_predict_fn`.
ensemble_predict = jax.jit(ensemble_predict_fn)


# --------------------------------------------------------------------------- reporting


def _per_member(metrics: dict[str, Any]) -> dict[str, np.ndarray]:
    """``{"loss": [K], "accuracy": [K]}`` from summed or already finished metrics."""
    if "loss_sum" in metrics:
        metrics = metrics_lib.compute(metrics)
    if "accuracy" not in metrics or "loss" not in metrics:
        raise ValueError(
            f"metrics has keys {sorted(metrics)}; expected metric sums (loss_sum, correct, "
            "count) with a member axis, or finished loss and accuracy per member "
            "(fc.evaluate of a population)"
        )
    out = {k: np.atleast_1d(np.asarray(metrics[k], np.float64)) for k in ("loss", "accuracy")}
    if out["loss"].ndim != 1 or out["loss"].shape != out["accuracy"].shape:
        raise ValueError(
            f"loss has shape {out['loss'].shape} and accuracy {out['accuracy'].shape}; "
            "expected one value per member, [K] each"
        )
    return out


def best_member(metrics: dict[str, Any], by: str = "accuracy") -> int:
    """Index of the best member: highest ``accuracy`` or lowest ``loss``; ties → lowest index.

    ``metrics`` are per-member numbers (``fc.evaluate(states, ...)``) or metric sums with
    a member axis (``fc.train_step``'s, summed over steps).
    """
    if by not in ("accuracy", "loss"):
        raise ValueError(f"by={by!r}; expected 'accuracy' or 'loss'")
    values = _per_member(metrics)[by]
    # A diverged member (NaN loss) must never be "best"; argmin would pick it.
    values = np.where(np.isnan(values), -np.inf if by == "accuracy" else np.inf, values)
    return int(np.argmax(values) if by == "accuracy" else np.argmin(values))


def _std(x: np.ndarray) -> float:
    # The sample std (ddof=1): the members are a sample of what a seed/setting gives.
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def population_table(
    member_metrics: dict[str, Any],
    learning_rates: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
) -> str:
    """A printable per-member table and a ``mean ± std`` line over the members.

    Args:
      member_metrics: per-member numbers (``fc.evaluate(states, ...)``: ``loss`` and
        ``accuracy``, ``[K]`` each) or metric sums with a member axis.
      learning_rates, seeds: K values each, shown per member (``-`` when None).

    Returns:
      A string such as::

        member  seed  learning_rate    loss  accuracy
             0     0       1.00e-03  0.0412   98.71%
             1     1       1.00e-03  0.0398   98.80% *
        mean ± std over 2 members: loss 0.0405 ± 0.0010, accuracy 98.76% ± 0.06%

      ``*`` marks :func:`best_member`; the std is the sample std (0 for one member).
    """
    m = _per_member(member_metrics)
    k = len(m["loss"])
    columns = {"learning_rates": learning_rates, "seeds": seeds}
    for name, values in columns.items():
        if values is not None and len(values) != k:
            raise ValueError(f"{name} has {len(values)} entries for {k} members; expected {k}")
    best = best_member(m)
    lines = [f"{'member':>6}  {'seed':>4}  {'learning_rate':>13}  {'loss':>7}  {'accuracy':>8}"]
    for i in range(k):
        seed = "-" if seeds is None else str(seeds[i])
        lr = "-" if learning_rates is None else f"{float(learning_rates[i]):.2e}"
        mark = " *" if i == best and k > 1 else ""
        lines.append(
            f"{i:>6}  {seed:>4}  {lr:>13}  {m['loss'][i]:>7.4f}  "
            f"{100 * m['accuracy'][i]:>7.2f}%{mark}"
        )
    acc = 100 * m["accuracy"]
    lines.append(
        f"mean ± std over {k} member{'s' if k != 1 else ''}: "
        f"loss {np.mean(m['loss']):.4f} ± {_std(m['loss']):.4f}, "
        f"accuracy {np.mean(acc):.2f}% ± {_std(acc):.2f}%"
    )
    return "\n".join(lines)
