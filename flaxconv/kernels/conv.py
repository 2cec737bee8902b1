"""Formulations of one 2-D convolution (NHWC inputs, HWIO kernels, NHWC outputs).

* ``"xla"``: ``lax.conv_general_dilated`` with JAX's own gradients (TPU; the fallback).
* ``"xla_nhwc"``: the same forward convolution (stride 1), with a custom VJP that writes
  both gradients as forward NHWC/HWIO convolutions too: the input gradient correlates the
  padded output gradient with the flipped kernel, and the kernel gradient swaps the roles
  of batch and channels (``x^T [C_in, H, W, N]`` correlated with ``dy^T [H_out, W_out, N,
  C_out]``). JAX's own kernel gradient is a convolution with non-canonical dimension
  numbers, which XLA:CPU runs as a naive loop inside ``lax.scan`` (jax-ml/jax#12868); in
  canonical form all three run on XLA:CPU's fast kernels. Where a matmul does less work it
  is used instead: a layer with few input channels (the first: ``kh*kw*C_in <= C_out``)
  runs forward and kernel gradient as one matmul with its small patches, and a small output
  (where the full correlation would mostly multiply padding) gets its input gradient as one
  matmul summed back onto the input (col2im).
* ``"im2col"``: the ``kh*kw`` shifted (strided) views of the padded input concatenated on
  the channel axis, times the kernel reshaped to ``[kh*kw*C_in, C_out]``: one matmul
  forward and one per gradient, any stride. A 1x1 convolution is exactly one matmul.
* ``"winograd"``: a 3x3 stride-1 convolution as Winograd's F(2x2, 3x3)
  (:mod:`flaxconv.kernels.winograd`): 4/9 of the multiply-adds in each pass, as 16 matmuls
  between additive transforms.

All of them agree with ``lax.conv_general_dilated`` to float32 rounding, values and
gradients; which one runs where is :mod:`flaxconv.kernels.policy`'s choice. Each computes
at the convolution's ``precision`` (:mod:`flaxconv.kernels.precision`), forward and
backward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from flaxconv.kernels.precision import check_precision, matmul_precision
from flaxconv.kernels.winograd import winograd_conv, winograd_conv_applies

#: The formulations :func:`conv2d` accepts.
CONV_FORMULATIONS = ("xla", "xla_nhwc", "im2col", "winograd")

NHWC = ("NHWC", "HWIO", "NHWC")

Padding = tuple[tuple[int, int], tuple[int, int]]


def padding_amounts(padding: str | Sequence[tuple[int, int]], size: int, k: int, s: int,
                    axis: int) -> tuple[int, int]:
    """``(low, high)`` padding of spatial ``axis`` (0: height, 1: width), as XLA computes it
    for ``"VALID"``/``"SAME"``, or as given explicitly.

    Raises:
      ValueError: ``padding`` is none of those, naming it.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0)
        if mode == "SAME":
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            return (total // 2, total - total // 2)
    else:
        try:
            low, high = (int(p) for p in padding[axis])
            if len(padding) == 2 and low >= 0 and high >= 0:
                return (low, high)
        except (TypeError, ValueError, IndexError):
            pass
    raise ValueError(
        f"padding={padding!r}; expected 'SAME', 'VALID' or ((top, bottom), (left, right)) "
        "with non-negative integers"
    )


def few_input_channels(kernel_shape: Sequence[int]) -> bool:
    """Whether a layer's patches ``[N*H*W, kh*kw*C_in]`` are no larger than its output (the
    first layer, ``C_in = 1``): then one matmul with them beats any convolution kernel."""
    kh, kw, c_in, c_out = kernel_shape
    return kh * kw * c_in <= c_out


def pad(x: jax.Array, padding: Padding) -> jax.Array:
    """Zero-pads the spatial axes of ``[N, H, W, C]`` by ``((top, bottom), (left, right))``."""
    (top, bottom), (left, right) = padding
    if not (top or bottom or left or right):
        return x
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def patches(x: jax.Array, kh: int, kw: int, out_h: int, out_w: int,
            strides: tuple[int, int] = (1, 1)) -> jax.Array:
    """``[N, out_h, out_w, kh*kw*C]``: the shifted views of (padded) ``x`` in (i, j, c)
    order, which matches ``kernel.reshape(kh * kw * C, C_out)``."""
    sh, sw = strides
    columns = [
        x[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(columns, axis=-1) if len(columns) > 1 else columns[0]


def output_size(size: int, k: int, s: int, padding: tuple[int, int]) -> int:
    """XLA's output size along one spatial axis."""
    return (size + sum(padding) - k) // s + 1


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
           padding: str | Sequence[tuple[int, int]] = "VALID",
           formulation: str = "xla", precision: str | None = None) -> jax.Array:
    """2-D cross-correlation, ``lax.conv_general_dilated`` with NHWC/HWIO/NHWC.

    Args:
      x: ``[N, H, W, C_in]``.
      kernel: ``[kh, kw, C_in, C_out]``.
      strides: ``(sh, sw)``.
      padding: ``"VALID"``, ``"SAME"`` or ``((top, bottom), (left, right))``.
      formulation: one of :data:`CONV_FORMULATIONS`; ``"xla_nhwc"`` needs stride 1 and
        padding narrower than the kernel, and runs as ``"im2col"`` otherwise; ``"winograd"``
        needs what :func:`~flaxconv.kernels.winograd.winograd_conv_applies` says, and runs
        as ``"xla_nhwc"`` (or ``"im2col"``) otherwise.
      precision: None (the default) or one of
        :data:`~flaxconv.kernels.precision.PRECISIONS`: that of every matmul and
        convolution, forward and backward, as ``lax.conv_general_dilated``'s ``precision``.

    Returns:
      ``[N, H_out, W_out, C_out]`` in the dtype of ``x``.
    """
    if formulation not in CONV_FORMULATIONS:
        raise ValueError(f"formulation={formulation!r}; expected one of {CONV_FORMULATIONS}")
    check_precision(precision)
    kh, kw, c_in, _ = kernel.shape
    if x.ndim != 4 or x.shape[-1] != c_in:
        raise ValueError(f"input has shape {x.shape}; kernel {kernel.shape} expects "
                         f"[N, H, W, {c_in}]")
    strides = tuple(int(s) for s in strides)
    pads = (padding_amounts(padding, x.shape[1], kh, strides[0], axis=0),
            padding_amounts(padding, x.shape[2], kw, strides[1], axis=1))
    if formulation == "winograd" and winograd_conv_applies(kernel.shape, strides, pads, x.dtype):
        return winograd_conv(x, kernel, pads, precision)
    if formulation in ("xla_nhwc", "winograd") and nhwc_applies(kernel.shape, strides, pads):
        return conv_nhwc(x, kernel, pads, precision)
    # JAX's own gradients keep each operation's precision: the context is enough here.
    with matmul_precision(precision):
        if formulation == "xla":
            return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=NHWC)
        return conv_im2col(x, kernel, strides, pads)


def nhwc_applies(kernel_shape: Sequence[int], strides: Sequence[int], pads: Padding) -> bool:
    """Whether :func:`conv_nhwc` computes this convolution: stride 1, padding narrower
    than the kernel."""
    kh, kw = kernel_shape[:2]
    return (tuple(strides) == (1, 1) and max(pads[0]) < kh and max(pads[1]) < kw)


def conv_im2col(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Padding
                ) -> jax.Array:
    """The ``"im2col"`` formulation: patches of the padded input times the reshaped kernel;
    its gradients are JAX's (a matmul each, the input's summed back through the slices)."""
    kh, kw, c_in, c_out = kernel.shape
    out_h = output_size(x.shape[1], kh, strides[0], pads[0])
    out_w = output_size(x.shape[2], kw, strides[1], pads[1])
    columns = patches(pad(x, pads), kh, kw, out_h, out_w, strides)
    return columns @ kernel.reshape(kh * kw * c_in, c_out)


def _forward_conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x: jax.Array, kernel: jax.Array, pads: Padding, precision: str | None
              ) -> jax.Array:
    """The ``"xla_nhwc"`` formulation (stride 1): a convolution whose gradients are forward
    NHWC convolutions or matmuls, all at ``precision``."""
    with matmul_precision(precision):
        if few_input_channels(kernel.shape):
            kh, kw, c_in, c_out = kernel.shape
            xp = pad(x, pads)
            oh, ow = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
            return patches(xp, kh, kw, oh, ow) @ kernel.reshape(kh * kw * c_in, c_out)
        return _forward_conv(x, kernel, pads)


def _conv_nhwc_fwd(x, kernel, pads, precision):
    return conv_nhwc(x, kernel, pads, precision), (x, kernel)


def conv_nhwc_bwd(pads: Padding, precision: str | None, residuals, dy):
    """Both gradients of :func:`conv_nhwc`, from ``residuals = (x, kernel)``."""
    with matmul_precision(precision):
        return _conv_nhwc_grads(pads, residuals, dy)


def _conv_nhwc_grads(pads: Padding, residuals, dy):
    x, kernel = residuals
    kh, kw, c_in, c_out = kernel.shape
    (top, bottom), (left, right) = pads
    n, oh, ow, _ = dy.shape
    hp, wp = x.shape[1] + top + bottom, x.shape[2] + left + right
    if hp * wp > 1.5 * oh * ow:
        # A small output: the full correlation below would mostly multiply padding, so the
        # patch gradients come from one matmul and are summed back (col2im). Adding each
        # tap's slab in place beat a sum of padded slabs by ~0.2 ms per step.
        parts = (dy.reshape(-1, c_out) @ kernel.reshape(-1, c_out).T).reshape(
            n, oh, ow, kh * kw, c_in)
        dx = jnp.zeros((n, hp, wp, c_in), parts.dtype)
        for i in range(kh):
            for j in range(kw):
                dx = dx.at[:, i : i + oh, j : j + ow].add(parts[:, :, :, i * kw + j])
        dx = dx[:, top : hp - bottom, left : wp - right]
    else:
        # dx[h] = sum_i dy[h + pad - i] k[i]: dy padded to a full correlation with the
        # flipped kernel (in and out channels swapped), less the forward padding.
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        dx = _forward_conv(dy, flipped, ((kh - 1 - top, kh - 1 - bottom),
                                         (kw - 1 - left, kw - 1 - right)))
    # dk[i, j, c, o] = sum_{n,h,w} x[n, h + i, w + j, c] dy[n, h, w, o].
    if few_input_channels(kernel.shape):
        # The transposed patches of x [kh*kw*C_in, N*H_out*W_out] are smaller than dy: one
        # matmul with them beats transposing dy for a convolution.
        x_t = pad(x, pads).transpose(3, 0, 1, 2)
        patches_t = jnp.stack(
            [x_t[:, :, i : i + oh, j : j + ow] for i in range(kh) for j in range(kw)]
        )
        dk = (patches_t.reshape(kh * kw * c_in, -1) @ dy.reshape(-1, c_out)).reshape(
            kernel.shape)
    else:
        # A forward conv with the channels of x as its batch and the examples as its
        # contracted features.
        dk = _forward_conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), pads)
        dk = dk.transpose(1, 2, 0, 3)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


conv_nhwc.defvjp(_conv_nhwc_fwd, conv_nhwc_bwd)
