"""Convolution and pooling layers with a per-backend choice of formulation.

Two formulations of the same 2-D convolution (NHWC inputs, HWIO kernels):

* ``"xla"``: ``lax.conv_general_dilated``. Best on GPU/TPU (cuDNN, the MXU).
* ``"im2col"``: the ``kh*kw`` shifted views of the input are concatenated on the channel
  axis and multiplied by the kernel reshaped to ``[kh*kw*C_in, C_out]``: one matmul forward
  and, for the gradients, one matmul plus slicing. XLA:CPU lowers the weight-gradient
  convolution inside loops (``lax.scan``) and under ``vmap`` (grouped convolutions) to a
  slow naive loop (jax-ml/jax#12868); the matmul form keeps both on its fast GEMM path.

``"auto"`` picks per backend from measurements recorded in ``benchmarks/RESULTS.md``
(``benchmarks/conv_impl.py`` reruns them): im2col on CPU, where it is several times faster
inside ``lax.scan``, and on GPU (an H200), where these small convolutions lose to one GEMM;
XLA's convolution elsewhere (TPU: not measured yet; its MXU runs convolutions natively).
Both formulations hold the same parameters, so checkpoints move freely between them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "im2col")

# Measured choice per backend (benchmarks/conv_impl.py); anything unknown gets XLA's conv.
_AUTO_CONV_IMPL = {"cpu": "im2col", "gpu": "im2col", "cuda": "im2col"}


def resolve_conv_impl(impl: str, backend: str | None = None) -> str:
    """Returns the concrete formulation ("xla" or "im2col") for ``impl`` on ``backend``.

    ``backend`` defaults to ``jax.default_backend()``; it is read at trace time.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={impl!r} is not one of {CONV_IMPLS}")
    if impl != "auto":
        return impl
    return _AUTO_CONV_IMPL.get(backend or jax.default_backend(), "xla")


def _padding_amounts(padding: str | Sequence[tuple[int, int]], size: int, k: int, s: int):
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0)
        if mode == "SAME":
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            return (total // 2, total - total // 2)
        raise ValueError(f"padding={padding!r}; expected 'SAME', 'VALID' or ((lo, hi), (lo, hi))")
    return tuple(padding)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "VALID",
    impl: str = "auto",
) -> jax.Array:
    """2-D cross-correlation, as ``lax.conv_general_dilated`` with NHWC/HWIO/NHWC.

    Args:
      x: ``[N, H, W, C_in]`` input.
      kernel: ``[kh, kw, C_in, C_out]`` filters.
      strides: ``(sh, sw)``.
      padding: ``"VALID"``, ``"SAME"`` or explicit ``((top, bottom), (left, right))``.
      impl: ``"xla"``, ``"im2col"`` or ``"auto"`` (see the module docstring).

    Returns:
      ``[N, H_out, W_out, C_out]``, with the dtype of ``x``; both formulations agree to
      float32 rounding, values and gradients.
    """
    impl = resolve_conv_impl(impl)
    kh, kw, c_in, c_out = kernel.shape
    if x.shape[-1] != c_in:
        raise ValueError(f"input has {x.shape[-1]} channels, kernel expects {c_in}: {x.shape}")
    pad_h = _padding_amounts(padding, x.shape[1], kh, strides[0])
    pad_w = _padding_amounts(padding, x.shape[2], kw, strides[1])
    if impl == "xla":
        return lax.conv_general_dilated(
            x, kernel, strides, (pad_h, pad_w), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    if any(pad_h) or any(pad_w):
        x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    sh, sw = strides
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    # Column order (i, j, c) matches kernel.reshape(kh * kw * c_in, c_out).
    columns = [
        x[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.concatenate(columns, axis=-1) if len(columns) > 1 else columns[0]
    return patches @ kernel.reshape(kh * kw * c_in, c_out)


def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
    """Non-overlapping ``window x window`` max pooling with Keras's "valid" floor.

    ``[N, H, W, C] -> [N, H // window, W // window, C]``. Written as a reshape and a max
    rather than ``reduce_window``, so the gradient is elementwise (no select-and-scatter)
    on every backend.
    """
    n, h, w, c = x.shape
    oh, ow = h // window, w // window
    if oh == 0 or ow == 0:
        raise ValueError(f"cannot max-pool a {h}x{w} feature map with a {window}x{window} window")
    x = x[:, : oh * window, : ow * window, :]
    return x.reshape(n, oh, window, ow, window, c).max(axis=(2, 4))


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


class Conv(nn.Module):
    """A 2-D convolution layer with the parameters of ``nn.Conv`` (``kernel``, ``bias``).

    Attributes:
      features: output channels.
      kernel_size: ``(kh, kw)``.
      strides: ``(sh, sw)``.
      padding: ``"VALID"`` (Keras's default) or ``"SAME"``.
      impl: convolution formulation, see :func:`conv2d`.
      kernel_init: initializer name from ``INITIALIZERS`` (Keras's glorot-uniform by default).
      dtype: computation dtype (``None``: the input's); parameters stay float32.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    use_bias: bool = True
    impl: str = "auto"
    kernel_init: str = "glorot_uniform"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", initializer(self.kernel_init), kernel_shape, jnp.float32)
        dtype = self.dtype or x.dtype
        y = conv2d(x.astype(dtype), kernel.astype(dtype), self.strides, self.padding, self.impl)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(dtype)
        return y


class MaxPool(nn.Module):
    """:func:`max_pool` as a module, so it has a name in summaries and feature-map plots."""

    window: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool(x, self.window)


class Flatten(nn.Module):
    """``[N, ...] -> [N, prod(...)]``, row-major like Keras's ``Flatten``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1)
