"""The streaming pipeline: any random-access source, through grain, in
:func:`flaxconv.epochs.epoch_order`, as fixed-shape numpy batches.

A *source* is anything with ``len(source)`` and ``source[i]`` -> one example (for
:class:`ArraySource`, ``{"image": uint8 [H, W, C], "label": int32 []}``; an image folder's
decodes one file). :func:`grain_batches` visits its examples in
``epoch_order(seed, epoch, len(source))`` (``arange`` without shuffle), cuts that order into
batches of ``batch_size`` indices, and has grain read batch ``b`` (the ``source[i]`` of its
indices, then ``collate``, then :func:`flaxconv.epochs.pad_batch`) on ``workers`` threads, a
bounded number of batches ahead of the consumer, handed out in order.

Why batches, not examples, are grain's elements: a batch is a function of its index alone,
so ``start=k`` skips the first ``k`` batches without reading them (the resumable position:
``fc.fit`` passes the steps it already took), any number of workers gives the same batches,
and grain's per-element bookkeeping is paid once per batch rather than once per image.

Why threads (grain's ``ReadOptions.num_threads``), not processes: Pillow's decoders and
numpy's resize release the GIL, so threads decode large PNGs/JPEGs in parallel, with no
pickling of the source, no process start-up and nothing to fork under a running JAX. For
tiny images (28x28 PNGs) Pillow's per-file Python work holds the GIL and the threads give
about one core's worth: on the 2-CPU development machine a third of Keras's tf.data reader
(TensorFlow's C++ decoder), still 1.7x what the sign_language_cnn step consumes; on a CPU-only
machine the train step needs the other cores anyway (``benchmarks/input_pipeline.py``,
``benchmarks/RESULTS.md`` §5).

grain is imported when a pipeline is built, not when this module is.
"""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from flaxconv.data._common import (
    Batch,
    _check_non_negative_int,
    _check_positive_int,
    check_start,
    num_batches,
)
from flaxconv.epochs.order import epoch_order, pad_batch

#: The most read threads :func:`default_workers` picks.
MAX_WORKERS = 16
# Batches read ahead per worker: one being read while one waits for the consumer.
_AHEAD_PER_WORKER = 2


class Source(Protocol):
    """What :func:`grain_batches` reads: random access to single examples."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class ArraySource:
    """In-memory arrays as a :class:`Source`: ``source[i]`` is ``{"image": images[i],
    "label": labels[i]}`` (views, no copy).

    Args:
      images: ``[N, H, W, C]`` (uint8 from :func:`flaxconv.data.load`; the dtype is kept).
      labels: int32 ``[N]``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(
                f"images and labels must have the same length, got {len(images)} images "
                f"and {len(labels)} labels"
            )
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}


def stack(examples: Sequence[dict[str, Any]], indices: np.ndarray) -> dict[str, np.ndarray]:
    """The default ``collate``: ``k`` example dicts -> one dict of ``[k, ...]`` arrays (each
    key's values stacked, dtypes kept). ``indices`` (the examples' source indices) is unused."""
    del indices
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def default_workers() -> int:
    """``min(16, os.cpu_count())``: read threads for :func:`grain_batches` when none are
    given. Decoding large images releases the GIL, so one thread per core keeps the cores
    busy; more than 16 only adds memory (each thread has up to two batches in flight)."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def check_workers(workers: int | None) -> int:
    """``workers`` as an int (None: :func:`default_workers`).

    Raises:
      ValueError: not None or a non-negative int, naming the value.
    """
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 0:
        raise ValueError(
            f"workers={workers!r}; expected None (one per CPU, at most {MAX_WORKERS}), 0 "
            "(read in the consuming thread) or a positive int (read threads)"
        )
    return int(workers)


def grain_batches(
    source: Source,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    workers: int | None = None,
    collate: Callable[[list, np.ndarray], dict[str, np.ndarray]] = stack,
) -> Iterator[Batch]:
    """One epoch of ``source`` in fixed-shape numpy batches, read by grain.

    Args:
      source: ``len`` and ``source[i]`` -> one example (see :class:`Source`); read from
        ``workers`` threads at once, so ``__getitem__`` must be thread-safe.
      batch_size: rows per batch, a positive int.
      shuffle: visit the examples in :func:`flaxconv.epochs.epoch_order` ``(seed, epoch,
        N)`` (the order ``fc.data.batches`` and ``fc.fit`` give that seed and epoch); else
        in index order.
      seed, epoch: non-negative ints selecting the permutation; checked but unused without
        shuffle.
      start: batches to skip, a non-negative int at most ``ceil(N / batch_size)``: they are
        not read, and the first batch yielded is batch ``start`` of the epoch.
      workers: grain's read threads (``ReadOptions.num_threads``), each reading whole
        batches, up to ``2 * workers`` batches ahead of the consumer; 0 reads each batch in
        the consuming thread when it is asked for; None: :func:`default_workers`. The
        batches are the same for any number.
      collate: ``(examples, indices) -> {key: [k, ...]}``: the ``k <= batch_size`` examples
        of a batch and their source indices (int ``[k]``) as one dict of arrays; default
        :func:`stack`. Its exceptions reach the consumer unchanged, when it asks for that
        batch.

    Returns:
      An iterator of dicts ``{**collate's keys: [batch_size, ...], "mask": bool
      [batch_size]}``: every batch has ``batch_size`` rows; the last one is padded with
      zero rows that have ``mask == False`` (:func:`flaxconv.epochs.pad_batch`). Closing it
      (or dropping it) stops the read threads.

    Raises:
      ValueError: immediately, for a bad ``batch_size``, ``seed``, ``epoch``, ``start`` or
        ``workers`` (naming the value), or an empty source.
    """
    _check_positive_int("batch_size", batch_size)
    _check_non_negative_int("seed", seed)
    _check_non_negative_int("epoch", epoch)
    workers = check_workers(workers)
    n = len(source)
    if n == 0:
        raise ValueError("the source is empty (0 examples); expected at least one example")
    start = check_start(start, n, batch_size)
    order = epoch_order(seed, epoch, n) if shuffle else np.arange(n)

    def read(b: int) -> Batch:
        indices = order[b * batch_size : (b + 1) * batch_size]
        return pad_batch(collate([source[int(i)] for i in indices], indices), batch_size)

    return in_order(read, num_batches(n, batch_size), start=start, workers=workers)


def in_order(
    fn: Callable[[int], Any], count: int, *, start: int = 0, workers: int = 0
) -> Iterator[Any]:
    """``fn(i)`` for ``i`` in ``range(start, count)``, in that order, computed by grain on
    ``workers`` threads (0: by the consumer, when asked), at most ``2 * workers`` ahead.

    A generator: closing it (or an exception in the consumer's loop) closes grain's
    iterator, which cancels what is queued. An exception from ``fn(i)`` is raised as is
    when the consumer asks for item ``i``, from this generator rather than from inside
    grain (whose traceback filter would append a note about its own frames).
    """
    import grain

    options = grain.ReadOptions(
        num_threads=workers, prefetch_buffer_size=_AHEAD_PER_WORKER * workers
    )
    dataset = grain.MapDataset.range(start, count).map(functools.partial(_caught, fn))
    return _raising(iter(dataset.to_iter_dataset(options)))


class _Raised:
    """What ``fn`` raised, carried through grain to the consumer's thread."""

    def __init__(self, error: BaseException):
        self.error = error


def _caught(fn: Callable[[int], Any], i: int) -> Any:
    try:
        return fn(i)
    except Exception as error:  # re-raised by _raising, in the consumer's thread
        return _Raised(error)


def _raising(iterator) -> Iterator[Any]:
    try:
        for item in iterator:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        iterator.close()
