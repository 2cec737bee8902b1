"""The pure augmentation functions: per-example random transforms of a batch ``[B, H, W, C]``.

:func:`random_rotation`, :func:`random_translation`, :func:`random_zoom`,
:func:`random_flip` and :func:`random_crop` draw one transform per example from a
``jax.random`` key; :func:`rotate` and :func:`affine` apply given ones, and
:func:`transform` resamples through any per-image affine map with
``jax.scipy.ndimage.map_coordinates``; :func:`center_crop` and :func:`resize` are the
deterministic ones. All are pure and jittable (call them inside a jitted step). With the
"reflect" (Keras's default), "nearest" and "constant" fill modes the outputs match Keras's
layers to float32 rounding. (dm-pix 0.4.5 works with this jax too, but its fast
"constant" mode does not interpolate towards the fill value as Keras does, and for the
other modes it calls ``map_coordinates`` itself; so there is no need for it.)

Also here: Keras's conventions and their checks (:func:`factor_range`, :data:`FILL_MODES`,
:data:`INTERPOLATIONS`, :data:`FLIP_MODES`), shared with the layers of
:mod:`flaxconv.augment.layers`. This module imports nothing from flaxconv.
"""

from __future__ import annotations

from typing import TypedDict, Unpack

import jax
import jax.numpy as jnp

#: Keras's ``fill_mode`` names: reflect ``d c b a | a b c d | d c b a``, wrap
#: ``a b c d | a b c d | a b c d``, nearest ``a a a a | a b c d | d d d d``, constant
#: ``k k k k | a b c d | k k k k`` with ``k = fill_value``. Within half a pixel of the wrap
#: seam TensorFlow's kernel clamps instead of wrapping; this module wraps.
FILL_MODES = ("reflect", "wrap", "nearest", "constant")
#: Keras's ``interpolation`` names and their spline orders.
INTERPOLATIONS = {"bilinear": 1, "nearest": 0}
FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")

Factor = float | tuple[float, float]


class Fill(TypedDict, total=False):
    """How the resampling functions fill and interpolate; the keyword arguments that
    :func:`rotate`, :func:`affine` and the ``random_*`` resamplers pass on to
    :func:`transform` (whose defaults apply to those not given): ``fill_mode`` (one of
    :data:`FILL_MODES`, default "reflect"), ``interpolation`` (a key of
    :data:`INTERPOLATIONS`, default "bilinear") and ``fill_value`` (default 0.0)."""

    fill_mode: str
    interpolation: str
    fill_value: float


# ----------------------------------------------------------------------------- checks


def factor_range(name: str, factor: Factor, *, lower: float = -1.0) -> tuple[float, float]:
    """Keras's factor convention: ``f`` means ``(-f, f)``; a pair ``(lo, hi)`` is kept.

    Raises:
      ValueError: naming ``name`` and the value, unless ``lower <= lo <= hi`` (and
        ``f >= 0`` for a single number).
    """
    if isinstance(factor, int | float) and not isinstance(factor, bool):
        if factor < 0:
            raise ValueError(f"{name}={factor!r}; expected a number >= 0 or a pair (lo, hi)")
        lo, hi = -float(factor), float(factor)
    elif (
        isinstance(factor, tuple | list)
        and len(factor) == 2
        and all(isinstance(f, int | float) and not isinstance(f, bool) for f in factor)
    ):
        lo, hi = float(factor[0]), float(factor[1])
    else:
        raise ValueError(f"{name}={factor!r}; expected a number >= 0 or a pair (lo, hi)")
    if not lower <= lo <= hi:
        raise ValueError(f"{name}={factor!r}; expected {lower} <= lo <= hi for the pair (lo, hi)")
    return lo, hi


def check_fill(fill_mode: str, interpolation: str) -> None:
    """Raises a ValueError unless ``fill_mode`` is in :data:`FILL_MODES` and
    ``interpolation`` in :data:`INTERPOLATIONS`."""
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode={fill_mode!r}; expected one of {list(FILL_MODES)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation={interpolation!r}; expected one of {list(INTERPOLATIONS)}"
        )


def check_size(height: int, width: int) -> None:
    """Raises a ValueError naming ``height`` or ``width`` unless it is a positive int."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}={value!r}; expected a positive int")


def _check_images(images: jax.Array) -> None:
    if images.ndim != 4:
        raise ValueError(f"images have shape {images.shape}; expected [B, H, W, C]")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"images have dtype {images.dtype}; expected a float dtype (the train step "
            "scales uint8 images to [0, 1] before the model)"
        )


# ----------------------------------------------------------------------------- transforms


def transform(
    images: jax.Array,
    matrices: jax.Array,
    offsets: jax.Array,
    *,
    fill_mode: str = "reflect",
    interpolation: str = "bilinear",
    fill_value: float = 0.0,
) -> jax.Array:
    """Resamples each image through its own affine map (backward: output to input).

    Output pixel ``p = (row, col)`` of image ``b`` takes the input's value at
    ``matrices[b] @ p + offsets[b]``, interpolated by ``jax.scipy.ndimage.map_coordinates``
    (bilinear: order 1; nearest: order 0). Points outside the image follow ``fill_mode``;
    "constant" interpolates towards ``fill_value`` within a pixel of the edge, as Keras
    (TensorFlow) does.

    Args:
      images: float ``[B, H, W, C]``.
      matrices: float ``[B, 2, 2]``.
      offsets: float ``[B, 2]``, in pixels.
      fill_mode, interpolation, fill_value: Keras's (see :data:`FILL_MODES`).

    Returns:
      float ``[B, H, W, C]``, same dtype. Pure; jit it or call it inside a jitted step.
    """
    _check_images(images)
    check_fill(fill_mode, interpolation)
    order = INTERPOLATIONS[interpolation]
    h, w = images.shape[1:3]
    grid = jnp.stack(jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")).astype(jnp.float32)

    def one(image, matrix, offset):
        coords = jnp.einsum("ij,jhw->ihw", matrix, grid) + offset[:, None, None]
        sample = lambda channel: jax.scipy.ndimage.map_coordinates(
            channel, list(coords), order=order, mode=fill_mode, cval=fill_value
        )
        return jax.vmap(sample, in_axes=-1, out_axes=-1)(image.astype(jnp.float32))

    out = jax.vmap(one)(images, matrices.astype(jnp.float32), offsets.astype(jnp.float32))
    return out.astype(images.dtype)


def _center(images: jax.Array) -> jax.Array:
    return (jnp.asarray(images.shape[1:3], jnp.float32) - 1.0) / 2.0


def rotate(images: jax.Array, angles: jax.Array, **fill: Unpack[Fill]) -> jax.Array:
    """Rotates each image about its center, counter-clockwise by ``angles`` (radians).

    Args:
      images: float ``[B, H, W, C]``.
      angles: float ``[B]``, one angle per image.
      **fill: :class:`Fill`, Keras's ``fill_mode``, ``interpolation``, ``fill_value``.

    Returns:
      float ``[B, H, W, C]``, same dtype. Pure.
    """
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    # In (row, col) coordinates (rows grow downwards) the inverse of a counter-clockwise
    # turn is [[cos, sin], [-sin, cos]].
    matrices = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2)
    center = _center(images)
    offsets = center - matrices @ center
    return transform(images, matrices, offsets, **fill)


def affine(
    images: jax.Array, scale: jax.Array, shift: jax.Array, **fill: Unpack[Fill]
) -> jax.Array:
    """Zooms about the center and shifts each image (a diagonal affine map).

    Output pixel ``p = (row, col)`` takes the input's value at
    ``scale * (p - center) + center - shift``, with ``center = ((H - 1) / 2, (W - 1) / 2)``:
    ``scale > 1`` zooms out, ``shift > 0`` moves the content down/right (Keras's signs).

    Args:
      images: float ``[B, H, W, C]``.
      scale: float ``[B, 2]``, (row, col) zoom per image.
      shift: float ``[B, 2]``, (row, col) shift in pixels per image.
      **fill: :class:`Fill`, Keras's ``fill_mode``, ``interpolation``, ``fill_value``.

    Returns:
      float ``[B, H, W, C]``, same dtype. Pure.
    """
    scale = scale.astype(jnp.float32)
    matrices = jax.vmap(jnp.diag)(scale)
    offsets = _center(images) * (1.0 - scale) - shift
    return transform(images, matrices, offsets, **fill)


def random_rotation(
    key: jax.Array, images: jax.Array, factor: Factor, **fill: Unpack[Fill]
) -> jax.Array:
    """Rotates each image by its own angle, uniform in ``factor * 2π`` (Keras's
    ``RandomRotation``): ``factor=0.05`` turns by up to ±18°, positive is counter-clockwise.

    ``fill``: :class:`Fill`. ``[B, H, W, C] -> [B, H, W, C]``; deterministic in ``key``; pure.
    """
    lo, hi = factor_range("factor", factor)
    turns = jax.random.uniform(key, (images.shape[0],), minval=lo, maxval=hi)
    return rotate(images, 2.0 * jnp.pi * turns, **fill)


def random_translation(
    key: jax.Array,
    images: jax.Array,
    height_factor: Factor,
    width_factor: Factor,
    **fill: Unpack[Fill],
) -> jax.Array:
    """Shifts each image by its own offset, uniform in ``height_factor * H`` rows and
    ``width_factor * W`` columns (Keras's ``RandomTranslation``; positive is down/right).

    ``fill``: :class:`Fill`. ``[B, H, W, C] -> [B, H, W, C]``; deterministic in ``key``; pure.
    """
    (hlo, hhi), (wlo, whi) = (
        factor_range("height_factor", height_factor),
        factor_range("width_factor", width_factor),
    )
    b, h, w = images.shape[:3]
    fractions = jax.random.uniform(
        key, (b, 2), minval=jnp.array([hlo, wlo]), maxval=jnp.array([hhi, whi])
    )
    shift = fractions * jnp.array([h, w], jnp.float32)
    return affine(images, jnp.ones((b, 2)), shift, **fill)


def random_zoom(
    key: jax.Array,
    images: jax.Array,
    height_factor: Factor,
    width_factor: Factor | None = None,
    **fill: Unpack[Fill],
) -> jax.Array:
    """Zooms each image about its center by its own factor ``1 + u``, ``u`` uniform in
    ``height_factor`` (Keras's ``RandomZoom``: positive zooms out, negative zooms in).

    ``width_factor=None`` keeps the aspect ratio (one factor for both axes).
    ``fill``: :class:`Fill`. ``[B, H, W, C] -> [B, H, W, C]``; deterministic in ``key``; pure.
    """
    hlo, hhi = factor_range("height_factor", height_factor)
    b = images.shape[0]
    hkey, wkey = jax.random.split(key)
    zh = 1.0 + jax.random.uniform(hkey, (b,), minval=hlo, maxval=hhi)
    if width_factor is None:
        zw = zh
    else:
        wlo, whi = factor_range("width_factor", width_factor)
        zw = 1.0 + jax.random.uniform(wkey, (b,), minval=wlo, maxval=whi)
    return affine(images, jnp.stack([zh, zw], axis=1), jnp.zeros((b, 2)), **fill)


def random_flip(key: jax.Array, images: jax.Array, mode: str = "horizontal") -> jax.Array:
    """Mirrors each image with probability 1/2 per axis of ``mode`` (Keras's ``RandomFlip``).

    ``mode``: "horizontal" (left-right), "vertical" (up-down) or "horizontal_and_vertical".
    ``[B, H, W, C] -> [B, H, W, C]``; deterministic in ``key``; pure.
    """
    _check_images(images)
    if mode not in FLIP_MODES:
        raise ValueError(f"mode={mode!r}; expected one of {list(FLIP_MODES)}")
    hkey, vkey = jax.random.split(key)
    b = images.shape[0]
    if mode in ("horizontal", "horizontal_and_vertical"):
        flip = jax.random.bernoulli(hkey, 0.5, (b, 1, 1, 1))
        images = jnp.where(flip, images[:, :, ::-1], images)
    if mode in ("vertical", "horizontal_and_vertical"):
        flip = jax.random.bernoulli(vkey, 0.5, (b, 1, 1, 1))
        images = jnp.where(flip, images[:, ::-1], images)
    return images


def _check_crop(images: jax.Array, height: int, width: int) -> None:
    _check_images(images)
    h, w = images.shape[1:3]
    if height > h or width > w:
        raise ValueError(
            f"cannot crop {height}x{width} out of {h}x{w} images; expected a crop no larger "
            "than the image"
        )


def random_crop(key: jax.Array, images: jax.Array, height: int, width: int) -> jax.Array:
    """A ``height x width`` window of each image at its own uniform position.

    ``[B, H, W, C] -> [B, height, width, C]``; deterministic in ``key``; pure.
    """
    _check_crop(images, height, width)
    b, h, w, c = images.shape
    tops = jax.random.randint(jax.random.fold_in(key, 0), (b,), 0, h - height + 1)
    lefts = jax.random.randint(jax.random.fold_in(key, 1), (b,), 0, w - width + 1)
    crop = lambda im, top, left: jax.lax.dynamic_slice(im, (top, left, 0), (height, width, c))
    return jax.vmap(crop)(images, tops, lefts)


def center_crop(images: jax.Array, height: int, width: int) -> jax.Array:
    """The central ``height x width`` window: ``[B, H, W, C] -> [B, height, width, C]``."""
    _check_crop(images, height, width)
    top = (images.shape[1] - height) // 2
    left = (images.shape[2] - width) // 2
    return images[:, top : top + height, left : left + width]


def resize(
    images: jax.Array, height: int, width: int, interpolation: str = "bilinear"
) -> jax.Array:
    """Resizes to ``[B, height, width, C]`` like ``tf.image.resize`` (half-pixel centers,
    no antialiasing: Keras's ``Resizing``); same dtype. Pure."""
    _check_images(images)
    methods = {"bilinear": "linear", "nearest": "nearest", "bicubic": "cubic"}
    if interpolation not in methods:
        raise ValueError(f"interpolation={interpolation!r}; expected one of {list(methods)}")
    shape = (images.shape[0], height, width, images.shape[-1])
    return jax.image.resize(images, shape, methods[interpolation], antialias=False).astype(
        images.dtype
    )

