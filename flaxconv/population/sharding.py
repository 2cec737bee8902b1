"""A population across devices: its member axis split over the ``"members"`` axis of a
mesh (:func:`shard_population`, :func:`population_mesh`), each device training its own
members with the same code, and the shared data copied to every device
(:func:`replicate_data`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxconv import parallel
from flaxconv.population.members import num_members
from flaxconv.state import TrainState

#: Name of the mesh axis that :func:`shard_population` splits the members over.
MEMBERS = "members"


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
