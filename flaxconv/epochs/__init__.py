"""Epochs: the data order, the plan, and whole epochs inside XLA — the one place of each.

* :mod:`~flaxconv.epochs.order`: :func:`epoch_order`, the permutation every path visits
  its examples in (``fc.fit``, ``fc.data.batches``, image folders, populations, the
  data-parallel split), ``fit``'s seed of it (:func:`order_seed`), and :func:`pad_batch`,
  the one rule for the last partial batch.
* :mod:`~flaxconv.epochs.plan`: :class:`EpochPlan` (how N examples split into fixed-size
  batches; :class:`DataParallelPlan` with its batches split over a mesh) and
  :func:`place_for_fit`.
* :mod:`~flaxconv.epochs.scan`: an epoch as one jitted ``lax.scan`` of the train step
  (:func:`train_epoch`), or cut at any steps (:func:`run_epoch`, what ``fit`` runs), and
  an epoch of streamed batches (:func:`run_stream_epoch`).

The dataset lives on the device as uint8 (MNIST's 60,000 images are 47 MB), every epoch
has the same shapes, and nothing recompiles after the first call.

>>> images, labels = jax.device_put((train_images_uint8, train_labels))
>>> plan = epoch_plan(len(labels), batch_size=64)
>>> order = epoch_order(seed=0, epoch=3, n=len(labels))
>>> state, sums = train_epoch(state, images, labels, plan.indices(order), plan.mask)
"""

from flaxconv.epochs.order import (
    data_order_key,
    epoch_order,
    key_order,
    order_seed,
    pad_batch,
    padding_mask,
)
from flaxconv.epochs.plan import DataParallelPlan, EpochPlan, epoch_plan, place_for_fit
from flaxconv.epochs.scan import (
    gather_batch,
    run_epoch,
    run_stream_epoch,
    scan_chunks,
    sum_over_batches,
    train_epoch,
    train_epoch_fn,
    train_steps,
    train_steps_fn,
)

__all__ = [
    "DataParallelPlan",
    "EpochPlan",
    "data_order_key",
    "epoch_order",
    "epoch_plan",
    "gather_batch",
    "key_order",
    "order_seed",
    "pad_batch",
    "padding_mask",
    "place_for_fit",
    "run_epoch",
    "run_stream_epoch",
    "scan_chunks",
    "sum_over_batches",
    "train_epoch",
    "train_epoch_fn",
    "train_steps",
    "train_steps_fn",
]
