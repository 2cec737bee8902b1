"""Keras's preprocessing layers as linen modules, called as ``layer(x, train=bool)``.

:class:`RandomRotation`, :class:`RandomTranslation`, :class:`RandomZoom`,
:class:`RandomFlip`, :class:`RandomCrop`, :class:`Rescaling` and :class:`Resizing` take
Keras's names and arguments and check them when built. The random ones draw from the
``"augment"`` rng stream (``self.make_rng("augment")``) only when ``train=True`` and are
the identity otherwise (:class:`RandomCrop` center-crops), so evaluation and prediction
are never augmented. Each calls a pure function of :mod:`flaxconv.augment.ops`;
:func:`keras_like` builds the usual stack. This module imports nothing from flaxconv
outside :mod:`flaxconv.augment`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar, Unpack

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxconv.augment import ops
from flaxconv.augment.ops import FLIP_MODES, Factor, Fill, check_fill, check_size, factor_range


class _Layer(nn.Module):
    """Checks the settings when the layer is built, not first at a training step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check()

    def check(self) -> None:
        pass


class _Random(_Layer):
    """A layer that augments in training (drawing from the ``"augment"`` rng stream) and
    is the identity otherwise."""

    def augment(self, key: jax.Array, x: jax.Array) -> jax.Array:
        """``x`` augmented with ``key``: ``[B, H, W, C] -> [B, H, W, C]``."""
        raise NotImplementedError(f"{type(self).__name__} does not define augment()")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return self.augment(self.make_rng("augment"), x) if train else x


class _Spatial(_Random):
    """A resampling layer: its factors (``factors`` names them, in Keras's order, each
    checked by :func:`factor_range` unless None) and the fill settings (:class:`Fill`,
    keyword-only so that the factors come first) go to its ``resample`` function."""

    fill_mode: str = dataclasses.field(default="reflect", kw_only=True)
    interpolation: str = dataclasses.field(default="bilinear", kw_only=True)
    fill_value: float = dataclasses.field(default=0.0, kw_only=True)

    factors: ClassVar[tuple[str, ...]] = ()
    resample: ClassVar[Callable[..., jax.Array]]

    def check(self) -> None:
        check_fill(self.fill_mode, self.interpolation)
        for name in self.factors:
            if getattr(self, name) is not None:
                factor_range(name, getattr(self, name))

    def augment(self, key: jax.Array, x: jax.Array) -> jax.Array:
        fill: Fill = {name: getattr(self, name) for name in Fill.__annotations__}
        factors = [getattr(self, name) for name in self.factors]
        return type(self).resample(key, x, *factors, **fill)


class RandomRotation(_Spatial):
    """Keras's ``RandomRotation``: in training, each image turns by its own angle, uniform
    in ``factor`` × 2π (``0.05``: ±18°; a pair ``(lo, hi)`` for an asymmetric range).
    Identity when ``train=False``. ``[B, H, W, C] -> [B, H, W, C]``."""

    factor: Factor

    factors = ("factor",)
    resample = staticmethod(ops.random_rotation)


class RandomTranslation(_Spatial):
    """Keras's ``RandomTranslation``: in training, each image shifts by its own offset,
    uniform in ``height_factor`` × H rows and ``width_factor`` × W columns. Identity when
    ``train=False``. ``[B, H, W, C] -> [B, H, W, C]``."""

    height_factor: Factor
    width_factor: Factor

    factors = ("height_factor", "width_factor")
    resample = staticmethod(ops.random_translation)


class RandomZoom(_Spatial):
    """Keras's ``RandomZoom``: in training, each image zooms about its center by its own
    factor ``1 + u``, ``u`` uniform in ``height_factor`` (positive: out, negative: in);
    ``width_factor=None`` keeps the aspect ratio. Identity when ``train=False``."""

    height_factor: Factor
    width_factor: Factor | None = None

    factors = ("height_factor", "width_factor")
    resample = staticmethod(ops.random_zoom)


class RandomFlip(_Random):
    """Keras's ``RandomFlip``: in training, each image is mirrored with probability 1/2 per
    axis of ``mode``. Identity when ``train=False``. Not for digits or letters, whose mirror
    image is another symbol."""

    mode: str = "horizontal_and_vertical"

    def check(self) -> None:
        if self.mode not in FLIP_MODES:
            raise ValueError(f"mode={self.mode!r}; expected one of {list(FLIP_MODES)}")

    def augment(self, key: jax.Array, x: jax.Array) -> jax.Array:
        return ops.random_flip(key, x, self.mode)


class RandomCrop(_Layer):
    """Keras's ``RandomCrop``: a random ``height x width`` window per image in training, the
    central window otherwise. ``[B, H, W, C] -> [B, height, width, C]``."""

    height: int
    width: int

    def check(self) -> None:
        check_size(self.height, self.width)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train:
            return ops.center_crop(x, self.height, self.width)
        return ops.random_crop(self.make_rng("augment"), x, self.height, self.width)


class Rescaling(_Layer):
    """Keras's ``Rescaling``: ``x * scale + offset``, in training and evaluation alike
    (e.g. ``Rescaling(2.0, -1.0)`` maps [0, 1] to [-1, 1])."""

    scale: float
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        del train
        return x * jnp.asarray(self.scale, x.dtype) + jnp.asarray(self.offset, x.dtype)


class Resizing(_Layer):
    """Keras's ``Resizing``: every image to ``height x width`` (see :func:`resize`), in
    training and evaluation alike."""

    height: int
    width: int
    interpolation: str = "bilinear"

    def check(self) -> None:
        check_size(self.height, self.width)
        if self.interpolation not in ("bilinear", "nearest", "bicubic"):
            raise ValueError(
                f"interpolation={self.interpolation!r}; expected 'bilinear', 'nearest' or "
                "'bicubic'"
            )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        del train
        return ops.resize(x, self.height, self.width, self.interpolation)


def keras_like(
    rotation: Factor = 0.0,
    translation: Factor = 0.0,
    zoom: Factor = 0.0,
    flip: str | None = None,
    **fill: Unpack[Fill],
) -> tuple[nn.Module, ...]:
    """The usual augmentation stack as layers for ``ConvStack(augment=...)``: a flip (if
    ``flip`` names a mode), then rotation, translation (same factor for both axes) and zoom,
    each left out when its factor is 0. ``fill`` goes to the spatial layers
    (``fill_mode``, ``interpolation``, ``fill_value``)."""
    layers: list[nn.Module] = []
    if flip:
        layers.append(RandomFlip(flip))
    if factor_range("rotation", rotation) != (0.0, 0.0):
        layers.append(RandomRotation(rotation, **fill))
    if factor_range("translation", translation) != (0.0, 0.0):
        layers.append(RandomTranslation(translation, translation, **fill))
    if factor_range("zoom", zoom) != (0.0, 0.0):
        layers.append(RandomZoom(zoom, **fill))
    return tuple(layers)

