"""One image file read the way Keras's ``image_dataset_from_directory`` reads it, with Pillow
and numpy only (no TensorFlow).

Keras decodes with ``tf.io.decode_image(channels=C)`` and resizes with ``tf.image.resize``
(half-pixel centres, no antialiasing). Here:

* **Decoding** (Pillow) converts channels the way TensorFlow's decoders do: colour to gray
  is libpng's fixed-point luma ``(9797 R + 19234 G + 3737 B) >> 15``, or for a JPEG its own
  luma plane (libjpeg's Y); gray is replicated to RGB; alpha is dropped, or added as 255;
  a 16-bit PNG keeps its high byte; a GIF's first frame has its transparent pixels black.
  The pixels are TensorFlow's exactly for PNG, BMP and GIF, and for a JPEG decoded to gray
  or stored without chroma subsampling (both use libjpeg's fast integer DCT). A colour JPEG
  with chroma subsampling (most photos) differs by a few levels: TensorFlow combines the
  fast DCT with libjpeg's smooth chroma upsampling, and Pillow can give the fast DCT only
  without that upsampling, so it decodes with the accurate DCT instead.
* **Resizing** uses TensorFlow's own resampling weights, computed in float32 as TensorFlow
  computes them: ``ResizeBilinear``, ``ResizeNearestNeighbor``, ``ResizeBicubic`` (its
  1024-entry coefficient table), ``ResizeArea``, and ``ScaleAndTranslate``'s kernels for
  lanczos3/5, gaussian and mitchellcubic. The float32 result agrees with TensorFlow's to
  about 1e-3 of a level and is rounded (half to even) to uint8.

Both run in numpy and Pillow, which release the GIL, so a thread pool reads files in
parallel (see :class:`flaxconv.data.ImageFolder`).
"""

from __future__ import annotations

import functools
import numbers
import os

import numpy as np

#: ``color_mode`` -> number of channels.
COLOR_MODES = {"grayscale": 1, "rgb": 3, "rgba": 4}
#: ``interpolation`` names (those of ``tf.image.resize``, as in Keras).
RESIZE_METHODS = (
    "bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic"
)
# Methods whose weights at an unchanged size are exactly the identity: resizing is skipped.
# (gaussian and mitchellcubic blur even then, as TensorFlow does; lanczos is off by ~1e-8.)
_IDENTITY_AT_SAME_SIZE = ("bilinear", "nearest", "bicubic", "area")
_F32 = np.float32


def read_image(
    path: str | os.PathLike,
    image_size: int | tuple[int, int],
    color_mode: str = "rgb",
    interpolation: str = "bilinear",
    *,
    crop_to_aspect_ratio: bool = False,
    pad_to_aspect_ratio: bool = False,
) -> np.ndarray:
    """One image file as :func:`flaxconv.data.image_folder` yields it.

    Args:
      path: a JPEG, PNG, BMP or GIF file (a GIF's first frame).
      image_size: ``(height, width)`` of the result, or one int for a square.
      color_mode: "grayscale", "rgb" or "rgba" (1, 3 or 4 channels).
      interpolation: one of :data:`RESIZE_METHODS`.
      crop_to_aspect_ratio: resize the largest centred crop with ``image_size``'s aspect
        ratio (Keras's ``smart_resize``), instead of stretching.
      pad_to_aspect_ratio: resize to fit inside ``image_size`` keeping the aspect ratio,
        then pad with black, centred (``tf.image.resize_with_pad``).

    Returns:
      uint8 ``[height, width, channels]``, as Keras's float32 image rounded to uint8.

    Raises:
      ValueError: a bad argument (naming it), or a file Pillow cannot decode (naming the
        file and Pillow's reason).
    """
    size = check_image_size(image_size)
    channels = check_color_mode(color_mode)
    method = check_interpolation(interpolation)
    check_aspect_ratio_flags(crop_to_aspect_ratio, pad_to_aspect_ratio)
    try:
        image = decode(path, channels)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise ValueError(
            f"cannot decode image file {path} ({decode_problem(err)}); expected a valid "
            "JPEG, PNG, BMP or GIF image"
        ) from err
    return fit_to_size(image, size, method, crop_to_aspect_ratio, pad_to_aspect_ratio)


# ----------------------------------------------------------------------------- arguments


def check_image_size(image_size) -> tuple[int, int]:
    """``image_size`` as ``(height, width)``: an int ``n`` means ``(n, n)``, as in Keras."""
    size = image_size
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    if not (
        isinstance(size, tuple | list)
        and len(size) == 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
                for s in size)
    ):
        raise ValueError(
            f"image_size={image_size!r}; expected (height, width) or one size, positive ints"
        )
    return int(size[0]), int(size[1])


def check_color_mode(color_mode) -> int:
    """The number of channels of ``color_mode``."""
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode={color_mode!r}; expected one of {list(COLOR_MODES)}")
    return COLOR_MODES[color_mode]


def check_interpolation(interpolation) -> str:
    """``interpolation`` lower-cased (Keras accepts any case), checked."""
    method = interpolation.lower() if isinstance(interpolation, str) else interpolation
    if method not in RESIZE_METHODS:
        raise ValueError(f"interpolation={interpolation!r}; expected one of {list(RESIZE_METHODS)}")
    return method


def check_aspect_ratio_flags(crop_to_aspect_ratio, pad_to_aspect_ratio) -> None:
    """Both are bools, and at most one is set (Keras raises the same at load time)."""
    for name, value in (("crop_to_aspect_ratio", crop_to_aspect_ratio),
                        ("pad_to_aspect_ratio", pad_to_aspect_ratio)):
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"{name}={value!r}; expected True or False")
    if crop_to_aspect_ratio and pad_to_aspect_ratio:
        raise ValueError(
            "crop_to_aspect_ratio=True and pad_to_aspect_ratio=True; expected at most one "
            "of them (crop or pad to keep the aspect ratio)"
        )


# ----------------------------------------------------------------------------- decoding


def decode(path: str | os.PathLike, channels: int) -> np.ndarray:
    """uint8 ``[h, w, channels]`` (``channels`` in 1, 3, 4) at the file's own size, as
    ``tf.io.decode_image(..., channels=channels, expand_animations=False)`` gives it.

    Raises whatever Pillow raises for a file it cannot read (see :func:`decode_problem`).
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.format == "JPEG":
            _decode_jpeg_like_tensorflow(im, channels)
        im.load()
        return to_channels(_native_pixels(im), channels)


def decode_problem(err: Exception) -> str:
    """A one-line reason for a decode failure: ``"<Type>: <first line>"``."""
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else ""
    line = line if len(line) <= 120 else line[:117] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _decode_jpeg_like_tensorflow(im, channels: int) -> None:
    """Sets up Pillow's JPEG decoder to decode as ``tf.io.decode_jpeg`` does, where it can.

    TensorFlow asks libjpeg for its fast integer DCT, and for gray output for the luma
    plane. Pillow's ``draft("L")`` gives the luma plane, and the draft flag of
    ``decoderconfig = (scale, draft)`` (Pillow's JPEG decoder arguments since PIL 1.1)
    selects the fast DCT, but also switches off libjpeg's smooth chroma upsampling. So the
    flag is set only where no chroma is upsampled: a gray output, or a file without chroma
    subsampling. tests/test_image_folder.py checks the result against Keras.
    """
    if len(im.tile) != 1 or im.mode not in ("L", "RGB"):
        return  # e.g. CMYK: Pillow's default decoding
    if channels == 1 and im.mode == "RGB":
        im.draft("L", None)
    sampling = {(h, v) for _, h, v, _ in getattr(im, "layer", ())}
    if im.mode == "L" or len(sampling) == 1:
        im.decoderconfig = (1, 1)


def _native_pixels(im) -> np.ndarray:
    """uint8 ``[h, w, k]``: k = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA, as TensorFlow's decoders
    give a file at its own channel count (palettes expanded, 16 bits cut to their high byte)."""
    mode = im.mode
    if im.format == "GIF" and mode in ("P", "L"):
        rgb = np.asarray(im.convert("RGB"))
        transparent = im.info.get("transparency")
        if isinstance(transparent, int):  # TensorFlow's GIF decoder leaves these black
            rgb = np.where((np.asarray(im) == transparent)[..., None], np.uint8(0), rgb)
        return rgb
    if mode in ("P", "PA"):
        alpha = mode == "PA" or "transparency" in im.info
        return np.asarray(im.convert("RGBA" if alpha else "RGB"))
    if mode.startswith("I"):  # 16-bit gray PNG: "I;16", "I;16B", or "I" in older Pillow
        high = np.asarray(im).astype(np.int64) >> 8
        return np.clip(high, 0, 255).astype(np.uint8)[..., None]
    if mode not in ("L", "LA", "RGB", "RGBA"):  # "1", "CMYK", "YCbCr", "RGBX", ...
        im = im.convert("RGBA" if "A" in mode or "a" in mode else "L" if mode == "1" else "RGB")
    pixels = np.asarray(im)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``[h, w, k]`` (k: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) -> ``[h, w, channels]``.

    Gray from colour is libpng's luma, ``(9797 R + 19234 G + 3737 B) >> 15``, which is what
    ``tf.io.decode_png(channels=1)`` computes (libpng's rgb_to_gray with 0.299 and 0.587 in
    15-bit fixed point); alpha is dropped, or added as 255.
    """
    k = pixels.shape[-1]
    gray = k <= 2
    if channels == 1:
        if gray:
            return np.ascontiguousarray(pixels[..., :1])
        rgb = pixels[..., :3].astype(np.uint32)
        luma = (9797 * rgb[..., 0] + 19234 * rgb[..., 1] + 3737 * rgb[..., 2]) >> 15
        return luma.astype(np.uint8)[..., None]
    rgb = np.repeat(pixels[..., :1], 3, axis=-1) if gray else pixels[..., :3]
    if channels == 3:
        return np.ascontiguousarray(rgb)
    alpha = pixels[..., -1:] if k in (2, 4) else np.full((*pixels.shape[:2], 1), 255, np.uint8)
    return np.concatenate([rgb, alpha], axis=-1)


# ----------------------------------------------------------------------------- geometry


def fit_to_size(
    image: np.ndarray,
    size: tuple[int, int],
    method: str,
    crop_to_aspect_ratio: bool = False,
    pad_to_aspect_ratio: bool = False,
) -> np.ndarray:
    """uint8 ``[h, w, c]`` -> uint8 ``[*size, c]``: stretched, centre-cropped or padded to
    ``size`` as Keras does (see :func:`read_image`); the integer arithmetic is Keras's and
    TensorFlow's, in float32."""
    height, width = image.shape[:2]
    target_h, target_w = size
    if crop_to_aspect_ratio:  # keras.utils.smart_resize on TensorFlow tensors
        crop_h = max(min(height, int(_F32(width * target_h) / _F32(target_w))), 1)
        crop_w = max(min(width, int(_F32(height * target_w) / _F32(target_h))), 1)
        top, left = int(_F32(height - crop_h) / 2), int(_F32(width - crop_w) / 2)
        image = image[top : top + crop_h, left : left + crop_w]
    elif pad_to_aspect_ratio:  # tf.image.resize_with_pad
        ratio = max(_F32(width) / _F32(target_w), _F32(height) / _F32(target_h))
        inner_h, inner_w = _F32(height) / ratio, _F32(width) / ratio
        top = max(0, int(np.floor((_F32(target_h) - inner_h) / 2)))
        left = max(0, int(np.floor((_F32(target_w) - inner_w) / 2)))
        inner = resize(image, (max(1, int(inner_h)), max(1, int(inner_w))), method)
        out = np.zeros((target_h, target_w, image.shape[-1]), np.uint8)
        out[top : top + inner.shape[0], left : left + inner.shape[1]] = inner
        return out
    return resize(image, size, method)


def resize(image: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    """``tf.image.resize(image, size, method)`` (``antialias=False``) rounded to uint8.

    Args:
      image: uint8 ``[h, w, c]``.
      size: ``(height, width)``, positive.
      method: one of :data:`RESIZE_METHODS`.

    Returns:
      uint8 ``[height, width, c]``: TensorFlow's float32 result, clipped to [0, 255] and
      rounded half to even ("nearest" copies pixels, as TensorFlow's uint8 result does).
    """
    height, width = image.shape[:2]
    if (height, width) == tuple(size) and method in _IDENTITY_AT_SAME_SIZE:
        return image
    if method == "nearest":
        return image[_nearest_rows(height, size[0])][:, _nearest_rows(width, size[1])]
    out = image.astype(np.float32)
    out = _resample_rows(out, *_taps(height, size[0], method))
    out = _resample_rows(out.transpose(1, 0, 2), *_taps(width, size[1], method))
    return np.clip(np.rint(out.transpose(1, 0, 2)), 0, 255).astype(np.uint8)


def _resample_rows(image: np.ndarray, index: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """float32 ``[h, w, c]`` -> ``[n, w, c]``: row ``o`` is ``sum_t weight[o, t] *
    image[index[o, t]]`` (a few taps per row, so a large image costs what its output does)."""
    out = np.zeros((index.shape[0], *image.shape[1:]), np.float32)
    for t in range(index.shape[1]):
        out += weight[:, t, None, None] * image[index[:, t]]
    return out


@functools.lru_cache(maxsize=256)
def _nearest_rows(n_in: int, n_out: int) -> np.ndarray:
    """TensorFlow's ResizeNearestNeighbor with half-pixel centres: source row of each output
    row, ``min(floor((o + 0.5) * n_in / n_out), n_in - 1)`` in float32."""
    scale = _F32(n_in) / _F32(n_out)
    rows = np.floor((np.arange(n_out, dtype=np.float32) + _F32(0.5)) * scale).astype(np.int64)
    return np.minimum(rows, n_in - 1)


@functools.lru_cache(maxsize=256)
def _taps(n_in: int, n_out: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero entries of :func:`_weights`, row by row: ``(index int [n_out, taps],
    weight float32 [n_out, taps])``, short rows padded with weight 0."""
    weights = _weights(n_in, n_out, method)
    nonzero = weights != 0
    taps = max(1, int(nonzero.sum(axis=1).max()))
    index = np.argsort(~nonzero, axis=1, kind="stable")[:, :taps]
    return index, np.take_along_axis(weights, index, axis=1)


def _weights(n_in: int, n_out: int, method: str) -> np.ndarray:
    """float32 ``[n_out, n_in]``: output row ``o`` is ``weights[o] @ input rows``, for one
    axis of ``tf.image.resize(..., method, antialias=False)``; each row sums to 1."""
    if method == "area":  # ResizeArea: the overlap of each input pixel with the output's box
        scale = _F32(n_in) / _F32(n_out)
        start = np.arange(n_out, dtype=np.float32)[:, None] * scale
        stop = (np.arange(n_out, dtype=np.float32)[:, None] + 1) * scale
        pixel = np.arange(n_in, dtype=np.float32)[None, :]
        overlap = np.minimum(pixel + 1, stop) - np.maximum(pixel, start)
        return (np.maximum(overlap, 0) / scale).astype(np.float32)
    if method in ("bilinear", "bicubic"):
        # The legacy ResizeBilinear / ResizeBicubic ops: source position (o + 0.5) * scale
        # - 0.5 with scale = n_in / n_out, in float32.
        scale = _F32(n_in) / _F32(n_out)
        position = (np.arange(n_out, dtype=np.float32) + _F32(0.5)) * scale - _F32(0.5)
        base = np.floor(position)
        frac = position - base
        if method == "bilinear":  # neighbours clamped to the image, so no renormalising
            weights = np.zeros((n_out, n_in), np.float32)
            rows = np.arange(n_out)
            low = np.maximum(base, 0).astype(np.int64)
            high = np.minimum(np.ceil(position), n_in - 1).astype(np.int64)
            np.add.at(weights, (rows, low), 1 - frac)
            np.add.at(weights, (rows, high), frac)
            return weights
        # ResizeBicubic looks the Keys cubic (a = -0.5) up in a table of 1024 steps.
        frac = np.rint(frac * 1024).astype(np.float32) / _F32(1024)
        distance = base[:, None] + frac[:, None] - np.arange(n_in, dtype=np.float32)[None, :]
        return _normalized(_keys_cubic(distance))
    # ScaleAndTranslate (antialias=False): sample at (o + 0.5) / scale, pixel centres at i + 0.5.
    scale = _F32(n_out) / _F32(n_in)
    sample = (np.arange(n_out, dtype=np.float32) + _F32(0.5)) * (_F32(1) / scale)
    distance = (np.arange(n_in, dtype=np.float32)[None, :] + _F32(0.5)) - sample[:, None]
    return _normalized(_KERNELS[method](np.abs(distance)))


def _normalized(weights: np.ndarray) -> np.ndarray:
    """Rows divided by their sums, as ScaleAndTranslate does (taps outside the image got 0)."""
    total = weights.sum(axis=1, keepdims=True)
    usable = np.abs(total) >= 1000 * np.finfo(np.float32).tiny
    return np.where(usable, weights / np.where(usable, total, 1), 0).astype(np.float32)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x.astype(np.float64))
    near = (1.5 * x - 2.5) * x * x + 1
    far = ((-0.5 * x + 2.5) * x - 4) * x + 2
    return np.where(x >= 2, 0.0, np.where(x >= 1, far, near))


def _lanczos(radius: int):
    def kernel(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            value = radius * np.sin(np.pi * x) * np.sin(np.pi * x / radius) / (np.pi * x) ** 2
        return np.where(x > radius, 0.0, np.where(x <= 1e-3, 1.0, value))

    return kernel


def _gaussian(x: np.ndarray) -> np.ndarray:
    """TensorFlow's: radius 1.5, sigma 0.5."""
    x = x.astype(np.float64)
    return np.where(x >= 1.5, 0.0, np.exp(-x * x / (2 * 0.5 * 0.5)))


def _mitchell_cubic(x: np.ndarray) -> np.ndarray:
    """Mitchell-Netravali with B = C = 1/3."""
    x = x.astype(np.float64)
    near = ((7 / 6) * x - 2) * x * x + 8 / 9
    far = (((-7 / 18) * x + 2) * x - 10 / 3) * x + 16 / 9
    return np.where(x >= 2, 0.0, np.where(x >= 1, far, near))


_KERNELS = {
    "lanczos3": _lanczos(3),
    "lanczos5": _lanczos(5),
    "gaussian": _gaussian,
    "mitchellcubic": _mitchell_cubic,
}
