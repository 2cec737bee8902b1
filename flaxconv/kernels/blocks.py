"""``conv -> bias -> relu -> max-pool`` as one block, the shape of every textbook conv layer.

Three formulations (:data:`BLOCK_FORMULATIONS`):

* ``"winograd"``: a 3x3 stride-1 kernel and a 2x2 pool as Winograd's F(2x2, 3x3)
  (:mod:`flaxconv.kernels.winograd`). Not for few input channels (``9*C_in <= C_out``, a
  first layer), where the patches matmul is cheaper, nor for other dtypes than float32.
* ``"fused"``: the convolution of :func:`~flaxconv.kernels.conv.conv_nhwc` and the pool as
  one VJP: the pool's gradient is written once, for the convolution's gradients, and the
  bias gradient is summed at pooled size, ``window**2`` times smaller.
* ``"unfused"``: the convolution (any formulation of :mod:`flaxconv.kernels.conv`), the
  bias, then :func:`~flaxconv.kernels.pool.max_pool` with the relu folded in.

Every one of them computes only the rows and columns that reach the pool's output (the
pool's floor drops the rest), and agrees with the layer-by-layer block to float32 rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from flaxconv.kernels.conv import (
    conv2d,
    conv_nhwc,
    conv_nhwc_bwd,
    few_input_channels,
    pad,
    padding_amounts,
)
from flaxconv.kernels.pool import check_window, max_pool, max_pool_bwd, max_pool_fwd
from flaxconv.kernels.precision import check_precision
from flaxconv.kernels.winograd import winograd_conv_relu_pool

BLOCK_FORMULATIONS = ("winograd", "fused", "unfused")


def winograd_applies(kernel_shape: Sequence[int], window: int, dtype) -> bool:
    """Whether the ``"winograd"`` block computes this block: a 3x3 kernel with several
    input channels, a 2x2 pool, float32."""
    kh, kw = kernel_shape[:2]
    return ((kh, kw, window) == (3, 3, 2) and not few_input_channels(kernel_shape)
            and jnp.dtype(dtype) == jnp.float32)


def conv_relu_pool(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
    window: int = 2,
    formulation: str = "unfused",
    conv_formulation: str = "im2col",
    precision: str | None = None,
) -> jax.Array:
    """``max_pool(relu(conv2d(x, kernel, padding=padding) + bias), window)``, stride 1.

    Args:
      x: ``[N, H, W, C_in]``.
      kernel: ``[kh, kw, C_in, C_out]``.
      bias: ``[C_out]`` or None.
      padding: of the convolution, as in :func:`~flaxconv.kernels.conv.conv2d`.
      window: the pool's size and stride.
      formulation: one of :data:`BLOCK_FORMULATIONS`; ``"winograd"`` where it does not
        apply (:func:`winograd_applies`) and ``"fused"`` with padding as wide as the kernel
        run as ``"unfused"``.
      conv_formulation: the convolution's formulation in an ``"unfused"`` block.
      precision: the convolution's, as in :func:`~flaxconv.kernels.conv.conv2d`.

    Returns:
      ``[N, H_out // window, W_out // window, C_out]``, ``H_out, W_out`` the convolution's
      output size, in the dtype of ``x``.
    """
    if formulation not in BLOCK_FORMULATIONS:
        raise ValueError(f"formulation={formulation!r}; expected one of {BLOCK_FORMULATIONS}")
    check_window(window)
    check_precision(precision)
    kh, kw, c_in, c_out = kernel.shape
    if bias is None:
        bias = jnp.zeros((c_out,), x.dtype)
    if x.ndim != 4 or x.shape[-1] != c_in or bias.shape != (c_out,):
        raise ValueError(f"input {x.shape} and bias {bias.shape} do not fit kernel "
                         f"{kernel.shape}: expected [N, H, W, {c_in}] and ({c_out},)")
    pad_h = padding_amounts(padding, x.shape[1], kh, 1, axis=0)
    pad_w = padding_amounts(padding, x.shape[2], kw, 1, axis=1)
    pooled_h = (x.shape[1] + sum(pad_h) - kh + 1) // window
    pooled_w = (x.shape[2] + sum(pad_w) - kw + 1) // window
    if min(pooled_h, pooled_w) < 1 or max(pad_h) >= kh or max(pad_w) >= kw:
        formulation = "unfused"
    if formulation == "winograd" and not winograd_applies(kernel.shape, window, x.dtype):
        formulation = "fused"
    if formulation == "unfused":
        y = conv2d(x, kernel, padding=(pad_h, pad_w), formulation=conv_formulation,
                   precision=precision)
        return max_pool(y + bias.astype(y.dtype), window, relu=True)
    # The rows and columns that reach the pool's output.
    x = pad(x, (pad_h, pad_w))[:, : window * pooled_h + kh - 1, : window * pooled_w + kw - 1]
    kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype)
    if formulation == "winograd":
        return winograd_conv_relu_pool(x, kernel, bias, precision)
    return _fused_conv_relu_pool(x, kernel, bias, window, precision)


_NO_PADDING = ((0, 0), (0, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused_conv_relu_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array, window: int,
                          precision: str | None) -> jax.Array:
    """The ``"fused"`` block on a VALID input whose output divides by ``window``."""
    return _fused_fwd(x, kernel, bias, window, precision)[0]


def _fused_fwd(x, kernel, bias, window, precision):
    pair = (window, window)
    y = conv_nhwc(x, kernel, _NO_PADDING, precision) + bias
    y, (_, position) = max_pool_fwd(y, pair, True)
    return y, (x, kernel, y, position)


def _fused_bwd(window, precision, residuals, dy):
    x, kernel, y, position = residuals
    dbias = jnp.where(y > 0, dy, jnp.zeros((), dy.dtype)).sum((0, 1, 2))
    (dconv,) = max_pool_bwd((window, window), True, (y, position), dy)
    dx, dkernel = conv_nhwc_bwd(_NO_PADDING, precision, (x, kernel), dconv)
    return dx, dkernel, dbias


_fused_conv_relu_pool.defvjp(_fused_fwd, _fused_bwd)
