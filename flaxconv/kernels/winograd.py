"""Winograd's F(2x2, 3x3) (Lavin & Gray, 2016): a conv -> relu -> 2x2 max-pool block, and a
lone 3x3 stride-1 convolution.

Each 2x2 tile of the convolution's output is made from its 4x4 input tile with 16 products
per channel pair instead of 36: 16 matmuls ``[N*tiles, C_in] @ [C_in, C_out]`` between
additive input, filter and output transforms. The forward pass, the input gradient and the
kernel gradient each do 4/9 of the direct convolution's multiply-adds. The output transform
yields the four positions of each tile separately, and those are exactly the 2x2 pool's
windows, so the pool is a max over four arrays and the output map is never interleaved. A
lone convolution interleaves them (one transpose each way).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from flaxconv.kernels.pool import first_max
from flaxconv.kernels.precision import matmul_precision

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


def _winograd_phases(x: jax.Array, kernel: jax.Array):
    """The four output positions of every 2x2 tile, ``[4, N*T*S, C_out]`` (row-major within
    the tile), for ``x`` ``[N, 2T + 2, 2S + 2, C_in]`` and a 3x3 ``kernel``; and the
    transformed operands the gradients need."""
    v = _winograd_input_transform(x)
    u = _winograd_filter_transform(kernel)
    m = [[v[a][b] @ u[a][b] for b in range(4)] for a in range(4)]
    rows = [[_combine(_WINOGRAD_AT[p], [m[a][b] for a in range(4)]) for b in range(4)]
            for p in range(2)]
    phases = [_combine(_WINOGRAD_AT[q], rows[p]) for p in range(2) for q in range(2)]
    return jnp.stack(phases), (v, u)


def _winograd_phases_bwd(v, u, dphases: list[jax.Array], n: int, t: int, s: int):
    """The gradients of ``x`` and ``kernel`` from those of the four phases, each
    ``[N*T*S, C_out]``."""
    at = _columns(_WINOGRAD_AT)
    rows = [[_combine(at[b], dphases[2 * p : 2 * p + 2]) for b in range(4)] for p in range(2)]
    dm = [[_combine(at[a], [rows[p][b] for p in range(2)]) for b in range(4)] for a in range(4)]
    dv = [[dm[a][b] @ u[a][b].T for b in range(4)] for a in range(4)]
    du = [[v[a][b].T @ dm[a][b] for b in range(4)] for a in range(4)]
    dx = _winograd_input_transform_transpose(dv, n, t, s)
    return dx, _winograd_filter_transform_transpose(du)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def winograd_conv_relu_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                            precision: str | None = None) -> jax.Array:
    """``x`` ``[N, 2T + 2, 2S + 2, C_in]``, 3x3 ``kernel`` -> ``[N, T, S, C_out]``; its
    matmuls at ``precision`` (see :func:`~flaxconv.kernels.precision.matmul_precision`)."""
    return _winograd_conv_relu_pool_fwd(x, kernel, bias, precision)[0]


def _winograd_conv_relu_pool_fwd(x, kernel, bias, precision):
    n, h, w, _ = x.shape
    # The output transform yields each tile's positions apart: the pool's windows.
    with matmul_precision(precision):
        phases, (v, u) = _winograd_phases(x, kernel)
    y, position = first_max(phases + bias)
    y = jnp.maximum(y, 0).reshape(n, (h - 2) // 2, (w - 2) // 2, -1)
    return y, (v, u, y, position)


def _winograd_conv_relu_pool_bwd(precision, residuals, dy):
    v, u, y, position = residuals
    n, t, s, c_out = y.shape
    # The relu's gradient at the window's maximum, then the pool's: to the first maximum.
    dy = jnp.where(y > 0, dy, jnp.zeros((), dy.dtype))
    dbias = dy.sum((0, 1, 2))
    dy = dy.reshape(-1, c_out)
    dphases = [jnp.where(position == k, dy, jnp.zeros((), dy.dtype)) for k in range(4)]
    with matmul_precision(precision):
        dx, dkernel = _winograd_phases_bwd(v, u, dphases, n, t, s)
    return dx, dkernel, dbias


winograd_conv_relu_pool.defvjp(_winograd_conv_relu_pool_fwd, _winograd_conv_relu_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _winograd_conv_valid(x: jax.Array, kernel: jax.Array, precision: str | None) -> jax.Array:
    """``x`` ``[N, 2T + 2, 2S + 2, C_in]``, 3x3 ``kernel`` -> ``[N, 2T, 2S, C_out]``."""
    return _winograd_conv_valid_fwd(x, kernel, precision)[0]


def _winograd_conv_valid_fwd(x, kernel, precision):
    n, h, w, _ = x.shape
    t, s = (h - 2) // 2, (w - 2) // 2
    with matmul_precision(precision):
        phases, (v, u) = _winograd_phases(x, kernel)
    # Interleave the phases: (p, q) of tile (i, j) is output pixel (2i + p, 2j + q).
    y = phases.reshape(2, 2, n, t, s, -1).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(n, 2 * t, 2 * s, -1), (v, u)


def _winograd_conv_valid_bwd(precision, residuals, dy):
    v, u = residuals
    n, h, w, c_out = dy.shape
    t, s = h // 2, w // 2
    tiles = dy.reshape(n, t, 2, s, 2, c_out)
    dphases = [tiles[:, :, p, :, q].reshape(-1, c_out) for p in range(2) for q in range(2)]
    with matmul_precision(precision):
        return _winograd_phases_bwd(v, u, dphases, n, t, s)


_winograd_conv_valid.defvjp(_winograd_conv_valid_fwd, _winograd_conv_valid_bwd)


def winograd_conv_applies(kernel_shape: Sequence[int], strides: Sequence[int],
                          pads: Sequence[tuple[int, int]], dtype) -> bool:
    """Whether :func:`winograd_conv` computes this convolution: a 3x3 kernel, stride 1,
    padding of 0-2 on each side, float32."""
    return (tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
            and all(0 <= p <= 2 for side in pads for p in side)
            and jnp.dtype(dtype) == jnp.float32)


def winograd_conv(x: jax.Array, kernel: jax.Array, pads: Sequence[tuple[int, int]],
                  precision: str | None = None) -> jax.Array:
    """A lone 3x3, stride-1 convolution as Winograd F(2x2, 3x3) (``"winograd"``).

    Args:
      x: ``[N, H, W, C_in]`` float32.
      kernel: ``[3, 3, C_in, C_out]``.
      pads: ``((top, bottom), (left, right))``, see :func:`winograd_conv_applies`.
      precision: of its matmuls, forward and backward (see
        :func:`~flaxconv.kernels.precision.matmul_precision`).

    Returns:
      ``[N, H_out, W_out, C_out]``, ``H_out = H + top + bottom - 2``. An odd output size
      is computed one row (column) larger on zeros and cropped; pad and crop are outside the
      custom VJP, so JAX differentiates them.
    """
    (top, bottom), (left, right) = pads
    out_h = x.shape[1] + top + bottom - 2
    out_w = x.shape[2] + left + right - 2
    x = jnp.pad(x, ((0, 0), (top, bottom + out_h % 2), (left, right + out_w % 2), (0, 0)))
    return _winograd_conv_valid(x, kernel, precision)[:, :out_h, :out_w]
