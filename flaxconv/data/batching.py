"""Fixed-shape numpy batches of in-memory arrays: the last partial batch padded and masked
(:func:`flaxconv.epochs.pad_batch`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from flaxconv.data._common import Batch, _check_non_negative_int, _check_positive_int
from flaxconv.epochs.order import epoch_order, pad_batch


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = False,
) -> Iterator[Batch]:
    """One epoch of fixed-shape numpy batches.

    Args:
        images: ``[N, H, W, C]`` (uint8 from :func:`load`; the dtype is kept).
        labels: integer ``[N]``.
        batch_size: rows per batch, a positive int.
        shuffle: visit the examples in :func:`flaxconv.epochs.epoch_order`
            ``(seed, epoch, N)``, the order of every path (reproducible, different per
            epoch; ``fc.fit`` on arrays uses it with ``seed=int(fc.epochs.order_seed(state))``).
        seed, epoch: non-negative ints selecting the permutation; ignored without shuffle.
        drop_remainder: drop the last partial batch instead of padding it.

    Yields:
        ``{"image": [batch_size, H, W, C] (images' dtype), "label": int32 [batch_size],
        "mask": bool [batch_size]}``. Only the last batch may be padded: its padding rows
        are zero images with label 0 and ``mask == False``, so every example appears
        exactly once with ``mask == True`` per epoch.

    Raises:
        ValueError: immediately (not on first ``next``) for a bad ``batch_size``, seed or
            epoch, arrays of the wrong rank, different lengths, or no examples.
    """
    _check_positive_int("batch_size", batch_size)
    _check_non_negative_int("seed", seed)
    _check_non_negative_int("epoch", epoch)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, H, W, C], got shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape [N], got shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(
            f"images and labels must have the same length, got {len(images)} images "
            f"and {len(labels)} labels"
        )
    if len(labels) == 0:
        raise ValueError("images and labels are empty (N=0), expected at least one example")
    n = len(labels)
    order = epoch_order(seed, epoch, n) if shuffle else np.arange(n)
    return _iter_batches(images, labels, order, batch_size, drop_remainder)


def _iter_batches(
    images: np.ndarray,
    labels: np.ndarray,
    order: np.ndarray,
    batch_size: int,
    drop_remainder: bool,
) -> Iterator[Batch]:
    n = len(order)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield pad_batch({"image": images[idx], "label": labels[idx].astype(np.int32)},
                        batch_size)
