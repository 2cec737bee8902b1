"""Non-overlapping pooling (window = stride, no padding) as reshapes and reductions.

``reduce_window`` on XLA:CPU pools one window at a time, and its max gradient is a
select-and-scatter; for the windows of textbook convnets (2x2, stride 2) a reshape and a
reduction over the window axes is the same result in one vectorized pass, and the max's
gradient is written from the pooled output and the position of each window's maximum.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax


def check_window(window: int) -> None:
    """Raises a ValueError naming a window that is not a positive integer."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"pool window={window!r}; expected a positive integer")


def _pooled_size(x: jax.Array, window: tuple[int, int]) -> tuple[int, int]:
    n, h, w, c = x.shape
    oh, ow = h // window[0], w // window[1]
    if oh == 0 or ow == 0:
        raise ValueError(f"cannot pool a {h}x{w} feature map with a "
                         f"{window[0]}x{window[1]} window")
    return oh, ow


def _as_pair(window: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(window, numbers.Number):
        check_window(window)
        return int(window), int(window)
    pair = tuple(window) if isinstance(window, tuple | list) else ()
    if len(pair) != 2:
        raise ValueError(f"pool window={window!r}; expected an integer or (height, width)")
    for size in pair:
        check_window(size)
    return int(pair[0]), int(pair[1])


def max_pool(x: jax.Array, window: int | tuple[int, int] = 2, relu: bool = False
             ) -> jax.Array:
    """Non-overlapping max pooling with the "valid" floor (Keras's default).

    ``[N, H, W, C] -> [N, H // wh, W // ww, C]``, the same values as
    ``lax.reduce_window(x, -inf, lax.max, (1, wh, ww, 1), (1, wh, ww, 1), "VALID")``. The
    gradient goes to the first maximum of each window in row-major order, as in
    TensorFlow's MaxPool and XLA's select-and-scatter. Under differentiation the forward
    pass keeps only the pooled output and the (int8) position of each maximum, and the
    gradient is one elementwise pass from them, without reading ``x`` again.

    Args:
      x: ``[N, H, W, C]``.
      window: the pool's size and stride, ``k`` or ``(wh, ww)``.
      relu: return ``max_pool(relu(x))``: the two commute, and folded together the relu's
        gradient is a mask on the pooled output instead of another pass over ``x``.
    """
    window = _as_pair(window)
    oh, ow = _pooled_size(x, window)
    # The floor drops the last rows and columns; the slice's gradient pads them back.
    return _max_pool(x[:, : oh * window[0], : ow * window[1], :], window, relu)


def avg_pool(x: jax.Array, window: int | tuple[int, int] = 2) -> jax.Array:
    """Non-overlapping average pooling with the "valid" floor: the mean of each window, as
    a reshape and a sum (its gradient is a broadcast)."""
    wh, ww = _as_pair(window)
    return sum_pool(x, (wh, ww)) * (1.0 / (wh * ww))


def sum_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """The sum of each non-overlapping window ("valid" floor): ``reduce_window_sum``."""
    oh, ow = _pooled_size(x, window)
    n, _, _, c = x.shape
    x = x[:, : oh * window[0], : ow * window[1], :]
    return x.reshape(n, oh, window[0], ow, window[1], c).sum(axis=(2, 4))


def _pool_windows(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // window[0], window[0], w // window[1], window[1], c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x: jax.Array, window: tuple[int, int], relu: bool) -> jax.Array:
    y = _pool_windows(x, window).max(axis=(2, 4))
    return jnp.maximum(y, 0) if relu else y


def window_max_and_position(x: jax.Array, window: tuple[int, int]
                            ) -> tuple[jax.Array, jax.Array]:
    """The max of each window and the row-major position (int8) of its first maximum.

    One variadic reduce over the window positions stacked on a leading axis: XLA:CPU
    reduces a leading axis in one vectorized pass (reducing the interleaved window axes of
    ``_pool_windows`` took 10x longer), and a reduce is not re-fused into its consumers,
    which would recompute the comparisons from ``x`` for every one of them.
    """
    windows = _pool_windows(x, window)
    return first_max(jnp.stack([windows[:, :, i, :, j, :]
                                for i in range(window[0]) for j in range(window[1])]))


def first_max(stacked: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The max over the leading axis of ``stacked`` and the (int8) index of its first
    maximum (TensorFlow's tie rule; a NaN wins)."""
    size = stacked.shape[0]
    position = lax.broadcasted_iota(_position_dtype(size), stacked.shape, 0)

    def pick(a, b):
        (a_value, a_position), (b_value, b_position) = a, b
        take_a = ((a_value > b_value) | jnp.isnan(a_value)
                  | ((a_value == b_value) & (a_position < b_position)))
        return jnp.where(take_a, a_value, b_value), jnp.where(take_a, a_position, b_position)

    init = (jnp.array(-jnp.inf, stacked.dtype), position.dtype.type(size))
    return lax.reduce((stacked, position), init, pick, (0,))


def _position_dtype(size: int) -> jnp.dtype:
    return jnp.dtype(jnp.int8 if size < 128 else jnp.int32)


def max_pool_fwd(x, window, relu):
    """The forward pass of :func:`max_pool` (on a map divisible by ``window``) with its
    residuals ``(y, position)``."""
    y, position = window_max_and_position(x, window)
    if relu:
        y = jnp.maximum(y, 0)
    return y, (y, position)


def max_pool_bwd(window, relu, residuals, dy):
    """The gradient of :func:`max_pool` from ``residuals = (y, position)``."""
    y, position = residuals
    if relu:
        # The relu's gradient at the window's maximum: whether the pooled output is positive.
        dy = jnp.where(y > 0, dy, jnp.zeros((), dy.dtype))
    n, oh, ow, c = y.shape
    wh, ww = window
    # A window-sized table, broadcast inside the fusion: a full-size iota would be hoisted
    # out of the training loop and read back from memory at every step.
    order = jnp.arange(wh * ww, dtype=position.dtype).reshape(wh, ww)
    at_max = position[:, :, None, :, None, :] == order[:, None, :, None]
    dx = jnp.where(at_max, dy[:, :, None, :, None, :], jnp.zeros((), dy.dtype))
    return (dx.reshape(n, oh * wh, ow * ww, c),)


_max_pool.defvjp(max_pool_fwd, max_pool_bwd)
