"""Linen modules: the configurable :class:`ConvStack` and the seed architectures as presets.

>>> model = flaxconv.models.get("dlwp_mnist")             # Conv32-pool-Conv64-pool-Conv128-Dense10
>>> model = flaxconv.models.get("fashion_cnn", num_classes=24, dropout_rate=0.5)
>>> flaxconv.models.names()

Every module here is a plain Flax module (``nn.Conv``, ``nn.max_pool``, ``nn.Dense``, ...),
called as ``model.apply(variables, x, train=bool)``, and returns float32 logits
``[N, num_classes]``. Their speed comes from :mod:`flaxconv.kernels`, which serves a
hand-written module the same way.
"""

from __future__ import annotations

import warnings
from typing import Any

import flax.linen as nn
import jax

from flaxconv.models.convstack import ConvStack
from flaxconv.models.layers import INITIALIZERS, Flatten, MaxPool, initializer

# The seed notebooks' architectures, as ConvStack settings.
PRESETS: dict[str, dict[str, Any]] = {
    # Deep Learning with Python, ch. 8 (2nd ed.): Conv32 -> pool -> Conv64 -> pool -> Conv128
    # -> Flatten -> Dense10. 104,202 parameters.
    "dlwp_mnist": dict(features=(32, 64, 128), hidden=()),
    # Deep Learning with Python, ch. 5 (1st ed.): Conv32 -> pool -> Conv64 -> pool -> Conv64
    # -> Flatten -> Dense64 relu -> Dense10. 93,322 parameters.
    "dlwp_ch5": dict(features=(32, 64, 64), hidden=(64,)),
    # The Fashion-MNIST notebook: Conv32 -> pool -> Conv32 -> pool -> Dense128 relu -> Dense10.
    "fashion_cnn": dict(features=(32, 32), pool=(True, True), hidden=(128,)),
    # The dense baseline: Flatten -> Dense128 relu -> Dense10.
    "dense": dict(features=(), hidden=(128,)),
    # The plain Keras convnet of the Sign Language experiment: Conv32 -> pool -> Conv64 -> pool
    # -> Conv64 -> Flatten -> Dense128 relu -> Dropout 0.5 -> Dense; give it augmentation
    # with augment=flaxconv.augment.keras_like(...).
    "sign_language_cnn": dict(features=(32, 64, 64), hidden=(128,), dropout_rate=0.5),
}


def names() -> tuple[str, ...]:
    """The preset names accepted by :func:`get`."""
    return tuple(PRESETS)


def get(name: str, num_classes: int = 10, **overrides: Any) -> nn.Module:
    """The preset ``name`` as a :class:`ConvStack`, with ``overrides`` for any of its fields.

    Raises:
      ValueError: ``name`` is not a preset, or an override is not a ConvStack field.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; expected one of {list(PRESETS)}")
    fields = set(ConvStack.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model options {unknown}; expected some of {sorted(fields)}")
    return ConvStack(**{**PRESETS[name], "num_classes": num_classes, **overrides})


def __getattr__(name: str) -> Any:
    # Kept one release: the formulations moved behind flaxconv.kernels, which every step
    # applies, so a plain jax.jit is the fast one.
    if name == "tuned_jit":
        warnings.warn("flaxconv.models.tuned_jit is deprecated: every step now gets the fast "
                      "formulations in a plain jax.jit (flaxconv.kernels); use jax.jit",
                      DeprecationWarning, stacklevel=2)
        return jax.jit
    raise AttributeError(f"module 'flaxconv.models' has no attribute {name!r}")


__all__ = [
    "INITIALIZERS",
    "PRESETS",
    "ConvStack",
    "Flatten",
    "MaxPool",
    "get",
    "initializer",
    "names",
]
