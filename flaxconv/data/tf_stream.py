"""One epoch of fixed-shape batches from a tf.data pipeline over a tfds dataset."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from flaxconv.data._common import Batch, _check_non_negative_int, _check_positive_int
from flaxconv.data.sources import _check_features, _import_tfds, _prepared_builder


def stream(
    name: str,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    data_dir: str | os.PathLike | None = None,
    buffer_size: int = 10_000,
) -> Iterator[Batch]:
    """One epoch of batches from a tf.data pipeline over the tfds dataset.

    The dataset is prepared as in :func:`load` with ``source="tfds"`` (offline from
    ``$FLAXCONV_DATA_DIR/<name>/`` when present). Each call builds a fresh pipeline and
    makes one pass over ``split``.

    Args:
        name, split, data_dir: as in :func:`load`.
        batch_size: rows per batch, a positive int.
        shuffle: shuffle file order and examples (buffer of ``buffer_size`` examples)
            with a seed derived from ``(seed, epoch)``: reproducible, and different per
            epoch when the caller passes the epoch number. A buffer is not a permutation of
            the whole split, so this order is tf.data's own, not
            :func:`flaxconv.epochs.epoch_order`'s; for that order, :func:`load` the arrays
            and use :func:`batches`.
        seed, epoch: non-negative ints; ignored without shuffle.
        buffer_size: shuffle buffer size in examples, a positive int.

    Returns:
        An iterator of numpy dicts with the same keys, shapes and dtypes as
        :func:`batches`: ``image`` uint8 ``[batch_size, H, W, C]``, ``label`` int32
        ``[batch_size]``, ``mask`` bool ``[batch_size]``; the last partial batch is
        zero-padded with ``mask == False``.

    Raises:
        DatasetUnavailableError, ValueError: as in :func:`load`, at call time.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("buffer_size", buffer_size)
    _check_non_negative_int("seed", seed)
    _check_non_negative_int("epoch", epoch)
    tfds = _import_tfds()
    import tensorflow as tf

    builder = _prepared_builder(name, data_dir)
    tf_seed = int(np.random.default_rng([seed, epoch]).integers(2**31))
    ds = builder.as_dataset(
        split=split,
        shuffle_files=shuffle,
        read_config=tfds.ReadConfig(shuffle_seed=tf_seed),
    )
    _check_features(name, ds.element_spec)
    ds = ds.map(
        lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if shuffle:
        ds = ds.shuffle(buffer_size, seed=tf_seed, reshuffle_each_iteration=False)
    ds = ds.batch(batch_size).map(lambda b: _pad_tf_batch(b, batch_size))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds))


def _pad_tf_batch(batch, batch_size: int):
    """:func:`flaxconv.epochs.pad_batch`'s rule (zero rows, ``mask`` False on them) as a
    tf.data graph op, which keeps the batch dimension static and the pipeline in C++."""
    import tensorflow as tf

    image, label = batch["image"], batch["label"]
    k = tf.shape(label)[0]
    pad = batch_size - k
    image = tf.pad(image, [[0, pad]] + [[0, 0]] * (image.shape.rank - 1))
    label = tf.pad(label, [[0, pad]])
    return {
        "image": tf.ensure_shape(image, [batch_size, *image.shape[1:]]),
        "label": tf.ensure_shape(label, [batch_size]),
        "mask": tf.sequence_mask(k, batch_size),
    }
