"""``fc.data.stream``: one epoch of a named dataset in fixed-shape batches, through grain (the
default) or tf.data (``backend="tf"``).

The grain backend reads the split into host memory once (:func:`flaxconv.data.load`: the
raw IDX files with numpy when ``$FLAXCONV_DATA_DIR`` holds them, so no TensorFlow import)
and streams it to the step in :func:`flaxconv.epochs.epoch_order`, the order of every other
path: for data that fits on the host but should not sit on the device. The tf backend is
the tf.data pipeline of :mod:`flaxconv.data.tf_stream`, with tf.data's buffer shuffle.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np

from flaxconv.data import tf_stream
from flaxconv.data._common import (
    DATA_DIR_ENV,
    Batch,
    _check_non_negative_int,
    _check_positive_int,
    _env_dir,
)
from flaxconv.data.grain_stream import ArraySource, check_workers, grain_batches
from flaxconv.data.idx_files import _SPLIT_FILES
from flaxconv.data.sources import load

BACKENDS = ("grain", "tf")


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
    backend: str = "grain",
    start: int = 0,
    workers: int | None = None,
) -> Iterator[Batch]:
    """One epoch of batches of ``split`` of dataset ``name``.

    ``fc.fit(state, lambda epoch, start=0: fc.data.stream("mnist", "train", 128,
    shuffle=True, seed=s, epoch=epoch, start=start), epochs)`` streams MNIST through grain;
    with the ``start`` parameter, a resumed run skips the batches it already trained on
    without reading them.

    Args:
        name, split: as in :func:`load`.
        batch_size: rows per batch, a positive int.
        shuffle: grain: visit the examples in :func:`flaxconv.epochs.epoch_order`
            ``(seed, epoch, N)``, the order ``fc.data.batches(*fc.data.load(name, split),
            shuffle=True, seed=seed, epoch=epoch)`` gives; tf: tf.data's own shuffle (see
            :func:`flaxconv.data.tf_stream.tf_batches`). Without it, the source's order.
        seed, epoch: non-negative ints selecting the order; unused without shuffle.
        data_dir: a tfds data dir. grain: with it, the split is tfds's preparation there
            (``load(..., source="tfds")``, tfds's order); without it, ``load``'s
            ``source="auto"`` (the raw IDX files when present). tf: as in :func:`load`.
        buffer_size: tf.data's shuffle buffer in examples, a positive int (tf only).
        backend: "grain" (default; runs without TensorFlow) or "tf" (tf.data; needs
            tensorflow and tensorflow_datasets).
        start: batches to skip, a non-negative int at most ``ceil(N / batch_size)``, so the
            first batch is batch ``start`` of the epoch: the resumable position. grain does
            not read the skipped batches; tf.data reads and drops them.
        workers: grain's read threads (see :func:`flaxconv.data.grain_batches`; None:
            :func:`flaxconv.data.grain_stream.default_workers`); the batches are the same
            for any number. The tf backend tunes its own (``AUTOTUNE``) and refuses it.

    Returns:
        An iterator of numpy dicts, the keys, shapes and dtypes of :func:`batches`:
        ``image`` uint8 ``[batch_size, H, W, C]``, ``label`` int32 ``[batch_size]``,
        ``mask`` bool ``[batch_size]``; the last partial batch is zero-padded with ``mask ==
        False``. The grain backend keeps the split in host memory (up to two splits per
        process, re-read when their files change), so calling it once per epoch reads
        the files once.

    Raises:
        DatasetUnavailableError, ValueError: as in :func:`load`; a bad ``backend``,
            ``batch_size``, ``seed``, ``epoch``, ``start`` or ``workers``, naming the value.
            All at call time.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {list(BACKENDS)}")
    # The cheap checks first: a bad argument is refused before the split is read.
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("buffer_size", buffer_size)
    _check_non_negative_int("seed", seed)
    _check_non_negative_int("epoch", epoch)
    _check_non_negative_int("start", start)
    if backend == "tf":
        if workers is not None:
            raise ValueError(
                f"workers={workers!r} with backend='tf'; expected None (tf.data tunes its own "
                "parallelism) or backend='grain'"
            )
        return tf_stream.tf_batches(name, split, batch_size, shuffle, seed, epoch, data_dir,
                                    buffer_size, start)
    workers = check_workers(workers)
    images, labels = host_split(name, split, data_dir)
    return grain_batches(
        ArraySource(images, labels), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
        start=start, workers=workers,
    )


def host_split(
    name: str, split: str, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The grain backend's arrays: ``load(name, split, source=..., data_dir=data_dir)``
    (``"tfds"`` with a ``data_dir``, else ``"auto"``), read-only, kept per process for
    the two most recent splits and read again when ``$FLAXCONV_DATA_DIR`` or its raw
    files (their size and modification time) change.

    Returns:
        ``(images uint8 [N, H, W, C], labels int32 [N])``, read-only.
    """
    source = "auto" if data_dir is None else "tfds"
    data_dir = None if data_dir is None else os.fspath(data_dir)
    return _cached_load(name, split, source, data_dir, os.environ.get(DATA_DIR_ENV),
                        _raw_files_stamp(name, split))


def _raw_files_stamp(name: str, split: str) -> tuple | None:
    """``(size, mtime_ns)`` of the split's raw IDX files, or None where there are none."""
    root = _env_dir()
    if root is None or split not in _SPLIT_FILES:
        return None
    try:
        stats = [os.stat(root / name / file) for file in _SPLIT_FILES[split]]
    except OSError:
        return None
    return tuple((s.st_size, s.st_mtime_ns) for s in stats)


@functools.lru_cache(maxsize=2)
def _cached_load(name, split, source, data_dir, env_dir, stamp):
    """One :func:`load` per distinct argument tuple (``env_dir`` and ``stamp`` are there
    for the cache key: ``load`` reads the environment itself)."""
    del env_dir, stamp
    images, labels = load(name, split, source=source, data_dir=data_dir)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels
