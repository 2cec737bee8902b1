"""What :func:`flaxconv.fit` accepts, in Keras's conventions, turned into what its loop runs:
``(images, labels[, sample_weight])`` arrays checked, ``validation_split``'s cut,
``class_weight`` as a per-class vector, the per-epoch validation function, and whether a
streaming ``train_data`` can skip batches (a ``start`` parameter)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxconv import epochs as ep
from flaxconv import metrics as metrics_lib
from flaxconv.evaluation import evaluate_sums
from flaxconv.state import TrainState

ArrayData = tuple[Any, Any]


def as_arrays(data: ArrayData, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise TypeError(f"{what} must be (images, labels) arrays; got {type(data).__name__}")
    images, labels = data
    if len(images) != len(labels):
        raise ValueError(f"{what}: {len(images)} images but {len(labels)} labels")
    return images, labels


def weighted_arrays(data: Any, what: str) -> tuple[Any, Any, np.ndarray | None]:
    """``(images, labels)`` or Keras's ``(images, labels, sample_weight)`` as
    ``(images, labels, float32 weights or None)``, checked."""
    if isinstance(data, tuple | list) and len(data) == 3:
        images, labels = as_arrays(data[:2], what)
        if data[2] is None:
            return images, labels, None
        weights = metrics_lib.check_sample_weight(data[2], len(labels), f"{what}[2] (weights)")
        return images, labels, weights
    return (*as_arrays(data, what), None)


def validation_split_arrays(arrays: tuple[Any, ...], fraction: float
                            ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Keras's validation_split: every array of ``arrays`` (None stays None) cut at
    ``floor(N * (1 - fraction))`` into the first and the last part, unshuffled, with
    Keras's own expression (``keras...array_slicing.train_validation_split``)."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float | np.floating) or not (
        0.0 < fraction < 1.0
    ):
        raise ValueError(f"validation_split={fraction!r}; expected a fraction in (0, 1)")
    n = len(arrays[1])
    cut = int(math.floor(n * (1.0 - fraction)))
    if cut == 0 or cut == n:
        raise ValueError(
            f"validation_split={fraction} of {n} examples leaves an empty split "
            f"({cut} for training)"
        )
    return (tuple(None if a is None else a[:cut] for a in arrays),
            tuple(None if a is None else a[cut:] for a in arrays))


def class_weight_vector(class_weight: Any, classes: int) -> np.ndarray:
    """Keras's ``class_weight`` (a dict class id -> weight; absent classes weigh 1.0) as
    float32 ``[classes]``: example ``i`` weighs ``vector[labels[i]]``, multiplying its loss.
    Unlike Keras, a key outside ``[0, classes)`` or a weight that is negative or not
    finite is an error naming it (Keras ignores the one and trains on the other)."""
    if not isinstance(class_weight, dict):
        raise TypeError(
            f"class_weight is a {type(class_weight).__name__}; expected a dict class id -> weight"
        )
    vector = np.ones(classes, np.float32)
    for key, value in class_weight.items():
        if isinstance(key, bool) or not isinstance(key, int | np.integer) or not (
            0 <= key < classes
        ):
            raise ValueError(
                f"class_weight has the key {key!r}; expected class ids in [0, {classes})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not (
            np.isfinite(value) and value >= 0
        ):
            raise ValueError(
                f"class_weight[{key}]={value!r}; expected a finite number >= 0"
            )
        vector[int(key)] = value
    return vector


def validation_fn(data: tuple[Any, Any], weights: np.ndarray | None, spec: metrics_lib.Spec,
                batch_size: Any) -> Callable[[TrainState], dict[str, Any]]:
    """fit's per-epoch validation: ``fc.evaluate``'s engine with the checks done once (by
    the caller) and the arrays put on the device once, so each epoch's validation is one
    jitted :data:`flaxconv.evaluation.evaluate_sums` and its :func:`metrics.compute`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or (
        batch_size <= 0
    ):
        raise ValueError(f"eval_batch_size={batch_size!r}; expected a positive integer")
    images, labels = data
    plan = ep.epoch_plan(len(labels), min(int(batch_size), len(labels)))
    arrays = (jnp.asarray(images), jnp.asarray(labels, jnp.int32), plan.indices(None),
              plan.mask, None if weights is None else jnp.asarray(weights))
    return lambda state: metrics_lib.compute(evaluate_sums(state, *arrays, spec=spec), spec)


def takes_start(train_data: Callable) -> bool:
    """Whether ``train_data(epoch, start=k)`` can be called (a ``start`` parameter by name)."""
    try:
        parameter = inspect.signature(train_data).parameters.get("start")
    except (TypeError, ValueError):  # no signature to read (some builtins and C callables)
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
