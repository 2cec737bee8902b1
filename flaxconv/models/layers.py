"""Convolution and pooling layers with a per-backend choice of formulation.

Three formulations of the same 2-D convolution (NHWC inputs, HWIO kernels):

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
* ``"im2col"``: the ``kh*kw`` shifted views of the input are concatenated on the channel
  axis and multiplied by the kernel reshaped to ``[kh*kw*C_in, C_out]``: one matmul forward
  and one for each gradient. Under ``vmap`` (populations) a batched matmul, where the
  convolutions would become grouped convolutions, which XLA:CPU runs slowly.

``"auto"`` picks per backend from measurements recorded in ``benchmarks/RESULTS.md``
(``benchmarks/conv_impl.py`` reruns them). On CPU: ``xla_nhwc`` inside :func:`tuned_jit`
(the library's own loops), which compiles with :data:`COMPILER_OPTIONS` so that XLA:CPU
runs the convolutions on Eigen rather than YNNPACK, and im2col everywhere else (with
YNNPACK's convolutions ``xla_nhwc`` is the slower one). On GPU (an H200) im2col, where
these small convolutions lose to one GEMM. XLA's convolution elsewhere (TPU: not
measured). :func:`resolve_conv_impl` with ``vmapped=True`` is the choice for vmapped
population members: im2col on CPU and GPU.
All formulations hold the same parameters, so checkpoints move freely between them.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
from jax import lax

CONV_IMPLS = ("auto", "xla", "xla_nhwc", "im2col")


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
# Also the choice for vmapped members. The CPU inside tuned_jit, where convolutions run on
# Eigen, has its own entry.
_AUTO_CONV_IMPL = {"cpu": "im2col", "gpu": "im2col", "cuda": "im2col"}
_AUTO_TUNED_CPU_CONV_IMPL = "xla_nhwc" if COMPILER_OPTIONS else "im2col"

# True while tuned_jit traces: the function is compiled with COMPILER_OPTIONS.
_tracing_tuned = contextvars.ContextVar("flaxconv_tracing_tuned", default=False)


def tuned_jit(fun: Callable, **jit_kwargs) -> Callable:
    """``jax.jit(fun, **jit_kwargs)`` compiled with :data:`COMPILER_OPTIONS`, under which
    ``conv_impl="auto"`` picks ``"xla_nhwc"`` on CPU.

    The library's own loops (``flaxconv.epochs.train_epoch``, ``fit``, populations,
    evaluation) are tuned jits. Like every ``compiler_options`` jit it must be called at
    the top level, not inside another ``jax.jit``; the public ``fc.train_step``,
    ``fc.eval_step`` and ``fc.predict`` are plain jits, composable anywhere, and use
    im2col on CPU. A researcher's own top-level loop can be one too::

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


def resolve_conv_impl(
    impl: str, backend: str | None = None, vmapped: bool = False, tuned: bool | None = None
) -> str:
    """Returns the concrete formulation ("xla", "xla_nhwc" or "im2col") for ``impl``.

    Args:
      impl: one of ``CONV_IMPLS``; anything but "auto" comes back as is.
      backend: defaults to ``jax.default_backend()``, read at trace time.
      vmapped: the layer runs under ``vmap`` with per-member kernels (a population), where
        XLA's convolutions become grouped convolutions.
      tuned: compiled by :func:`tuned_jit`; None reads it from the trace in progress.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={impl!r} is not one of {CONV_IMPLS}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    tuned = _tracing_tuned.get() if tuned is None else tuned
    if backend == "cpu" and tuned and not vmapped:
        return _AUTO_TUNED_CPU_CONV_IMPL
    return _AUTO_CONV_IMPL.get(backend, "xla")


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
      impl: ``"xla"``, ``"xla_nhwc"``, ``"im2col"`` or ``"auto"`` (see the module docstring).

    Returns:
      ``[N, H_out, W_out, C_out]``, with the dtype of ``x``; all formulations agree to
      float32 rounding, values and gradients.
    """
    impl = resolve_conv_impl(impl)
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
    n, h, w, c = x.shape
    oh, ow = h // window, w // window
    if oh == 0 or ow == 0:
        raise ValueError(f"cannot max-pool a {h}x{w} feature map with a {window}x{window} window")
    # Keras's floor drops the last rows and columns; the slice's gradient pads them back.
    return _max_pool(x[:, : oh * window, : ow * window, :], window, relu)


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
    stacked = jnp.stack([windows[:, :, i, :, j, :] for i in range(window) for j in range(window)])
    position = lax.broadcasted_iota(_position_dtype(window), stacked.shape, 0)

    def first_max(a, b):
        (a_value, a_position), (b_value, b_position) = a, b
        take_a = ((a_value > b_value) | jnp.isnan(a_value)
                  | ((a_value == b_value) & (a_position < b_position)))
        return jnp.where(take_a, a_value, b_value), jnp.where(take_a, a_position, b_position)

    init = (jnp.array(-jnp.inf, x.dtype), position.dtype.type(window * window))
    return lax.reduce((stacked, position), init, first_max, (0,))


def _position_dtype(window: int) -> jnp.dtype:
    return jnp.dtype(jnp.int8 if window * window < 128 else jnp.int32)


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
