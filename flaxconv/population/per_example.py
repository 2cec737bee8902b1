"""Per-example gradients: the population's trick — ``jax.vmap`` of a whole step — with the
batch axis instead of the member axis (:func:`per_example_grads`).
"""

from __future__ import annotations

from typing import Any

import jax

from flaxconv.state import TrainState
from flaxconv.steps import Batch, check_batch, loss_fn


def per_example_grads_fn(state: TrainState, batch: Batch) -> Any:
    """Gradient of each example's own loss, ``jax.vmap(jax.grad(loss))`` over the batch; pure.

    Example ``b``'s gradient is ``jax.grad`` of :func:`flaxconv.steps.loss_fn` with
    respect to ``state.params`` on the batch of one ``batch[b:b+1]``: the training-mode
    loss, with the current step's rngs. So dropout, if the model has it, is active and
    every example draws the mask from the same key (one example's view of this step), and
    BatchNorm normalizes each example by its own statistics. For models with neither, the
    mean of the per-example gradients over the unmasked examples is ``train_step``'s
    gradient.

    Args:
      state: a single (not population) :class:`TrainState`.
      batch: ``{"image": [B, H, W, C], "label": int[B]}`` and an optional ``"mask"``
        ``bool[B]``; masked examples get zero gradients.

    Returns:
      A tree shaped like ``state.params`` with a leading axis ``B``, float32.
    """
    images, labels, mask = check_batch(state, batch)

    def one(image, label, m):
        grad_fn = jax.grad(loss_fn, has_aux=True)
        return grad_fn(state.params, state, image[None], label[None], m[None])[0]

    return jax.vmap(one)(images, labels, mask)


#: ``per_example_grads(state, batch) -> grads [B, ...]``: jitted :func:`per_example_grads_fn`.
per_example_grads = jax.jit(per_example_grads_fn)
