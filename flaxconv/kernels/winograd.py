"""Winograd's F(2x2, 3x3) (Lavin & Gray, 2016) for a conv -> relu -> 2x2 max-pool block.

Each 2x2 tile of the convolution's output is made from its 4x4 input tile with 16 products
per channel pair instead of 36: 16 matmuls ``[N*tiles, C_in] @ [C_in, C_out]`` between
additive input, filter and output transforms. The forward pass, the input gradient and the
kernel gradient each do 4/9 of the direct convolution's multiply-adds. The output transform
yields the four positions of each tile separately, and those are exactly the 2x2 pool's
windows, so the pool is a max over four arrays and the output map is never interleaved.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from flaxconv.kernels.pool import first_max

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
def winograd_conv_relu_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
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
    y, position = first_max(phases + bias)
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


winograd_conv_relu_pool.defvjp(_winograd_conv_relu_pool_fwd, _winograd_conv_relu_pool_bwd)
