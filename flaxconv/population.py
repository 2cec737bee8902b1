"""Populations: K models trained at once by ``jax.vmap`` — seeds, sweeps, ensembles.

A *population* is an ordinary :class:`~flaxconv.state.TrainState` whose every leaf has a
leading member axis ``K``: ``params["conv_0"]["kernel"]`` is ``[K, 3, 3, 1, 32]``, ``step``
is ``int32[K]``, the injected learning rate is ``float32[K]``. The static fields (``model``,
``tx``, ``input_shape``) are shared, so all members have one architecture and one optimizer
family; they differ in their initialization key, their learning rate and (optionally)
their data order. Nothing else is special: ``jax.vmap(fc.train_step, in_axes=(0, None))``
trains a population on one batch, and the functions here are that idea applied to whole
device-resident epochs (:mod:`flaxconv.epochs`). On CPU, where a vmapped member trains
slower than a lone model, :func:`train_population_epoch` lets the members take turns inside
the one compiled epoch instead (``vmap_size``, :func:`resolve_vmap_size`).

>>> states = create_population(keys_from_seeds(range(8)), model, tx, images[:1],
...                            learning_rates=np.geomspace(1e-4, 1e-2, 8))
>>> plan = fc.epochs.epoch_plan(len(labels), batch_size=64)
>>> order = population_indices(plan, order_seeds(states), epoch=0)  # [8, S, B]: fit's orders
>>> states, sums = train_population_epoch(states, images, labels, order, plan.mask)
>>> print(population_table(fc.evaluate(states, test_images, test_labels)))  # per member
>>> probs = ensemble_predict(states, test_images[:100])         # mean of member softmaxes

With ``population_indices(plan, order_seeds(states), epoch)`` (or, the same, the keys
``jax.vmap(flaxconv.epochs.data_order_key, in_axes=(0, None))(states, epoch)``), each member
sees the data order ``fc.fit`` would give it (:func:`flaxconv.epochs.epoch_order` of its own
seed), so member ``i`` ends where
``fc.fit`` of its seed and learning rate does (``experiments/mnist_sweep.py`` does this).

The member axis can be placed across devices (:func:`shard_population`): with D devices
each holds and trains K/D members, running the same code.

Also here, because it is the same trick with the batch axis instead of the member axis:
:func:`per_example_grads`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxconv import _deprecation, evaluation, optim, parallel
from flaxconv import metrics as metrics_lib
from flaxconv.epochs import EpochPlan, epoch_order, order_seed, train_epoch_fn
from flaxconv.evaluation import ensemble_log_probs, ensemble_log_probs_fn
from flaxconv.state import TrainState, create_train_state
from flaxconv.steps import Batch, Metrics, check_batch, loss_fn, predict_fn

#: Name of the mesh axis that :func:`shard_population` splits the members over.
MEMBERS = "members"


# --------------------------------------------------------------------------- keys, creation


def keys_from_seeds(seeds: Sequence[int]) -> jax.Array:
    """Typed keys ``[K]``, member ``i`` being ``jax.random.key(seeds[i])``.

    So member ``i`` of ``create_population(keys_from_seeds(seeds), ...)`` starts exactly
    where ``create_train_state(jax.random.key(seeds[i]), ...)`` does.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty; expected at least one seed")
    return jnp.stack([jax.random.key(s) for s in seeds])


def _as_member_keys(keys_or_key: jax.Array, num_models: int | None) -> jax.Array:
    """Typed keys ``[K]`` from one key (split into ``num_models``) or a batch of keys."""
    keys = keys_or_key
    if not jnp.issubdtype(jnp.asarray(keys).dtype, jax.dtypes.prng_key):
        raw = np.asarray(keys)
        if raw.dtype != np.uint32 or raw.ndim not in (1, 2):
            raise ValueError(
                f"keys_or_key is {raw.dtype}{list(raw.shape)}; expected a jax.random.key, "
                "a [K] array of them, or legacy uint32 PRNGKey data ([2] or [K, 2])"
            )
        keys = jax.random.wrap_key_data(jnp.asarray(raw))
    if keys.ndim == 0:
        if num_models is None:
            raise ValueError("one key was given, so num_models is needed to split it")
        if not isinstance(num_models, int | np.integer) or num_models < 1:
            raise ValueError(f"num_models={num_models!r}; expected a positive integer")
        return jax.random.split(keys, int(num_models))
    if keys.ndim != 1 or keys.shape[0] == 0:
        raise ValueError(f"keys have shape {keys.shape}; expected one key or a [K] batch of keys")
    if num_models is not None and num_models != keys.shape[0]:
        raise ValueError(f"num_models={num_models} but {keys.shape[0]} keys were given")
    return keys


def num_members(states: TrainState) -> int:
    """K, the size of the member axis of a population; a clear error for a single state."""
    step = np.shape(states.step)
    if len(step) != 1:
        raise ValueError(
            f"state.step has shape {step}; expected [K]: a population from create_population "
            "(a single TrainState has no member axis)"
        )
    return int(step[0])


def set_learning_rates(states: TrainState, learning_rates: Any) -> TrainState:
    """A copy of ``states`` with member ``i``'s learning rate set to ``learning_rates[i]``.

    Args:
      states: a population whose optimizer comes from :func:`flaxconv.optim.make` (the
        learning rate is injected into ``opt_state.hyperparams["learning_rate"]``).
      learning_rates: ``K`` finite, non-negative numbers (0 freezes a member: a control).

    Raises:
      ValueError: the wrong number of rates, a negative or non-finite rate, an optimizer
      without an injected learning rate, or one whose learning rate is a schedule (the
      schedule would overwrite the value at every step).
    """
    k = num_members(states)
    lrs = np.asarray(learning_rates, np.float64).reshape(-1)
    if lrs.shape != (k,):
        raise ValueError(f"got {lrs.size} learning rates for {k} members; expected {k}")
    if not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
        raise ValueError(f"learning_rates={lrs.tolist()}; expected finite numbers >= 0")
    current = optim.learning_rate(states.opt_state)  # a clear ValueError if not injected
    schedules = optax.tree_utils.tree_get(states.opt_state, "hyperparams_states") or {}
    if "learning_rate" in schedules:
        raise ValueError(
            "the optimizer's learning rate is a schedule, which recomputes it every step; "
            "per-member learning rates need a constant learning_rate in optim.make"
        )
    value = np.asarray(lrs, current.dtype)
    if isinstance(current, jax.Array):  # not for the abstract states create_population checks
        value = jax.device_put(value, current.sharding)
    return states.replace(opt_state=optim.set_learning_rate(states.opt_state, value))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_population(keys, model, tx, input_shape):
    # Only the input shape is static: no data is baked into the compiled init, and a
    # second population of the same model, optimizer and size reuses the compilation.
    spec = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.vmap(lambda key: create_train_state(key, model, tx, spec))(keys)


# Members vmapped together per backend, from benchmarks/population_speed.py: on CPU a
# vmapped member runs slower than an unbatched one (batched matmuls, no Eigen
# convolutions), so members there take turns inside the one compiled epoch; elsewhere all
# of them are vmapped.
_AUTO_VMAP_SIZE = {"cpu": 1}


def resolve_vmap_size(vmap_size: int | None, num_models: int, backend: str | None = None) -> int:
    """How many members train side by side under ``vmap``; the rest take turns.

    ``None`` picks per backend (``jax.default_backend()`` at trace time): 1 on CPU, all
    ``num_models`` elsewhere. A larger number is clipped to ``num_models``; below 1 is an error.
    """
    if vmap_size is None:
        return min(_AUTO_VMAP_SIZE.get(backend or jax.default_backend(), num_models), num_models)
    if not isinstance(vmap_size, int | np.integer) or vmap_size < 1:
        raise ValueError(f"vmap_size={vmap_size!r}; expected a positive integer or None")
    return min(int(vmap_size), num_models)


def _vmapped_kernels(kernels: str) -> str:
    # Under vmap with per-member kernels a convolution becomes a grouped convolution, slow
    # on XLA:CPU; as im2col it is a batched matmul (flaxconv.kernels.policy).
    return "im2col" if kernels in ("auto", "cpu") else kernels


def create_population(
    keys_or_key: jax.Array,
    model: nn.Module | Any,
    tx: optax.GradientTransformation,
    sample_input: Any,
    num_models: int | None = None,
    learning_rates: Any = None,
) -> TrainState:
    """K independently initialized train states, stacked on a leading member axis.

    Member ``i`` is exactly ``create_train_state(keys[i], model, tx, sample_input)`` (the
    initialization is that function under ``jax.vmap``, and threefry draws the same bits
    batched or not), with its learning rate then set to ``learning_rates[i]``.

    Args:
      keys_or_key: typed keys ``[K]`` (e.g. :func:`keys_from_seeds`), or one key that is
        split into ``num_models``; legacy uint32 ``[K, 2]`` / ``[2]`` keys work too.
      model: the linen module, shared by all members; or an NNX model as for
        :func:`flaxconv.create_train_state`: a function ``rngs -> nnx.Module`` (each
        member built from its own key) or a module (every member starts from its
        variables).
      tx: the Optax optimizer, shared (per-member learning rates need
        :func:`flaxconv.optim.make`, see :func:`set_learning_rates`).
      sample_input: anything with shape ``[N, H, W, C]``; only the shape is used.
      num_models: K, needed when ``keys_or_key`` is a single key.
      learning_rates: ``K`` non-negative numbers, or None to keep ``tx``'s.

    Returns:
      A :class:`TrainState` whose leaves have a leading axis ``K``.
    """
    keys = _as_member_keys(keys_or_key, num_models)
    shape = tuple(np.shape(sample_input))
    if len(shape) != 4:
        raise ValueError(f"sample_input has shape {shape}; expected [N, H, W, C]")
    if learning_rates is not None:
        # Checked on the traced shapes first, so a bad rate fails before compiling.
        abstract = _init_population.eval_shape(keys, model, tx, shape[1:])
        set_learning_rates(abstract, learning_rates)
    states = _init_population(keys, model, tx, shape[1:])
    if learning_rates is not None:
        states = set_learning_rates(states, learning_rates)
    return states


def select_member(states: TrainState, i: int) -> TrainState:
    """Member ``i`` as an ordinary :class:`TrainState` (for ``fc.predict``, checkpoints...)."""
    k = num_members(states)
    if not isinstance(i, int | np.integer) or not -k <= i < k:
        raise IndexError(f"member index {i!r} is out of range for a population of {k}")
    return jax.tree.map(lambda x: x[i], states)


def stack_members(members: Sequence[TrainState]) -> TrainState:
    """The population made of ordinary states (inverse of :func:`select_member`).

    All members must share ``model``, ``tx`` and ``input_shape`` (the tree structure).
    """
    members = list(members)
    if not members:
        raise ValueError("stack_members got no states")
    structure = jax.tree.structure(members[0])
    for i, member in enumerate(members[1:], 1):
        if jax.tree.structure(member) != structure:
            raise ValueError(
                f"member {i} has a different model, optimizer, input shape or parameter "
                "tree than member 0; a population shares all of them"
            )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *members)


# --------------------------------------------------------------------------- training


def order_seeds(states: TrainState) -> list[int]:
    """Each member's data-order seed, :func:`flaxconv.epochs.order_seed` of its rng: the
    seed ``fc.fit`` would shuffle that member's data with."""
    return [int(seed) for seed in np.asarray(jax.vmap(order_seed)(states))]


def population_indices(plan: EpochPlan, order: Any, epoch: int = 0) -> jax.Array:
    """The example order of one population epoch, from :func:`flaxconv.epochs.epoch_order`.

    Args:
      plan: from :func:`flaxconv.epochs.epoch_plan`.
      order: None → the natural order, int32 ``[S, B]``; one int seed or one PRNG key →
        every member sees the same batches, ``[S, B]``; a sequence of K int seeds (e.g.
        :func:`order_seeds`) or a ``[K]`` batch of keys → member ``i`` gets its own
        permutation, int32 ``[K, S, B]``. A seed ``s`` gives ``epoch_order(s, epoch, N)``,
        a key :func:`flaxconv.epochs.key_order` of it (``epoch`` unused: a key carries it).
      epoch: the epoch, a non-negative int, for seeds.

    Computed on the host (numpy), not traced.
    """
    if order is None:
        return plan.indices(None)
    n = plan.num_examples
    if isinstance(order, int | np.integer):
        return plan.indices(epoch_order(order, epoch, n))
    legacy = isinstance(order, jax.Array) and order.dtype == jnp.uint32 and (
        order.shape[-1:] == (2,))  # raw key data, jax.random.PRNGKey's [2] or [K, 2]
    if legacy or isinstance(order, jax.Array) and jnp.issubdtype(order.dtype,
                                                                  jax.dtypes.prng_key):
        keys = jax.random.wrap_key_data(order) if legacy else order
        if keys.ndim > 1:
            raise ValueError(f"order has keys of shape {keys.shape}; expected one key or [K]")
        return plan.indices(keys) if keys.ndim == 0 else jnp.stack(
            [plan.indices(key) for key in keys])
    return jnp.stack([plan.indices(epoch_order(seed, epoch, n)) for seed in order])


def train_population_epoch_fn(
    states: TrainState,
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    mask: jax.Array,
    vmap_size: int | None = None,
) -> tuple[TrainState, Metrics]:
    """:func:`flaxconv.epochs.train_epoch_fn` for every member at once; pure, not jitted.

    Args:
      states: a population, leaves ``[K, ...]``.
      images: uint8 (or float) ``[N, H, W, C]``, shared by all members.
      labels: int32 ``[N]``, shared.
      indices: int32 ``[S, B]`` (all members see the same batches) or ``[K, S, B]`` (a
        data order per member), see :func:`population_indices`.
      mask: bool ``[S, B]``; False slots are padding (the same for every order).
      vmap_size: members trained side by side by ``jax.vmap``; groups of them take turns
        (``jax.lax.map``) inside the same compiled epoch. None: per backend, see
        :func:`resolve_vmap_size` (static under ``jit``). Every choice gives each member
        the same result, up to float rounding.

    Returns:
      The trained population and metric sums per member and step, each ``[K, S]``.
    """
    k = num_members(states)
    size = resolve_vmap_size(vmap_size, k)
    per_member = np.ndim(indices) == 3

    def member_epoch(state, member_indices):
        return train_epoch_fn(state, images, labels, member_indices, mask)

    if size == k and k > 1:  # one member alone runs the unbatched step, like a lone model
        vmapped = states.replace(kernels=_vmapped_kernels(states.kernels))
        run = jax.vmap(member_epoch, in_axes=(0, 0 if per_member else None))
        new, sums = run(vmapped, indices)
        return new.replace(kernels=states.kernels), sums
    if per_member:
        return jax.lax.map(lambda xs: member_epoch(*xs), (states, indices),
                           batch_size=size if size > 1 else None)
    return jax.lax.map(lambda state: member_epoch(state, indices), states,
                       batch_size=size if size > 1 else None)


# Donates the population: the library's loop owns it, and K copies of the model and
# optimizer state would otherwise be live twice at the end of each epoch.
_train_population_epoch = jax.jit(
    train_population_epoch_fn, donate_argnums=0, static_argnames="vmap_size"
)


def train_population_epoch(
    states: TrainState,
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    mask: jax.Array,
    vmap_size: int | None = None,
) -> tuple[TrainState, Metrics]:
    """Jitted :func:`train_population_epoch_fn`; donates ``states`` (do not reuse them).

    Checks the shapes first, so a wrong ``indices`` gets an error naming it rather than a
    vmap traceback. Sum the returned ``[K, S]`` metrics over the last axis for the epoch.
    ``vmap_size=None`` vmaps all members of a population spread over several devices
    (:func:`shard_population`: each device trains its own members) and otherwise picks per
    backend (:func:`resolve_vmap_size`).
    """
    k = num_members(states)
    step = states.step
    if vmap_size is None and isinstance(step, jax.Array) and len(step.sharding.device_set) > 1:
        vmap_size = k
    shape = tuple(np.shape(indices))
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != k):
        raise ValueError(
            f"indices has shape {shape}; expected [S, B] (shared order) or [{k}, S, B] "
            f"(one order per member) for a population of {k}"
        )
    if tuple(np.shape(mask)) != shape[-2:]:
        raise ValueError(f"mask has shape {tuple(np.shape(mask))}; expected {shape[-2:]}")
    return _train_population_epoch(states, images, labels, indices, mask, vmap_size=vmap_size)


# --------------------------------------------------------------------------- evaluation
# ``fc.evaluate(states, ...)`` evaluates each member, ``ensemble=True`` the ensemble
# (flaxconv.evaluation); ``ensemble_log_probs_fn`` is that module's.


def ensemble_predict_fn(states: TrainState, images: jax.Array) -> jax.Array:
    """The ensemble's class probabilities: the mean of the members' softmax; pure.

    Args:
      states: a population of K members.
      images: uint8/float ``[B, H, W, C]``, the same images for every member.

    Returns:
      float32 ``[B, C]``, ``mean_k softmax(logits_k)``; rows sum to 1. Inference mode.
    """
    num_members(states)
    logits = jax.vmap(predict_fn, in_axes=(0, None))(states, images)
    return jnp.mean(jax.nn.softmax(logits, -1), axis=0)


#: ``ensemble_predict(states, images) -> probs [B, C]``: jitted :func:`ensemble_predict_fn`.
ensemble_predict = jax.jit(ensemble_predict_fn)


# --------------------------------------------------------------------------- reporting


def _per_member(metrics: dict[str, Any]) -> dict[str, np.ndarray]:
    """``{"loss": [K], "accuracy": [K]}`` from summed or already finished metrics."""
    if "loss_sum" in metrics:
        metrics = metrics_lib.compute(metrics)
    if "accuracy" not in metrics or "loss" not in metrics:
        raise ValueError(
            f"metrics has keys {sorted(metrics)}; expected metric sums (loss_sum, correct, "
            "count) with a member axis, or finished loss and accuracy per member "
            "(fc.evaluate of a population)"
        )
    out = {k: np.atleast_1d(np.asarray(metrics[k], np.float64)) for k in ("loss", "accuracy")}
    if out["loss"].ndim != 1 or out["loss"].shape != out["accuracy"].shape:
        raise ValueError(
            f"loss has shape {out['loss'].shape} and accuracy {out['accuracy'].shape}; "
            "expected one value per member, [K] each"
        )
    return out


def best_member(metrics: dict[str, Any], by: str = "accuracy") -> int:
    """Index of the best member: highest ``accuracy`` or lowest ``loss``; ties → lowest index.

    ``metrics`` are per-member numbers (``fc.evaluate(states, ...)``) or metric sums with
    a member axis (``fc.train_step``'s, summed over steps).
    """
    if by not in ("accuracy", "loss"):
        raise ValueError(f"by={by!r}; expected 'accuracy' or 'loss'")
    values = _per_member(metrics)[by]
    # A diverged member (NaN loss) must never be "best"; argmin would pick it.
    values = np.where(np.isnan(values), -np.inf if by == "accuracy" else np.inf, values)
    return int(np.argmax(values) if by == "accuracy" else np.argmin(values))


def _std(x: np.ndarray) -> float:
    # The sample std (ddof=1): the members are a sample of what a seed/setting gives.
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def population_table(
    member_metrics: dict[str, Any],
    learning_rates: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
) -> str:
    """A printable per-member table and a ``mean ± std`` line over the members.

    Args:
      member_metrics: per-member numbers (``fc.evaluate(states, ...)``: ``loss`` and
        ``accuracy``, ``[K]`` each) or metric sums with a member axis.
      learning_rates, seeds: K values each, shown per member (``-`` when None).

    Returns:
      A string such as::

        member  seed  learning_rate    loss  accuracy
             0     0       1.00e-03  0.0412   98.71%
             1     1       1.00e-03  0.0398   98.80% *
        mean ± std over 2 members: loss 0.0405 ± 0.0010, accuracy 98.76% ± 0.06%

      ``*`` marks :func:`best_member`; the std is the sample std (0 for one member).
    """
    m = _per_member(member_metrics)
    k = len(m["loss"])
    columns = {"learning_rates": learning_rates, "seeds": seeds}
    for name, values in columns.items():
        if values is not None and len(values) != k:
            raise ValueError(f"{name} has {len(values)} entries for {k} members; expected {k}")
    best = best_member(m)
    lines = [f"{'member':>6}  {'seed':>4}  {'learning_rate':>13}  {'loss':>7}  {'accuracy':>8}"]
    for i in range(k):
        seed = "-" if seeds is None else str(seeds[i])
        lr = "-" if learning_rates is None else f"{float(learning_rates[i]):.2e}"
        mark = " *" if i == best and k > 1 else ""
        lines.append(
            f"{i:>6}  {seed:>4}  {lr:>13}  {m['loss'][i]:>7.4f}  "
            f"{100 * m['accuracy'][i]:>7.2f}%{mark}"
        )
    acc = 100 * m["accuracy"]
    lines.append(
        f"mean ± std over {k} member{'s' if k != 1 else ''}: "
        f"loss {np.mean(m['loss']):.4f} ± {_std(m['loss']):.4f}, "
        f"accuracy {np.mean(acc):.2f}% ± {_std(acc):.2f}%"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- per-example grads


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


# --------------------------------------------------------------------------- sharding


def population_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D :class:`~jax.sharding.Mesh` over ``devices`` (all by default), axis ``"members"``."""
    return parallel.data_mesh(devices, axis=MEMBERS)


def shard_population(states: TrainState, mesh: Mesh | None = None) -> TrainState:
    """Places the member axis of ``states`` across the ``"members"`` axis of ``mesh``.

    Every leaf gets ``NamedSharding(mesh, PartitionSpec("members"))``: with D devices on
    that axis, each holds K/D whole members and trains them with the same jitted code
    (``train_population_epoch`` etc.); members never communicate, so no collectives run.
    Shared data is best placed once with :func:`replicate_data`.

    Args:
      states: a population of K members.
      mesh: a mesh with a ``"members"`` axis; default :func:`population_mesh` (all devices).

    Raises:
      ValueError: K is not a multiple of the number of devices on the axis, or the mesh
      has no ``"members"`` axis.
    """
    mesh = population_mesh() if mesh is None else mesh
    if MEMBERS not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; expected a {MEMBERS!r} axis")
    k, d = num_members(states), mesh.shape[MEMBERS]
    if k % d:
        raise ValueError(
            f"cannot split {k} members evenly over {d} devices on mesh axis {MEMBERS!r}: "
            f"K must be a multiple of {d} (e.g. {d * max(1, round(k / d))} members)"
        )
    return jax.device_put(states, NamedSharding(mesh, PartitionSpec(MEMBERS)))


def replicate_data(tree: Any, mesh: Mesh | None = None) -> Any:
    """``tree`` copied whole onto every device of ``mesh`` (default :func:`population_mesh`):
    the data all members share. ``fc.parallel.replicate`` with the population's mesh."""
    return parallel.replicate(tree, population_mesh() if mesh is None else mesh)


def _evaluate_population(states, images, labels, batch_size: int = 500) -> Metrics:
    """The old raw-sum evaluation of each member: eval_step's sums with a member axis."""
    num_members(states)
    return evaluation._legacy_evaluate(states, images, labels, batch_size)


def _ensemble_evaluate(states, images, labels, batch_size: int = 500) -> Metrics:
    """The old raw-sum evaluation of the ensemble: ``loss_sum``, ``correct``, ``count``."""
    num_members(states)
    return evaluation._legacy_evaluate(states, images, labels, batch_size, ensemble=True)


_DEPRECATED: _deprecation.Aliases = {
    "evaluate_population": ("fc.evaluate(states, images, labels) (finished numbers per "
                            "member)", lambda: _evaluate_population),
    "ensemble_evaluate": ("fc.evaluate(states, images, labels, ensemble=True)",
                          lambda: _ensemble_evaluate),
    "ensemble_evaluate_fn": ("flaxconv.evaluation.evaluate_sums_fn(..., ensemble=True)",
                             lambda: evaluation._legacy_ensemble_sums_fn),
    "replicate": ("flaxconv.population.replicate_data (flaxconv.parallel.replicate "
                  "defaults to the data mesh)", lambda: replicate_data),
}


__getattr__ = _deprecation.module_getattr(__name__, _DEPRECATED)


__all__ = [
    "MEMBERS",
    "create_population",
    "best_member",
    "ensemble_log_probs",
    "ensemble_log_probs_fn",
    "ensemble_predict",
    "ensemble_predict_fn",
    "keys_from_seeds",
    "num_members",
    "per_example_grads",
    "per_example_grads_fn",
    "order_seeds",
    "population_indices",
    "population_mesh",
    "population_table",
    "replicate_data",
    "select_member",
    "set_learning_rates",
    "shard_population",
    "stack_members",
    "train_population_epoch",
    "train_population_epoch_fn",
]
