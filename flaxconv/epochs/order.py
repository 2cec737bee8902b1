"""The one data order and the one padding rule of every epoch, on every path.

:func:`epoch_order` is the permutation that ``fc.fit`` (array data), ``fc.data.batches``,
image folders, populations and the data-parallel split (``fc.parallel.process_batches``)
all visit their examples in, so the same ``(seed, epoch)`` gives the same order on each.
``fit`` takes its seed from the state (:func:`order_seed`); a PRNG key stands for the
``(seed, epoch)`` pair of its two words (:func:`key_order`, :func:`data_order_key`).

:func:`pad_batch` is the one rule for the last partial batch: zero rows appended, and
``mask`` False on them, so every batch has the same shape and every example counts once.

Everything here runs on the host with numpy, except :func:`order_seed` and
:func:`data_order_key`, which are traceable (``jax.vmap`` over a population works).
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from flaxconv.state import TrainState

# Data-order seeds live in their own fold_in domain, apart from the per-step keys.
_DATA_ORDER_DOMAIN = 0x7FFFFFFF


def _check_int(what: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        kind = "a positive" if low > 0 else "a non-negative"
        raise ValueError(f"{what}={value!r}; expected {kind} integer")
    return int(value)


def _permutation(entropy: list[int], n: int) -> np.ndarray:
    return np.random.default_rng(entropy).permutation(n).astype(np.int32)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` of a run seeded ``seed`` visits ``n`` examples.

    ``np.random.default_rng([seed, epoch]).permutation(n)``: reproducible, different per
    epoch, and a function of ``(seed, epoch, n)`` alone, so a resumed run sees the order
    an uninterrupted one does. Host numpy, not traced.

    Args:
      seed, epoch: non-negative ints (numpy integers too).
      n: the number of examples, a non-negative int.

    Returns:
      int32 ``[n]``, a permutation of ``0 .. n - 1``.

    Raises:
      ValueError: a negative or non-integer ``seed``, ``epoch`` or ``n``, naming it.
    """
    entropy = [_check_int("seed", seed, 0), _check_int("epoch", epoch, 0)]
    return _permutation(entropy, _check_int("n", n, 0))


def key_order(key: jax.Array, n: int) -> np.ndarray:
    """:func:`epoch_order` for a PRNG key: its uint32 words are the entropy, so the key
    ``jax.random.wrap_key_data(uint32 [seed, epoch])`` (what :func:`data_order_key` gives)
    is ``epoch_order(seed, epoch, n)``, and ``jax.random.key(s)`` is ``epoch_order(0, s,
    n)``. Host numpy: the key is read back from the device.

    Args:
      key: one typed key (``jax.random.key``) or raw uint32 key data.
      n: the number of examples.

    Returns:
      int32 ``[n]``, a permutation.
    """
    key = jnp.asarray(key)
    words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    words = np.asarray(words)
    if words.dtype != np.uint32 or words.ndim != 1:
        raise ValueError(
            f"key has key data of shape {words.shape} and dtype {words.dtype}; expected one "
            f"PRNG key (uint32 words)"
        )
    return _permutation([int(w) for w in words], _check_int("n", n, 0))


def order_seed(state: TrainState) -> jax.Array:
    """The data-order seed of ``state``: uint32 ``[]``, ``jax.random.bits`` of
    ``fold_in(state.rng, 0x7FFFFFFF)``, a function of the state's rng only (which training
    does not change), so a resumed run keeps its orders. Pure and traceable; ``fc.fit``
    visits epoch ``e`` of array data in ``epoch_order(int(order_seed(state)), e, N)``,
    and a stream of ``fc.data.batches(..., shuffle=True, seed=int(order_seed(state)),
    epoch=e)`` reproduces that run."""
    base = jax.random.fold_in(jax.random.wrap_key_data(state.rng), _DATA_ORDER_DOMAIN)
    return jax.random.bits(base, (), jnp.uint32)


def data_order_key(state: TrainState, epoch: int | jax.Array) -> jax.Array:
    """The key of ``fc.fit``'s order in ``epoch``: ``[order_seed(state), epoch]`` as a
    threefry key, so :func:`key_order` (and ``EpochPlan.indices``) of it is
    ``epoch_order(order_seed(state), epoch, N)``. Pure; ``jax.vmap(data_order_key,
    in_axes=(0, None))(population, epoch)`` gives each member the order ``fit`` gives it."""
    words = jnp.stack([order_seed(state), jnp.asarray(epoch, jnp.uint32)])
    return jax.random.wrap_key_data(words, impl="threefry2x32")


def padding_mask(rows: int, batch_size: int) -> np.ndarray:
    """bool ``[batch_size]``: True for the ``rows`` real rows, False for the padding."""
    return np.arange(batch_size) < rows


def pad_batch(batch: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    """The last partial batch made whole: every leaf ``[k, ...]`` (``k <= batch_size``)
    padded with zero rows to ``[batch_size, ...]`` (its dtype kept), and ``mask`` bool
    ``[batch_size]`` False on the padding (:func:`padding_mask`). Host numpy.

    Raises:
      ValueError: leaves of different lengths, or longer than ``batch_size``.
    """
    batch = {name: np.asarray(x) for name, x in batch.items()}
    sizes = {name: len(x) for name, x in batch.items()}
    k = next(iter(sizes.values()), 0)
    if any(size != k for size in sizes.values()) or k > batch_size:
        raise ValueError(
            f"pad_batch got rows {sizes}; expected one length of at most batch_size="
            f"{batch_size}"
        )
    padded = {
        name: np.concatenate([x, np.zeros((batch_size - k, *x.shape[1:]), x.dtype)])
        if k < batch_size else x
        for name, x in batch.items()
    }
    padded["mask"] = padding_mask(k, batch_size)
    return padded
