"""One epoch of fixed-shape batches from a tf.data pipeline over a tfds dataset:
``fc.data.stream(..., backend="tf")`` (grain is the default backend, see
:mod:`flaxconv.data.streaming`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from flaxconv.data._common import Batch, check_start
from flaxconv.data.tfds_source import _check_features, _import_tfds, _prepared_builder


def tf_batches(name: str, split: str, batch_size: int, shuffle: bool, seed: int, epoch: int,
               data_dir: str | os.PathLike | None, buffer_size: int, start: int
               ) -> Iterator[Batch]:
    """``fc.data.stream(..., backend="tf")``: one epoch from a tf.data pipeline over the
    tfds dataset, which :func:`~flaxconv.data.load` prepares with ``source="tfds"`` (offline
    from ``$FLAXCONV_DATA_DIR/<name>/`` when present). The arguments are
    :func:`~flaxconv.data.stream`'s, checked there; each call builds a fresh pipeline.

    With ``shuffle``, file order and examples are shuffled (a buffer of ``buffer_size``
    examples) with a seed derived from ``(seed, epoch)``: reproducible, and different per
    epoch. A buffer is not a permutation of the whole split, so this order is tf.data's own,
    not :func:`flaxconv.epochs.epoch_order`'s. The ``start`` batches skipped are still read
    and decoded (``Dataset.skip``); ``start`` is checked against the split's size when
    tf.data knows it.

    Returns:
        Numpy batch dicts as :func:`~flaxconv.data.batches`' (``image`` uint8 ``[B, H, W,
        C]``, ``label`` int32 ``[B]``, ``mask`` bool ``[B]``; the last one zero-padded).
    """
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
    num_examples = int(ds.cardinality())
    if num_examples >= 0:  # tf.data.UNKNOWN_CARDINALITY (-2) or INFINITE (-1): unchecked
        check_start(start, num_examples, batch_size)
    ds = ds.map(
        lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if shuffle:
        ds = ds.shuffle(buffer_size, seed=tf_seed, reshuffle_each_iteration=False)
    ds = ds.batch(batch_size).map(lambda b: _pad_tf_batch(b, batch_size))
    if start:
        ds = ds.skip(start)
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
