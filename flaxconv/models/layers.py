"""Small named layers and the initializers the presets use; all plain Flax.

The speed of a model's convolutions and pools does not live here: every step of the
library runs the model through :mod:`flaxconv.kernels`, which gives ``nn.Conv``,
``nn.max_pool`` and ``nn.avg_pool`` of any module their fast formulations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

INITIALIZERS: dict[str, Callable[..., Any]] = {
    "glorot_uniform": nn.initializers.glorot_uniform(),  # Keras's default
    "lecun_normal": nn.initializers.lecun_normal(),  # Flax's default
    "he_normal": nn.initializers.he_normal(),
    "he_uniform": nn.initializers.he_uniform(),
}


def initializer(name: str) -> Callable[..., Any]:
    """The kernel initializer called ``name`` (one of ``INITIALIZERS``)."""
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown initializer {name!r}; expected one of {sorted(INITIALIZERS)}"
        ) from None


class MaxPool(nn.Module):
    """``nn.max_pool`` with a square ``window`` and stride ``window`` ("valid" floor, as
    Keras's ``MaxPooling2D``), as a module so that it has a name in summaries and
    feature-map plots.

    Attributes:
      window: pool size and stride, a positive integer.
    """

    window: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"pool window={self.window!r}; expected a positive integer")
        if x.ndim != 4 or min(x.shape[1:3]) < self.window:
            raise ValueError(f"cannot pool an input of shape {x.shape} with a "
                             f"{self.window}x{self.window} window; expected [N, H, W, C] with "
                             f"H, W >= {self.window}")
        pair = (self.window, self.window)
        return nn.max_pool(x, pair, strides=pair, padding="VALID")


class Flatten(nn.Module):
    """``[N, ...] -> [N, prod(...)]``, row-major like Keras's ``Flatten``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1)
