"""Convolution and pooling layers with a per-backend choice of formulation.

Four formulations of the same 2-D convolution (NHWC inputs, HWIO kernels):

* ``"xla"``: ``lax.conv_general_dilated`` with JAX's own gradients. Best on TPU (the MXU).
* ``"xla_nhwc"``: the same forward convolution, with a custom VJP that writes both
  gradients as forward NHWC/HWIO convolutions too: the input gradient correlates the padded
  output gradient with the flipped kernel, and the kernel gradient swaps the roles of batch
  and channels (``x^T [C_in, H, W, N]`` correlated with ``dy^T [H_out, W_out, N, C_out]``).
  JAX's own kernel gradient is a convolution with non-canonical dimension numbers, which
  XLA:CPU runs as a naive loop inside ``lax.scan`` (jax-ml/jax#12868); in canonical form all
  three run on XLA:CPU's Eigen convolution kernels. Where a matmul does less work it is used
  instead: a layer with few input channels (the first: ``kh*kw*C_in <= C_out``) runs forward
  and kernel gradient as one matmul with its (small) patches, and a small output (conv_2's
  3x3, where the full correlation would mostly multiply padding) gets its input gradient
  as one matmul summed back onto the input (col2im). Stride 1 only; other strides, and
  paddings wider than the kernel, use im2col.
* ``"winograd"``: a conv -> relu -> 2x2 pool block with a 3x3 kernel
  (:func:`conv_relu_pool`, how ``ConvStack`` trains) runs as Winograd's F(2x2, 3x3): 16
  matmuls with 4/9 of the direct convolution's multiply-adds, whose four output phases are
  the pool's windows. Not for the first layer (``kh*kw*C_in <= C_out``), where the patches
  matmul is cheaper, nor for other dtypes than float32. Every other convolution runs as
  ``xla_nhwc`` inside :func:`tuned_jit` and as ``im2col`` elsewhere.
* ``"im2col"``: the ``kh*kw`` shifted views of the input are concatenated on the channel
  axis and multiplied by the kernel reshaped to ``[kh*kw*C_in, C_out]``: one matmul forward
  and one for each gradient. Under ``vmap`` (populations) a batched matmul, where the
  convolutions would become grouped convolutions, which XLA:CPU runs slowly.

``"auto"`` picks per backend from measurements recorded in ``benchmarks/RESULTS.md``
(``benchmarks/conv_impl.py`` reruns them). On CPU ``winograd``: in :func:`tuned_jit` (the
library's own loops), which compiles with :data:`COMPILER_OPTIONS` so that XLA:CPU runs
the convolutions on Eigen rather than YNNPACK, its lone convolutions are ``xla_nhwc``; in
any other jit im2col (with YNNPACK's convolutions ``xla_nhwc`` is the slower one). On GPU
(an H200) im2col, where these small convolutions lose to one GEMM (Winograd not measured
there). XLA's convolution elsewhere (TPU: not measured). :func:`resolve_conv_impl` with
``vmapped=True`` is the choice for vmapped population members: im2col on CPU and GPU.
All formulations hold the same parameters, so checkpoints move freely between them.
"""

from __future__ import annotations

import contextvars
import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
from jax import lax

CONV_IMPLS = ("auto", "xla", "xla_nhwc", "winograd", "im2col")


def _compiler_options() -> dict[str, str]:
    # XLA:CPU gives NHWC convolutions to YNNPACK by default; on these small convolutions its
    # kernels ran 2-20x slower than Eigen's (benchmarks/RESULTS.md §3). The option keeps dots
    # and reductions on YNNPACK and sends convolutions to Eigen. It is an experimental
    # DebugOptions field, checked to exist in jaxlib 0.10.x only; elsewhere nothing is set.
    version = tuple(int(part) for part in jaxlib.__version__.split(".")[:3] if part.isdigit())
    if (0, 10, 2) <= version < (0, 11):
        return {
            "xla_cpu_experimental_ynn_fusion_type": (
                "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
            )
        }
    return {}


#: The ``compiler_options`` that :func:`tuned_jit` passes to ``jax.jit``.
COMPILER_OPTIONS: dict[str, str] = _compiler_options()

# Measured choice per backend (benchmarks/conv_impl.py); anything unknown gets XLA's conv.
_AUTO_CONV_IMPL = {"cpu": "winograd", "gpu": "im2col", "cuda": "im2col"}
# For vmapped members (populations), where XLA's convolutions become grouped convolutions.
_AUTO_VMAPPED_CONV_IMPL = {"cpu": "im2col", "gpu": "im2col", "cuda": "im2col"}

# True while tuned_jit traces: the function is compiled with COMPILER_OPTIONS.
_tracing_tuned = contextvars.ContextVar("flaxconv_tracing_tuned", default=False)


def tuned_jit(fun: Callable, **jit_kwargs) -> Callable:
    """``jax.jit(fun, **jit_kwargs)`` compiled with :data:`COMPILER_OPTIONS`, under which
    the convolutions outside Winograd blocks run on XLA:CPU's Eigen kernels (``"xla_nhwc"``)
    rather than as im2col.

    The library's own loops (``flaxconv.epochs.train_epoch``, ``fit``, populations,
    evaluation) are tuned jits. Like every ``compiler_options`` jit it must be called at
    the top level, not inside another ``jax.jit``; the public ``fc.train_step``,
    ``fc.eval_step`` and ``fc.predict`` are plain jits, composable anywhere (on CPU about 7%
    slower per training step). A researcher's own top-level loop can be one too::

        epoch = fc.models.tuned_jit(my_epoch_fn, donate_argnums=0)
    """

    @functools.wraps(fun)
    def traced_tuned(*args, **kwargs):
        token = _tracing_tuned.set(True)
        try:
            return fun(*args, **kwargs)
        finally:
            _tracing_tuned.reset(token)

    return jax.jit(traced_tuned, compiler_options=COMPILER_OPTIONS, **jit_kwargs)


def resolve_conv_impl(impl: str, backend: str | None = None, vmapped: bool = False) -> str:
    """Returns the concrete formulation ("xla", "xla_nhwc", "winograd" or "im2col") for
    ``impl``.

    Args:
      impl: one of ``CONV_IMPLS``; anything but "auto" comes back as is.
      backend: defaults to ``jax.default_backend()``, read at trace time.
      vmapped: the layer runs under ``vmap`` with per-member kernels (a population), where
        XLA's convolutions become grouped convolutions.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={impl!r} is not one of {CONV_IMPLS}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    return (_AUTO_VMAPPED_CONV_IMPL if vmapped else _AUTO_CONV_IMPL).get(backend, "xla")


def _lone_conv_impl(impl: str) -> str:
    """The formulation of a convolution outside a Winograd block, for the trace in progress:
    ``"winograd"`` runs it as ``"xla_nhwc"`` inside :func:`tuned_jit`, whose
    :data:`COMPILER_OPTIONS` keep XLA:CPU's convolutions on Eigen, and as ``"im2col"``
    elsewhere (on YNNPACK, XLA's convolutions are the slower); every other concrete
    formulation stays itself."""
    if impl != "winograd":
        return impl
    return "xla_nhwc" if _tracing_tuned.get() and COMPILER_OPTIONS else "im2col"


def _padding_amounts(padding: str | Sequence[tuple[int, int]], size: int, k: int, s: int,
                     axis: int) -> tuple[int, int]:
    """(low, high) padding of spatial ``axis`` (0: height, 1: width)."""
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
      impl: one of ``CONV_IMPLS`` (see the module docstring); ``"winograd"`` applies to
        :func:`conv_relu_pool`, and a lone convolution runs it as ``"xla_nhwc"`` inside
        :func:`tuned_jit` and as ``"im2col"`` elsewhere.

    Returns:
      ``[N, H_out, W_out, C_out]``, with the dtype of ``x``; all formulations agree to
      float32 rounding, values and gradients.
    """
    impl = _lone_conv_impl(resolve_conv_impl(impl))
    kh, kw, c_in, c_out = kernel.shape
    if x.shape[-1] != c_in:
        raise ValueError(f"input has {x.shape[-1]} channels, kernel expects {c_in}: {x.shape}")
    pad_h = _padding_amounts(padding, x.shape[1], kh, strides[0], axis=0)
    pad_w = _padding_amounts(padding, x.shape[2], kw, strides[1], axis=1)
    if impl == "xla":
        return lax.conv_general_dilated(
            x, kernel, strides, (pad_h, pad_w), dimension_numbers=_NHWC
        )
    if impl == "xla_nhwc" and tuple(strides) == (1, 1) and max(pad_h) < kh and max(pad_w) < kw:
        return _conv_nhwc(x, kernel, (tuple(pad_h), tuple(pad_w)))
    if any(pad_h) or any(pad_w):
        x = _pad(x, (pad_h, pad_w))
    sh, sw = strides
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    # Column order (i, j, c) matches kernel.reshape(kh * kw * c_in, c_out).
    patches = _patches(x, kh, kw, out_h, out_w, strides)
    return patches @ kernel.reshape(kh * kw * c_in, c_out)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _forward_conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


def _few_input_channels(kernel: jax.Array) -> bool:
    # The first layer (C_in = 1): its patches [N*H*W, kh*kw*C_in] are no larger than its
    # output, and one matmul with them beats Eigen's convolution with a 9-deep contraction.
    kh, kw, c_in, c_out = kernel.shape
    return kh * kw * c_in <= c_out


def _patches(x: jax.Array, kh: int, kw: int, out_h: int, out_w: int, strides=(1, 1)):
    """``[N, out_h, out_w, kh*kw*C]``: the shifted views of (padded) ``x``, (i, j, c) order."""
    sh, sw = strides
    columns = [
        x[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(columns, axis=-1) if len(columns) > 1 else columns[0]


def _pad(x: jax.Array, padding) -> jax.Array:
    (top, bottom), (left, right) = padding
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_nhwc(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """Stride-1 convolution whose gradients are forward NHWC convolutions or matmuls."""
    if _few_input_channels(kernel):
        kh, kw, c_in, c_out = kernel.shape
        xp = _pad(x, padding)
        oh, ow = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
        return _patches(xp, kh, kw, oh, ow) @ kernel.reshape(kh * kw * c_in, c_out)
    return _forward_conv(x, kernel, padding)


def _conv_nhwc_fwd(x, kernel, padding):
    return _conv_nhwc(x, kernel, padding), (x, kernel)


def _conv_nhwc_bwd(padding, residuals, dy):
    x, kernel = residuals
    kh, kw, c_in, c_out = kernel.shape
    (top, bottom), (left, right) = padding
    n, oh, ow, _ = dy.shape
    hp, wp = x.shape[1] + top + bottom, x.shape[2] + left + right
    if hp * wp > 1.5 * oh * ow:
        # A small output (conv_2's 3x3): the full correlation below would mostly multiply
        # padding, so the patch gradients come from one matmul and are summed back (col2im).
        # Adding each tap's slab in place beat a sum of padded slabs by ~0.2 ms per step.
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
    if _few_input_channels(kernel):
        # The transposed patches of x [kh*kw*C_in, N*H_out*W_out] are smaller than dy: one
        # matmul with them beats transposing dy for a convolution.
        x_t = _pad(x, padding).transpose(3, 0, 1, 2)
        patches_t = jnp.stack(
            [x_t[:, :, i : i + oh, j : j + ow] for i in range(kh) for j in range(kw)]
        )
        dk = (patches_t.reshape(kh * kw * c_in, -1) @ dy.reshape(-1, c_out)).reshape(kernel.shape)
    else:
        # A forward conv with the channels of x as its batch and the examples as its
        # contracted features.
        dk = _forward_conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), padding)
        dk = dk.transpose(1, 2, 0, 3)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def max_pool(x: jax.Array, window: int = 2, relu: bool = False) -> jax.Array:
    """Non-overlapping ``window x window`` max pooling with Keras's "valid" floor.

    ``[N, H, W, C] -> [N, H // window, W // window, C]``: a reshape and a max rather than
    ``reduce_window``. The gradient goes to the first maximum of each window in row-major
    order, as in TensorFlow's MaxPool (JAX's ``max`` would split it among ties). Under
    differentiation the forward pass keeps only the pooled output and the (int8) position of
    each maximum, and the gradient is written from them in one elementwise pass, without
    reading ``x`` again.

    Args:
      x: ``[N, H, W, C]``.
      window: the pool size and stride.
      relu: return ``max_pool(relu(x))``: the two commute, and folded together the relu's
        gradient is a mask on the pooled output instead of another pass over ``x``.
    """
    _check_window(window)
    n, h, w, c = x.shape
    oh, ow = h // window, w // window
    if oh == 0 or ow == 0:
        raise ValueError(f"cannot max-pool a {h}x{w} feature map with a {window}x{window} window")
    # Keras's floor drops the last rows and columns; the slice's gradient pads them back.
    return _max_pool(x[:, : oh * window, : ow * window, :], window, relu)


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"pool window={window!r}; expected a positive integer")


def _pool_windows(x: jax.Array, window: int) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // window, window, w // window, window, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x: jax.Array, window: int, relu: bool) -> jax.Array:
    y = _pool_windows(x, window).max(axis=(2, 4))
    return jnp.maximum(y, 0) if relu else y


def _window_max_and_position(x: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """The max of each window and the row-major position (int8) of its first maximum.

    One variadic reduce over the window positions stacked on a leading axis: XLA:CPU
    reduces a leading axis in one vectorized pass (reducing the interleaved window axes of
    ``_pool_windows`` took 10x longer), and a reduce is not re-fused into its consumers,
    which would recompute the comparisons from ``x`` for every one of them.
    """
    windows = _pool_windows(x, window)
    return _first_max(
        jnp.stack([windows[:, :, i, :, j, :] for i in range(window) for j in range(window)]))


def _first_max(stacked: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The max over the leading axis of ``stacked`` and the (int8) index of its first maximum
    (TensorFlow's tie rule; a NaN wins)."""
    size = stacked.shape[0]
    position = lax.broadcasted_iota(_position_dtype(size), stacked.shape, 0)

    def first_max(a, b):
        (a_value, a_position), (b_value, b_position) = a, b
        take_a = ((a_value > b_value) | jnp.isnan(a_value)
                  | ((a_value == b_value) & (a_position < b_position)))
        return jnp.where(take_a, a_value, b_value), jnp.where(take_a, a_position, b_position)

    init = (jnp.array(-jnp.inf, stacked.dtype), position.dtype.type(size))
    return lax.reduce((stacked, position), init, first_max, (0,))


def _position_dtype(size: int) -> jnp.dtype:
    return jnp.dtype(jnp.int8 if size < 128 else jnp.int32)


def _max_pool_fwd(x, window, relu):
    y, position = _window_max_and_position(x, window)
    if relu:
        y = jnp.maximum(y, 0)
    return y, (y, position)


def _max_pool_bwd(window, relu, residuals, dy):
    y, position = residuals
    if relu:
        # The relu's gradient at the window's maximum: whether the pooled output is positive.
        dy = jnp.where(y > 0, dy, jnp.zeros((), dy.dtype))
    n, oh, ow, c = y.shape
    # A window-sized table, broadcast inside the fusion: a full-size iota would be hoisted
    # out of the training loop and read back from memory at every step.
    order = jnp.arange(window * window, dtype=position.dtype).reshape(window, window)
    at_max = position[:, :, None, :, None, :] == order[:, None, :, None]
    dx = jnp.where(at_max, dy[:, :, None, :, None, :], jnp.zeros((), dy.dtype))
    return (dx.reshape(n, oh * window, ow * window, c),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def conv_relu_pool(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    padding: str | Sequence[tuple[int, int]] = "VALID",
    window: int = 2,
    impl: str = "auto",
) -> jax.Array:
    """``max_pool(relu(conv2d(x, kernel, padding=padding) + bias), window)`` as one block.

    With ``impl="winograd"`` (CPU's "auto"), a 3x3 kernel and a 2x2 pool run as Winograd's
    F(2x2, 3x3) (Lavin & Gray, 2016): each 2x2 tile of the output is made from its 4x4 input
    tile with 16 products per channel pair instead of 36, as 16 matmuls
    ``[N*tiles, C_in] @ [C_in, C_out]``, and the forward pass, the input gradient and the
    kernel gradient each do 4/9 of the direct convolution's multiply-adds. The output
    transform yields the four positions of each tile separately, and those are exactly the
    pool's windows, so the pool is a max over four arrays and the output map is never
    interleaved. Values and gradients match the direct convolution to float32 rounding.

    Otherwise (few input channels, ``9 * C_in <= C_out`` as in a first layer; other kernels,
    windows or dtypes than float32; other formulations) the convolution runs directly: as
    one VJP with the pool where it is ``xla_nhwc``'s (inside :func:`tuned_jit`, or a first
    layer's patches matmul), so the pool's gradient is written once and the bias gradient
    is summed at pooled size; else as :func:`conv2d` followed by :func:`max_pool`. Either
    way the rows and columns that the pool's floor drops are never computed.

    Args:
      x: ``[N, H, W, C_in]``.
      kernel: ``[kh, kw, C_in, C_out]``.
      bias: ``[C_out]``.
      padding: of the convolution, as in :func:`conv2d`.
      window: the pool's size and stride.
      impl: convolution formulation, see :func:`conv2d`.

    Returns:
      ``[N, H_out // window, W_out // window, C_out]`` with ``H_out, W_out`` the convolution's
      output size, the dtype of ``x``.
    """
    impl = resolve_conv_impl(impl)
    _check_window(window)
    kh, kw, c_in, c_out = kernel.shape
    if x.shape[-1] != c_in or bias.shape != (c_out,):
        raise ValueError(f"input {x.shape} and bias {bias.shape} do not fit kernel "
                         f"{kernel.shape}: expected [N, H, W, {c_in}] and ({c_out},)")
    pad_h = _padding_amounts(padding, x.shape[1], kh, 1, axis=0)
    pad_w = _padding_amounts(padding, x.shape[2], kw, 1, axis=1)
    pooled_h = (x.shape[1] + sum(pad_h) - kh + 1) // window
    pooled_w = (x.shape[2] + sum(pad_w) - kw + 1) // window
    few_input_channels = _few_input_channels(kernel)
    winograd = (impl == "winograd" and (kh, kw, window) == (3, 3, 2) and not few_input_channels
                and x.dtype == jnp.float32)
    # The direct block convolves as _conv_nhwc: Eigen's convolution (in tuned_jit), or for
    # few input channels a patches matmul, fast anywhere.
    direct = _lone_conv_impl(impl) == "xla_nhwc" or (impl == "winograd" and few_input_channels)
    if (not (winograd or direct) or min(pooled_h, pooled_w) < 1
            or max(pad_h) >= kh or max(pad_w) >= kw):
        return max_pool(conv2d(x, kernel, padding=padding, impl=impl) + bias, window, relu=True)
    # The rows and columns that reach the pool's output.
    x = _pad(x, (pad_h, pad_w))[:, : window * pooled_h + kh - 1, : window * pooled_w + kw - 1]
    kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype)
    if winograd:
        return _winograd_conv_relu_pool(x, kernel, bias)
    return _direct_conv_relu_pool(x, kernel, bias, window)


_NO_PADDING = ((0, 0), (0, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _direct_conv_relu_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array, window: int
                           ) -> jax.Array:
    """The block with the convolution of :func:`_conv_nhwc` (VALID, output divisible by
    ``window``). As one VJP, the pool's gradient is written once, for the kernel gradient
    alone, and the bias gradient is summed from the pooled gradient, ``window**2`` times
    smaller."""
    return _direct_conv_relu_pool_fwd(x, kernel, bias, window)[0]


def _direct_conv_relu_pool_fwd(x, kernel, bias, window):
    y, (_, position) = _max_pool_fwd(_conv_nhwc(x, kernel, _NO_PADDING) + bias, window, True)
    return y, (x, kernel, y, position)


def _direct_conv_relu_pool_bwd(window, residuals, dy):
    x, kernel, y, position = residuals
    dbias = jnp.where(y > 0, dy, jnp.zeros((), dy.dtype)).sum((0, 1, 2))
    (dconv,) = _max_pool_bwd(window, True, (y, position), dy)
    dx, dkernel = _conv_nhwc_bwd(_NO_PADDING, (x, kernel), dconv)
    return dx, dkernel, dbias


_direct_conv_relu_pool.defvjp(_direct_conv_relu_pool_fwd, _direct_conv_relu_pool_bwd)


# Winograd F(2x2, 3x3): B^T (input), G (filter) and A^T (output) transforms. With d a 4x4
# input tile and g a 3x3 filter, the 2x2 output tile is A^T [(G g G^T) * (B^T d B)] A.
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _combine(coefficients: Sequence[float], terms: Sequence[jax.Array]) -> jax.Array:
    """``sum_i coefficients[i] * terms[i]``. The transforms' entries are 0, +-1 and +-1/2:
    written as adds, XLA fuses each transform into elementwise loops."""
    total = None
    for coefficient, term in zip(coefficients, terms, strict=True):
        if coefficient == 0:
            continue
        term = term if coefficient == 1 else -term if coefficient == -1 else coefficient * term
        total = term if total is None else total + term
    return total


def _columns(matrix: Sequence[Sequence[float]]) -> list[tuple[float, ...]]:
    return list(zip(*matrix, strict=True))


def _winograd_input_transform(x: jax.Array) -> list[list[jax.Array]]:
    """``v[a][b]``, ``[N*T*S, C]``: entry (a, b) of ``B^T d B`` for each of the ``T x S``
    4x4 tiles ``d`` (stride 2) of ``x`` ``[N, 2T + 2, 2S + 2, C]``."""
    n, h, w, c = x.shape
    t, s = (h - 2) // 2, (w - 2) // 2
    # d[i][j][n, u, v] = x[n, 2u + i, 2v + j]: entry (i, j) of every tile.
    d = [[x[:, i : i + 2 * t - 1 : 2, j : j + 2 * s - 1 : 2] for j in range(4)] for i in range(4)]
    rows = [[_combine(_WINOGRAD_BT[a], [d[i][j] for i in range(4)]) for j in range(4)]
            for a in range(4)]
    return [[_combine(_WINOGRAD_BT[b], rows[a]).reshape(-1, c) for b in range(4)]
            for a in range(4)]


def _winograd_input_transform_transpose(dv: list[list[jax.Array]], n: int, t: int, s: int
                                        ) -> jax.Array:
    """The gradient of ``x`` ``[N, 2T + 2, 2S + 2, C]`` from the gradients of ``v``."""
    bt = _columns(_WINOGRAD_BT)
    rows = [[_combine(bt[j], dv[a]) for j in range(4)] for a in range(4)]
    dd = [[_combine(bt[i], [rows[a][j] for a in range(4)]).reshape(n, t, s, -1)
           for j in range(4)] for i in range(4)]

    # Tiles overlap by two rows and columns: pixel (2u + r, 2v + c), r, c in {0, 1}, is entry
    # (r, c) of tile (u, v), (r + 2, c) of tile (u - 1, v), (r, c + 2) of (u, v - 1) and
    # (r + 2, c + 2) of (u - 1, v - 1). Summed per phase (r, c), then interleaved.
    def shifted(a: jax.Array, down: int, right: int) -> jax.Array:
        return jnp.pad(a, ((0, 0), (down, 1 - down), (right, 1 - right), (0, 0)))

    phases = jnp.stack([
        shifted(dd[r][c], 0, 0) + shifted(dd[r + 2][c], 1, 0)
        + shifted(dd[r][c + 2], 0, 1) + shifted(dd[r + 2][c + 2], 1, 1)
        for r in range(2) for c in range(2)
    ])
    phases = phases.reshape(2, 2, n, t + 1, s + 1, -1).transpose(2, 3, 0, 4, 1, 5)
    return phases.reshape(n, 2 * t + 2, 2 * s + 2, -1)


def _winograd_filter_transform(kernel: jax.Array) -> list[list[jax.Array]]:
    """``u[a][b]``, ``[C_in, C_out]``: entry (a, b) of ``G g G^T`` for a 3x3 ``kernel``."""
    rows = [_combine(_WINOGRAD_G[a], [kernel[i] for i in range(3)]) for a in range(4)]
    return [[_combine(_WINOGRAD_G[b], [rows[a][j] for j in range(3)]) for b in range(4)]
            for a in range(4)]


def _winograd_filter_transform_transpose(du: list[list[jax.Array]]) -> jax.Array:
    """The gradient of the 3x3 kernel ``[3, 3, C_in, C_out]`` from the gradients of ``u``."""
    g = _columns(_WINOGRAD_G)
    rows = [[_combine(g[i], [du[a][b] for a in range(4)]) for b in range(4)] for i in range(3)]
    return jnp.stack([jnp.stack([_combine(g[j], rows[i]) for j in range(3)]) for i in range(3)])


@jax.custom_vjp
def _winograd_conv_relu_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``x`` ``[N, 2T + 2, 2S + 2, C_in]``, 3x3 ``kernel`` -> ``[N, T, S, C_out]``."""
    return _winograd_conv_relu_pool_fwd(x, kernel, bias)[0]


def _winograd_conv_relu_pool_fwd(x, kernel, bias):
    n, h, w, _ = x.shape
    v = _winograd_input_transform(x)
    u = _winograd_filter_transform(kernel)
    m = [[v[a][b] @ u[a][b] for b in range(4)] for a in range(4)]
    rows = [[_combine(_WINOGRAD_AT[p], [m[a][b] for a in range(4)]) for b in range(4)]
            for p in range(2)]
    # Output position (p, q) of every tile: the four positions of every pool window, in the
    # row-major order of the window.
    phases = jnp.stack([_combine(_WINOGRAD_AT[q], rows[p]) for p in range(2) for q in range(2)])
    y, position = _first_max(phases + bias)
    y = jnp.maximum(y, 0).reshape(n, (h - 2) // 2, (w - 2) // 2, -1)
    return y, (v, u, y, position)


def _winograd_conv_relu_pool_bwd(residuals, dy):
    v, u, y, position = residuals
    n, t, s, c_out = y.shape
    # The relu's gradient at the window's maximum, then the pool's: to the first maximum.
    dy = jnp.where(y > 0, dy, jnp.zeros((), dy.dtype))
    dbias = dy.sum((0, 1, 2))
    dy = dy.reshape(-1, c_out)
    dphases = [jnp.where(position == k, dy, jnp.zeros((), dy.dtype)) for k in range(4)]
    at = _columns(_WINOGRAD_AT)
    rows = [[_combine(at[b], dphases[2 * p : 2 * p + 2]) for b in range(4)] for p in range(2)]
    dm = [[_combine(at[a], [rows[p][b] for p in range(2)]) for b in range(4)] for a in range(4)]
    dv = [[dm[a][b] @ u[a][b].T for b in range(4)] for a in range(4)]
    du = [[v[a][b].T @ dm[a][b] for b in range(4)] for a in range(4)]
    dx = _winograd_input_transform_transpose(dv, n, t, s)
    return dx, _winograd_filter_transform_transpose(du), dbias


_winograd_conv_relu_pool.defvjp(_winograd_conv_relu_pool_fwd, _winograd_conv_relu_pool_bwd)


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
    def __call__(self, x: jax.Array, relu_pool: int | None = None) -> jax.Array:
        """``[N, H, W, C_in] -> [N, H_out, W_out, features]``; with ``relu_pool=window``
        (stride 1 only), ``max_pool(relu(conv(x)), window)`` computed as one block by
        :func:`conv_relu_pool`, as ``ConvStack`` trains its conv blocks."""
        kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", initializer(self.kernel_init), kernel_shape, jnp.float32)
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
                .astype(dtype) if self.use_bias else None)
        if relu_pool:
            if tuple(self.strides) != (1, 1):
                raise ValueError(f"relu_pool needs strides (1, 1), got {self.strides}")
            if bias is None:
                bias = jnp.zeros((self.features,), dtype)
            return conv_relu_pool(x, kernel, bias, self.padding, relu_pool, self.impl)
        y = conv2d(x, kernel, self.strides, self.padding, self.impl)
        return y if bias is None else y + bias


class MaxPool(nn.Module):
    """:func:`max_pool` as a module, so it has a name in summaries and feature-map plots.

    Attributes:
      window: pool size and stride.
      relu: pool ``relu(x)`` (see :func:`max_pool`); ``ConvStack`` folds each conv block's
        relu into its pool this way.
    """

    window: int = 2
    relu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool(x, self.window, self.relu)


class Flatten(nn.Module):
    """``[N, ...] -> [N, prod(...)]``, row-major like Keras's ``Flatten``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1)
