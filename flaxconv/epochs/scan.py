"""Whole epochs inside XLA: one ``lax.scan`` of the train step over a plan's indices, the
same epoch cut at any steps (``lax.fori_loop`` with traced bounds), and the sums of a
function over every batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxconv.epochs.plan import EpochPlan
from flaxconv.state import TrainState
from flaxconv.steps import Batch, Metrics, explain_kernels, train_step_fn


def gather_batch(images: jax.Array, labels: jax.Array, idx: jax.Array, mask: jax.Array,
                 weights: jax.Array | None = None) -> Batch:
    """The batch dict for example indices ``idx`` (images stay uint8 until the step), with
    each example's ``"weight"`` from float32 ``weights [N]`` when given."""
    batch = {"image": images[idx], "label": labels[idx], "mask": mask}
    if weights is not None:
        batch["weight"] = weights[idx]
    return batch


def train_epoch_fn(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    mask: jax.Array,
) -> tuple[TrainState, Metrics]:
    """Trains on ``indices.shape[0]`` batches with one ``lax.scan``; pure, not jitted.

    Args:
      state: the train state.
      images: uint8 (or float) ``[N, H, W, C]``, on the device.
      labels: int32 ``[N]``.
      indices: int32 ``[S, B]`` example indices per step (see :meth:`EpochPlan.indices`).
      mask: bool ``[S, B]``; False rows are padding.

    Returns:
      The new state and per-step metric sums, each ``[S]`` (sum them for the epoch; the
      per-step losses tell which step went non-finite).
    """

    def body(state, xs):
        idx, m = xs
        return train_step_fn(state, gather_batch(images, labels, idx, m))

    return jax.lax.scan(body, state, (indices, mask))


def train_steps_fn(state, images, labels, weights, indices, mask, lo, hi):
    """Steps ``lo`` to ``hi - 1`` of an epoch in one ``lax.fori_loop``; pure, not jitted.

    :func:`train_epoch_fn` on ``indices[lo:hi]``, but with ``lo`` and ``hi`` traced, so an
    epoch cut at any steps (a callback's ``batch_interval``, a preemption) runs one
    compiled loop, and with per-example ``weights`` (float32 ``[N]`` or None) as each
    batch's ``"weight"``. Returns the state and per-step metric sums, each ``[S]`` (zero
    outside ``lo .. hi - 1``).
    """

    def body(i, carry):
        state, sums = carry
        batch = gather_batch(images, labels, indices[i], mask[i], weights)
        state, step_sums = train_step_fn(state, batch)
        return state, jax.tree.map(lambda a, x: a.at[i].set(x), sums, step_sums)

    first = gather_batch(images, labels, indices[0], mask[0], weights)
    shapes = jax.eval_shape(lambda s: train_step_fn(s, first)[1], state)
    sums = jax.tree.map(lambda x: jnp.zeros((indices.shape[0], *x.shape), x.dtype), shapes)
    return jax.lax.fori_loop(lo, hi, body, (state, sums))


def sum_over_batches(
    batch_sums: Callable[[Batch], Metrics],
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    mask: jax.Array,
) -> Metrics:
    """``batch_sums`` of every batch, added up in one ``lax.scan``; pure, not jitted.

    Args:
      batch_sums: a batch dict (``image``, ``label``, ``mask``: see :func:`gather_batch`)
        -> a pytree of arrays in which the padding rows (``mask`` False) count zero.
      images: ``[N, H, W, C]``; labels: int32 ``[N]``.
      indices: int32 ``[S, B]``, the examples of each batch; mask: bool ``[S, B]``.

    Returns:
      The pytree of ``batch_sums`` summed over the ``S`` batches.
    """

    def body(total, xs):
        sums = batch_sums(gather_batch(images, labels, *xs))
        return jax.tree.map(jnp.add, total, sums), None

    first = jax.eval_shape(batch_sums, gather_batch(images, labels, indices[0], mask[0]))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    return jax.lax.scan(body, zeros, (indices, mask))[0]


#: :func:`train_epoch_fn` jitted, donating the incoming state: the library's loops. Inside
#: your own ``jax.jit``, call :func:`train_epoch_fn` instead.
train_epoch = jax.jit(train_epoch_fn, donate_argnums=0)
#: :func:`train_steps_fn` jitted, donating the incoming state (``lo``/``hi`` traced).
train_steps = jax.jit(train_steps_fn, donate_argnums=0)
# The public train_step's function, donating the state the loop no longer needs.
_train_step_donated = jax.jit(train_step_fn, donate_argnums=0)


def _class_weighted_step_fn(state, batch, class_weights):
    """:func:`flaxconv.steps.train_step_fn` with example ``i`` weighted by
    ``class_weights[label_i]`` (float32 ``[C]``): Keras's ``class_weight``; pure."""
    weight = jnp.take(class_weights, jnp.asarray(batch["label"]), mode="clip")
    return train_step_fn(state, {**batch, "weight": weight})


_class_weighted_step = jax.jit(_class_weighted_step_fn, donate_argnums=0)


def scan_chunks(state: TrainState, plan: EpochPlan, progress_bar: bool) -> int | None:
    """How many ``lax.scan`` calls :func:`run_epoch` should cut an epoch into: one (20 to
    move a progress bar), or None for one jitted step per batch, on CPU, when the model
    has a convolution that the kernel seam leaves to XLA: XLA:CPU runs JAX's own
    convolution gradients as a naive loop inside any loop (jax-ml/jax#12868), several
    times slower than the step alone."""
    if jax.default_backend() == "cpu":
        images = jax.ShapeDtypeStruct((plan.batch_size, *state.input_shape), np.uint8)
        if any(choice.fallback and choice.op.startswith("conv")
               for choice in explain_kernels(state, images)):
            return None
    return 20 if progress_bar else 1


def run_epoch(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    plan: EpochPlan,
    indices: jax.Array,
    chunks: int | None,
    *,
    start: int = 0,
    weights: jax.Array | None = None,
    cuts: Sequence[int] = (),
    at_cut: Callable[[TrainState, int, list[Metrics]], TrainState] | None = None,
    advance: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[TrainState, dict[str, np.ndarray], bool]:
    """One epoch on device-resident arrays, in jitted calls, from step ``start`` on.

    Args:
      state, images, labels: as :func:`train_epoch_fn`; indices: ``plan.indices(...)``.
      chunks: scan calls per epoch (see :func:`scan_chunks`); None: one step per call.
      start: steps already done (a resumed epoch).
      weights: float32 ``[N]`` example weights, or None.
      cuts: step counts after which the epoch is cut to call ``at_cut(state, done,
        per_step)`` (per_step: the sums of the calls so far), which returns the state.
        Weighted or cut epochs run :func:`train_steps` (traced bounds: no recompilation).
      advance: called with the steps each call ran (a progress bar).
      stop: a flag (see :mod:`flaxconv.preemption`): at most one call runs ahead of the
        host, and the epoch ends early after the call in flight once ``stop()`` is true.

    Returns:
      The state, the per-step sums (host arrays ``[steps run]``), and whether the epoch
      is complete.
    """
    if chunks is None:
        bounds = np.arange(plan.steps + 1)
    else:
        bounds = np.linspace(0, plan.steps, chunks + 1).round().astype(int)
    # the calls of an uninterrupted run, and the cuts
    bounds = np.unique([start, *bounds[bounds > start], *cuts])
    per_step, done = [], start
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if chunks is None:
            batch = gather_batch(images, labels, indices[lo], plan.mask[lo], weights)
            state, sums = _train_step_donated(state, batch)
            sums = jax.tree.map(lambda x: x[None], sums)
        elif weights is None and not cuts:  # the plain epoch: one scan
            state, sums = train_epoch(state, images, labels, indices[lo:hi], plan.mask[lo:hi])
        else:
            state, sums = train_steps(state, images, labels, weights, indices, plan.mask,
                                      int(lo), int(hi))
            sums = jax.tree.map(lambda x, lo=lo, hi=hi: x[lo:hi], sums)
        if stop is not None and per_step:
            jax.block_until_ready(per_step[-1])  # the flag is seen within a call or two
        per_step.append(sums)
        if advance is not None:
            advance(int(hi - lo))
        done = int(hi)
        if done in cuts and at_cut is not None:
            state = at_cut(state, done, per_step)
        if stop is not None and done < plan.steps and stop():
            break
    sums = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *per_step)
    return state, sums, done == plan.steps



def run_stream_epoch(
    state: TrainState,
    batches: Iterable[Batch],
    *,
    check: Callable[[np.ndarray], None] | None = None,
    class_weights: jax.Array | None = None,
    after_step: Callable[[TrainState, int, list[Metrics]], TrainState] | None = None,
    start: int = 0,
    advance: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[TrainState, dict[str, np.ndarray], bool]:
    """One epoch of streamed batches, one donated jitted step each.

    Args:
      batches: batch dicts (see :mod:`flaxconv.steps`), host or device arrays.
      check: called with a host batch's real (unmasked) labels before its step.
      class_weights: float32 ``[C]``: example ``i`` weighs ``class_weights[label_i]``
        (Keras's ``class_weight``); not with batches that carry a ``"weight"``.
      after_step: ``(state, steps done in the epoch, per-step sums so far) -> state``,
        after every step (``start``: the steps done before these).
      advance, stop: as :func:`run_epoch`; with ``stop``, the epoch ends at most one
        step after ``stop()`` became true, unless no batch is left (one is read ahead).

    Returns:
      The state, the per-step sums (host arrays ``[steps run]``) and whether the epoch is
      complete.

    Raises:
      ValueError: no batch at all, or ``class_weights`` with weighted batches.
    """
    per_step = []
    batches = iter(batches)
    batch = next(batches, None)
    while batch is not None:
        labels = batch.get("label") if isinstance(batch, dict) else None
        if check is not None and isinstance(labels, np.ndarray):  # host: checked for free
            mask = batch.get("mask")
            check(labels if mask is None else labels[np.asarray(mask, bool)])
        if class_weights is None:
            state, sums = _train_step_donated(state, batch)
        elif isinstance(batch, dict) and "weight" in batch:
            raise ValueError(
                "class_weight with batches that carry a 'weight': Keras refuses class_weight "
                "and sample_weight together; fold the class weights into the batches' weights"
            )
        else:
            state, sums = _class_weighted_step(state, batch, class_weights)
        if stop is not None and per_step:
            jax.block_until_ready(per_step[-1])  # the flag is seen within a step or two
        per_step.append(sums)
        if advance is not None:
            advance(1)
        if after_step is not None:
            state = after_step(state, start + len(per_step), per_step)
        batch = next(batches, None)
        if batch is not None and stop is not None and stop():
            break
    if not per_step:
        raise ValueError("train_data produced no batch in this epoch")
    sums = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_step)
    return state, sums, batch is None
