"""Data parallelism with ``jax.sharding``: one mesh axis, replicated state, split batches.

There is no ``pmap`` and no per-device code. Everything is the single-device program run
under ``jax.jit`` with explicit shardings, and XLA's SPMD partitioner does the rest:

* a 1-D :class:`~jax.sharding.Mesh` over all devices (of every process in a multi-host
  run) with the axis ``"data"`` (:func:`data_mesh`);
* the train state, and the dataset of the device-resident fast path, *replicated*:
  ``NamedSharding(mesh, P())`` (:func:`replicated`, :func:`replicate`);
* every batch *split on its leading axis*: ``NamedSharding(mesh, P("data"))``
  (:func:`data_sharding`, :func:`shard_batch`). The batch size is global: with D devices
  each computes the forward and backward pass of ``B / D`` examples, the partitioner
  all-reduces the gradients, and every device applies the same update to its replica.

Batches must split evenly: ``B % D == 0`` (a clear ``ValueError`` otherwise).

Data-parallel training of your own step, with nothing from ``fit``::

    import jax, flaxconv as fc

    mesh = fc.parallel.data_mesh()                        # all devices, axis "data"
    rep, split = fc.parallel.replicated(mesh), fc.parallel.data_sharding(mesh)
    step = jax.jit(fc.train_step_fn, in_shardings=(rep, split),
                               out_shardings=(rep, rep), donate_argnums=0)
    state = fc.parallel.replicate(state, mesh)
    for batch in fc.data.batches(images, labels, batch_size=512, shuffle=True):
        state, metrics = step(state, fc.parallel.shard_batch(batch, mesh))

``fc.fit`` does this by itself for array data (:func:`flaxconv.epochs.place_for_fit`): it
replicates the state and the data over the devices of the state's mesh (all devices unless
the caller placed the state with :func:`replicate`), and splits the index array of every
step of its ``lax.scan`` epoch on ``"data"`` (``flaxconv.epochs.epoch_plan(..., mesh=)``),
in the data order of :func:`flaxconv.epochs.epoch_order`. The gather ``images[idx]`` of a
replicated dataset by split indices is itself split, so each device gathers and trains on
its own rows and no image crosses devices. To train on fewer devices (one, say)::

    state = fc.parallel.replicate(state, fc.parallel.data_mesh(jax.devices()[:1]))
    state, history = fc.fit(state, (images, labels), batch_size=64)

``fit``'s streaming path (a callable ``epoch -> batches``) runs data-parallel when the
state is replicated and the batches are split::

    state = fc.parallel.replicate(state, mesh)
    stream = lambda epoch: (fc.parallel.shard_batch(b, mesh)
                            for b in fc.data.batches(images, labels, 512, shuffle=True,
                                                     epoch=epoch))
    state, history = fc.fit(state, stream, epochs=5)

Multi-host (several processes, each driving its local devices: a TPU pod slice, GPU
nodes): call :func:`initialize` first in every process (a thin wrapper of
``jax.distributed.initialize``), then run the same program in every process; the mesh
spans all processes' devices. Array data given to ``fit`` must be the same full arrays in
every process (every device holds a replica). For data read per process, each process
contributes only its rows of every global batch: :func:`process_batches` (from arrays or
memory-maps indexed by row), or :func:`process_slice`/:func:`process_share` and
:func:`global_batch` (``jax.make_array_from_process_local_data``) for batches you make
yourself. Orbax checkpoints (:mod:`flaxconv.checkpoint`) of a replicated or sharded state
are written by all processes together and restore onto any number of devices; their
directory must be on a file system that every process sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: Name of the mesh axis that batches are split over.
DATA = "data"

# The settings of a multi-process run, read when initialize() gets no arguments. The first
# and last are JAX's own (jax.distributed reads them too); the other two mirror them.
_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"
_ENV_AUTO = "FLAXCONV_DISTRIBUTED"  # "auto": JAX's cluster detection (TPU pods, SLURM, MPI)


# --------------------------------------------------------------------------- meshes


def data_mesh(devices: Sequence[jax.Device] | None = None, axis: str = DATA) -> Mesh:
    """A 1-D mesh over ``devices`` with the single axis ``axis``.

    Args:
      devices: the devices to split batches over; default ``jax.devices()``, all devices
        of all processes, in process order (so each process's devices hold a contiguous
        block of every batch).
      axis: the axis name.

    Raises:
      ValueError: no devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh got an empty list of devices; expected at least one")
    return Mesh(np.asarray(devices), (axis,))


def data_sharding(mesh: Mesh, axis: str = DATA) -> NamedSharding:
    """Leading (batch) axis split over mesh axis ``axis``, other axes whole: ``P(axis)``."""
    _check_axis(mesh, axis)
    return NamedSharding(mesh, PartitionSpec(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of ``mesh``: ``P()``."""
    return NamedSharding(mesh, PartitionSpec())


def axis_size(mesh: Mesh, axis: str = DATA) -> int:
    """Number of devices along ``axis``: what a global batch is split into."""
    _check_axis(mesh, axis)
    return int(mesh.shape[axis])


def check_batch_size(batch_size: int, mesh: Mesh, axis: str = DATA) -> None:
    """Raises a ValueError unless the global ``batch_size`` splits evenly over ``axis``."""
    d = axis_size(mesh, axis)
    if batch_size % d:
        below, above = (batch_size // d) * d, (batch_size // d + 1) * d
        suggestion = f"{below} or {above}" if below else f"{above}"
        raise ValueError(
            f"batch_size={batch_size} does not split evenly over the {d} devices of mesh axis "
            f"{axis!r}; the batch size is global, so use a multiple of {d} (e.g. {suggestion})"
        )


def mesh_of(tree: Any, axis: str = DATA) -> Mesh | None:
    """The mesh ``tree``'s arrays were placed on, if it has the axis ``axis``; else None."""
    leaves = jax.tree.leaves(tree)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    if isinstance(sharding, NamedSharding) and axis in sharding.mesh.axis_names:
        return sharding.mesh
    return None


def _check_axis(mesh: Mesh, axis: str) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"expected a jax.sharding.Mesh; got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; expected an axis named {axis!r}")


# --------------------------------------------------------------------------- placing data


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` as a global array with ``sharding``, in one process or many.

    In a multi-process run a sharding spans devices this process cannot address; host
    data (the same in every process) is then cut per local device by a callback.
    """
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
    """Every array of ``tree`` copied whole onto every device of ``mesh`` (default
    :func:`data_mesh`). In a multi-process run every process must pass the same values
    (e.g. a state made from the same seed)."""
    sharding = replicated(data_mesh() if mesh is None else mesh)
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def shard_batch(batch: Any, mesh: Mesh | None = None, axis: str = DATA) -> Any:
    """A *global* batch (every leaf ``[B, ...]``) split on its leading axis over ``axis``.

    Device ``i`` of the axis gets rows ``[i * B / D, (i + 1) * B / D)``. In a multi-process
    run every process passes the whole (identical) batch and keeps its rows; to pass only
    this process's rows, use :func:`global_batch`.

    Raises:
      ValueError: a leaf's leading size is not a multiple of the axis size.
    """
    mesh = data_mesh() if mesh is None else mesh
    sharding = data_sharding(mesh, axis)
    _check_leading(batch, axis_size(mesh, axis), f"devices of mesh axis {axis!r}")
    return jax.tree.map(lambda x: _put(x, sharding), batch)


def _check_leading(tree: Any, d: int, what: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = np.shape(leaf)
        if not shape or shape[0] % d:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} has shape {shape}; expected a leading "
                f"(batch) size that splits evenly over the {d} {what}"
            )


# --------------------------------------------------------------------------- multi-host


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Joins a multi-process run if one is configured: a thin ``jax.distributed.initialize``.

    Call it first thing in every process, before any other JAX call. The settings come
    from the arguments, else from the environment variables ``JAX_COORDINATOR_ADDRESS``
    (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; with
    ``FLAXCONV_DISTRIBUTED=auto`` instead, JAX detects them itself (Cloud TPU pod slices,
    SLURM, Open MPI). With none of these, it does nothing: a single-process run.
    Calling it again is harmless.

    Returns:
      Whether this process is part of a multi-process run.

    Raises:
      ValueError: an incomplete or malformed configuration, naming what is wrong.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(_ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(_ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(_ENV_PROCESS_ID)
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if all(v is None for v in given.values()):
        auto = os.environ.get(_ENV_AUTO, "")
        if auto not in ("", "auto"):
            raise ValueError(f"{_ENV_AUTO}={auto!r}; expected 'auto' or unset")
        if not auto:
            return False
        jax.distributed.initialize(local_device_ids=local_device_ids)
        return True
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"a multi-process run needs coordinator_address, num_processes and process_id "
            f"(or {_ENV_COORDINATOR}, {_ENV_NUM_PROCESSES}, {_ENV_PROCESS_ID}); "
            f"got {given}, missing {missing}"
        )
    if not (isinstance(num_processes, int) and num_processes >= 1):
        raise ValueError(f"num_processes={num_processes!r}; expected a positive integer")
    if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
        raise ValueError(
            f"process_id={process_id!r}; expected an integer in [0, {num_processes}) for "
            f"num_processes={num_processes}"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}; expected an integer") from None


def process_slice(
    num_examples: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
    """This process's contiguous share of ``num_examples`` rows.

    Process ``i`` of ``P`` gets rows ``[i * N // P, (i + 1) * N // P)``: shares differ by
    at most one row and together cover every row once. (Defaults: ``jax.process_index()``
    and ``jax.process_count()``.)
    """
    i = jax.process_index() if process_index is None else process_index
    p = jax.process_count() if process_count is None else process_count
    if not 0 <= i < p:
        raise ValueError(f"process_index={i}; expected an integer in [0, {p})")
    return slice(i * num_examples // p, (i + 1) * num_examples // p)


def process_share(tree: Any) -> Any:
    """Every leaf of ``tree`` (all ``[N, ...]``) cut to this process's :func:`process_slice`."""
    sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"process_share needs leaves of one leading size; got sizes {sizes}")
    rows = process_slice(sizes.pop())
    return jax.tree.map(lambda x: x[rows], tree)


def global_batch(local_batch: Any, mesh: Mesh | None = None, axis: str = DATA) -> Any:
    """A global batch split over ``axis`` from this process's rows of it.

    Every process passes its own ``[B / P, ...]`` rows (process ``i`` the ``i``-th block);
    the result is the ``[B, ...]`` global array, assembled without copying data between
    processes (``jax.make_array_from_process_local_data``). In one process it equals
    :func:`shard_batch`.

    Raises:
      ValueError: a leaf's leading size does not split over this process's devices.
    """
    mesh = data_mesh() if mesh is None else mesh
    sharding = data_sharding(mesh, axis)
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    _check_leading(local_batch, local, "local devices of this process")
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def process_batches(
    images: Any,
    labels: Any,
    batch_size: int,
    mesh: Mesh | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
) -> Iterator[dict[str, jax.Array]]:
    """One epoch of global batches, each process reading only its rows of each batch.

    ``images`` and ``labels`` are indexed by row lists only, so they may be memory-maps
    (``np.load(..., mmap_mode="r")``) or any lazily read array: a process reads ``1 / P``
    of the data. Every process yields the same number of batches (a collective per step
    must not wait on a process that ran out), and the batches are those
    :func:`flaxconv.data.batches` gives in one process for the same ``seed``/``epoch``.

    Yields:
      ``{"image", "label", "mask"}`` global arrays of ``batch_size`` rows split over the
      mesh; padding rows of the last batch have ``mask == False``.
    """
    # flaxconv.epochs builds its sharded plan on this module: imported late, no cycle
    from flaxconv.epochs.order import epoch_order, pad_batch

    mesh = data_mesh() if mesh is None else mesh
    check_batch_size(batch_size, mesh)
    n = len(labels)
    p, i = jax.process_count(), jax.process_index()
    if batch_size % p:
        raise ValueError(
            f"batch_size={batch_size} does not split evenly over {p} processes; expected a "
            f"multiple of {p}"
        )
    order = epoch_order(seed, epoch, n) if shuffle else np.arange(n)
    steps = -(-n // batch_size)
    order = np.concatenate([order, np.full(steps * batch_size - n, -1)])
    local = batch_size // p
    for rows in order.reshape(steps, p, local)[:, i]:
        take = rows[rows >= 0]  # padding (-1) sits at the end of the last global batch
        part = pad_batch({"image": images[take], "label": np.asarray(labels[take], np.int32)},
                         local)
        yield global_batch(part, mesh)


__all__ = [
    "DATA",
    "axis_size",
    "check_batch_size",
    "data_mesh",
    "data_sharding",
    "global_batch",
    "initialize",
    "mesh_of",
    "process_batches",
    "process_share",
    "process_slice",
    "replicate",
    "replicated",
    "shard_batch",
]
