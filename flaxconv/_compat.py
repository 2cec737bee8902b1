"""The previous release's names, kept one release as deprecated aliases, in one place.

Each entry of :data:`ALIASES` maps a module and an old name to ``(new, getter)``: ``new``
says what to use instead and ``getter`` returns the object the old name now stands for.
``flaxconv/__init__`` calls :func:`install` last, which gives each of those modules a
``__getattr__`` (PEP 562) that warns and forwards. So no module imports another for the
sake of an old name (no import cycle), and the next release deletes this file and that one
call. The old raw-sum evaluations live here too: they run through the one engine,
:mod:`flaxconv.evaluation`, and give the old keys.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flaxconv import epochs as ep
from flaxconv import evaluation, finetune, metrics, parallel, population
from flaxconv.metrics import finish

Aliases = dict[str, tuple[str, Callable[[], Any]]]

_LOSS_ACCURACY = metrics.spec(("loss", "accuracy"))


def _legacy_sums(stats: dict[str, jax.Array], confusion: bool = True) -> dict[str, jax.Array]:
    """``{"loss_sum", "correct", "count", "invalid_labels", "confusion"}`` (float32) from
    :func:`~flaxconv.evaluation.evaluate_sums_fn` statistics: eval_step's keys."""
    matrix = stats["confusion"].astype(jnp.float32)
    count = stats["count"].astype(jnp.float32)
    out = {
        "loss_sum": stats["loss_sum"],
        "correct": jnp.trace(matrix, axis1=-2, axis2=-1),
        "count": count,
    }
    if confusion:
        out.update(invalid_labels=jnp.zeros_like(count), confusion=matrix)
    return out


def _legacy_sums_fn(state, images, labels, indices, mask):
    """The old ``flaxconv.epochs.evaluate_fn``: eval_step's metric sums over all batches."""
    return _legacy_sums(evaluation.evaluate_sums_fn(state, images, labels, indices, mask,
                                                    spec=_LOSS_ACCURACY))


def _legacy_ensemble_sums_fn(states, images, labels, indices, mask):
    """The old ``flaxconv.population.ensemble_evaluate_fn``: loss_sum, correct, count."""
    stats = evaluation.evaluate_sums_fn(states, images, labels, indices, mask,
                                        spec=_LOSS_ACCURACY, ensemble=True)
    return _legacy_sums(stats, confusion=False)


_legacy_sums_jit = jax.jit(_legacy_sums_fn)
_legacy_ensemble_sums_jit = jax.jit(_legacy_ensemble_sums_fn)


def _legacy_evaluate(state, images, labels, batch_size: int = 1000, *, ensemble: bool = False):
    """The old raw-sum ``evaluate``s (``fc.epochs.evaluate``, ``evaluate_population``,
    ``ensemble_evaluate``) on a whole array dataset, through the engine."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    metrics.check_labels(labels, metrics.model_classes(state))
    plan = ep.epoch_plan(len(labels), min(batch_size, len(labels)))
    fn = _legacy_ensemble_sums_jit if ensemble else _legacy_sums_jit
    return fn(state, jnp.asarray(images), jnp.asarray(labels, jnp.int32), plan.indices(None),
              plan.mask)


def _evaluate_population(states, images, labels, batch_size: int = 500):
    """The old raw-sum evaluation of each member: eval_step's sums with a member axis."""
    population.num_members(states)
    return _legacy_evaluate(states, images, labels, batch_size)


def _ensemble_evaluate(states, images, labels, batch_size: int = 500):
    """The old raw-sum evaluation of the ensemble: ``loss_sum``, ``correct``, ``count``."""
    population.num_members(states)
    return _legacy_evaluate(states, images, labels, batch_size, ensemble=True)


def _summarize(sums: dict[str, Any]) -> dict[str, Any]:
    """The old ``fc.summarize``: ``{"loss", "accuracy"}`` of summed step metrics (floats,
    or ``[K]`` arrays with a member axis), through :func:`flaxconv.metrics.compute`.
    Numbers already finished (``fc.evaluate``'s, which used to return sums) pass through."""
    out = sums if "loss_sum" not in sums and "correct" not in sums else metrics.compute(sums)
    return {"loss": out["loss"], "accuracy": out["accuracy"]}


def _parallel_epoch_plan(num_examples, batch_size, mesh=None, drop_remainder=False,
                         axis=parallel.DATA):
    """The old ``flaxconv.parallel.epoch_plan``: a data-parallel plan on the data mesh."""
    mesh = parallel.data_mesh() if mesh is None else mesh
    return ep.epoch_plan(num_examples, batch_size, drop_remainder, mesh=mesh, axis=axis)


_SUMMARIZE = ("flaxconv.metrics.compute(sums) (or fc.evaluate for a dataset); fc.summary is "
              "the model table", lambda: _summarize)
_EVALUATE_POPULATION = ("fc.evaluate(states, images, labels) (finished numbers per member)",
                        lambda: _evaluate_population)
_ENSEMBLE_EVALUATE = ("fc.evaluate(states, images, labels, ensemble=True)",
                      lambda: _ensemble_evaluate)

#: module -> {old name: (what to use instead, the object the old name stands for)}.
ALIASES: dict[str, Aliases] = {
    "flaxconv": {
        "summarize": _SUMMARIZE,
        "evaluate_population": _EVALUATE_POPULATION,
        "ensemble_evaluate": _ENSEMBLE_EVALUATE,
    },
    "flaxconv.steps": {"summarize": _SUMMARIZE},
    "flaxconv.metrics": {
        "evaluate": ("fc.evaluate (flaxconv.evaluation.evaluate)", lambda: evaluation.evaluate),
        "num_classes": ("flaxconv.metrics.model_classes (flaxconv.data.num_classes is a "
                        "dataset's)", lambda: metrics.model_classes),
        "average_scores": ("flaxconv.metrics.compute (names such as 'f1_score_micro')",
                           lambda: finish._average_scores),
        "precision_recall_f1": ("flaxconv.metrics.compute (the '<name>_per_class' arrays)",
                                lambda: finish._precision_recall_f1),
    },
    "flaxconv.epochs": {
        "evaluate": ("fc.evaluate (finished numbers; flaxconv.evaluation.evaluate_sums for "
                     "the sums)", lambda: _legacy_evaluate),
        "evaluate_fn": ("flaxconv.evaluation.evaluate_sums_fn", lambda: _legacy_sums_fn),
        "evaluate_arrays": ("flaxconv.evaluation.evaluate_sums", lambda: _legacy_sums_jit),
    },
    "flaxconv.population": {
        "evaluate_population": _EVALUATE_POPULATION,
        "ensemble_evaluate": _ENSEMBLE_EVALUATE,
        "ensemble_evaluate_fn": ("flaxconv.evaluation.evaluate_sums_fn(..., ensemble=True)",
                                 lambda: _legacy_ensemble_sums_fn),
        "replicate": ("flaxconv.population.replicate_data (flaxconv.parallel.replicate "
                      "defaults to the data mesh)", lambda: population.replicate_data),
    },
    "flaxconv.finetune": {
        "freeze": ("flaxconv.finetune.freeze_state (flaxconv.optim.freeze wraps an "
                   "optimizer)", lambda: finetune.freeze_state),
    },
    "flaxconv.fit": {
        "data_order_key": ("flaxconv.epochs.data_order_key (or flaxconv.epochs.order_seed)",
                           lambda: ep.data_order_key),
    },
    "flaxconv.parallel": {
        "DataParallelPlan": ("flaxconv.epochs.DataParallelPlan", lambda: ep.DataParallelPlan),
        "epoch_plan": ("flaxconv.epochs.epoch_plan(..., mesh=mesh)",
                       lambda: _parallel_epoch_plan),
        "place_for_fit": ("flaxconv.epochs.place_for_fit", lambda: ep.place_for_fit),
    },
}


def resolve(module: str, name: str, aliases: Aliases) -> Any:
    """The object behind the deprecated ``module.name``, after a ``DeprecationWarning``
    naming its replacement; ``AttributeError`` (as Python's own) for any other name."""
    if name not in aliases:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new, getter = aliases[name]
    warnings.warn(
        f"{module}.{name} is deprecated and will be removed in the next release; "
        f"use {new}", DeprecationWarning, stacklevel=3,
    )
    return getter()


def module_getattr(module: str, aliases: Aliases) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` that resolves ``module``'s deprecated ``aliases``."""

    def __getattr__(name: str) -> Any:
        return resolve(module, name, aliases)

    return __getattr__


def install() -> None:
    """Gives every module of :data:`ALIASES` its ``__getattr__`` (run once, at import)."""
    for module, aliases in ALIASES.items():
        sys.modules[module].__getattr__ = module_getattr(module, aliases)
