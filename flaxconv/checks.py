"""Checks of in-memory image and label arrays before they train or are evaluated: the
inputs that would otherwise give silently wrong numbers (finite losses from NaN pixels, a
loss of 44 from unscaled floats, a perfect loss from a single class); and of the training
loss itself (:class:`NonFiniteLossError`)."""

from __future__ import annotations

import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np


def check_images(images: Any, what: str = "images") -> None:
    """Rejects non-finite float pixels and warns about float pixels that look unscaled.

    uint8 images pass as they are (the steps scale them to [0, 1] on the device). Float
    images are expected scaled, in [0, 1], or standardized (then some are negative); float
    images that are all >= 0 with a maximum above 1 look like 0..255 pixels that were
    never divided by 255.

    Args:
      images: ``[N, H, W, C]`` numpy or jax array, any dtype.
      what: how the messages name them, e.g. ``"validation images"``.

    Raises:
      ValueError: NaN or infinite float pixels, naming how many and the first image that
        holds one (a model's max-pooling can hide NaNs and report finite losses).

    Warns:
      RuntimeWarning: float images in ``[0, max]`` with ``max > 1``.
    """
    dtype = getattr(images, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or not np.size(images):
        return
    images = np.asarray(images)
    finite = np.isfinite(images)
    if not finite.all():
        bad = ~finite.reshape(len(images), -1)
        raise ValueError(
            f"{what} hold {int(bad.sum())} NaN or infinite pixel value(s), e.g. in image "
            f"{int(np.argmax(bad.any(axis=1)))}; expected finite values"
        )
    low, high = float(images.min()), float(images.max())
    if low >= 0.0 and high > 1.0 + 1e-3:
        warnings.warn(
            f"{what} are {dtype} in [{low:g}, {high:g}]; expected floats in [0, 1] (uint8 "
            f"0..255 is scaled on the device): pass uint8 images, or divide by 255",
            RuntimeWarning,
            stacklevel=3,
        )


def warn_one_class(labels: Any, what: str = "training labels") -> None:
    """Warns when every label is the same class: a classifier trained on them learns to
    answer that class whatever the image, and its loss goes to 0.

    Args:
      labels: int ``[N]`` numpy or jax array.
      what: how the message names them.
    """
    labels = np.asarray(labels)
    if labels.size > 1 and (labels == labels.flat[0]).all():
        warnings.warn(
            f"{what} hold a single class ({labels.flat[0]}) in all {labels.size} examples; "
            f"a classifier trained on them answers that class whatever the image (its loss "
            f"goes to 0)",
            RuntimeWarning,
            stacklevel=3,
        )


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; ``step`` is the first bad step (1-based)."""

    def __init__(self, step: int, loss: float, epoch: int | None = None):
        self.step, self.loss, self.epoch = step, loss, epoch
        where = f"step {step}" + ("" if epoch is None else f" (epoch {epoch + 1})")
        super().__init__(
            f"the training loss became {loss} at {where}; stopped (lower the learning "
            f"rate or check the inputs). The last good checkpoint, if any, is kept."
        )


def first_non_finite(losses: np.ndarray) -> int | None:
    """The index of the first NaN or infinite entry of ``losses`` (float ``[S]``), or None."""
    bad = np.flatnonzero(~np.isfinite(losses))
    return int(bad[0]) if bad.size else None
