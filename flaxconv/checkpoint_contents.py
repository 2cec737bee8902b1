"""What one checkpoint holds, and the checksum that every restore checks.

A checkpoint of :mod:`flaxconv.checkpoint` has up to three Orbax items:

* ``state``: :func:`state_arrays` of a :class:`~flaxconv.state.TrainState`;
* ``meta``: a JSON dict in which every numpy or jax array is replaced by a placeholder
  ``{"__array__": i, "shape": [...], "dtype": ...}`` (:func:`_take_arrays`);
* ``arrays``: those arrays, keyed ``"0"``, ``"1"``, ... (:func:`_array_targets` gives their
  restore targets, :func:`_put_arrays` puts them back in place).

``meta`` also carries a SHA-256 (:data:`_CHECKSUM`) over the state's arrays, keyed by their
paths, the ``arrays`` item and the rest of ``meta``; :func:`_verify` checks a restored
checkpoint against it (checkpoints of earlier versions carry :data:`_LEGACY_CHECKSUM`, over
the leaves in template order). Everything here is host-side Python on restored trees:
nothing is jitted, and nothing here reads or writes files.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxconv.state import TrainState


def state_arrays(state: TrainState) -> dict[str, Any]:
    """The pytree of ``state``'s arrays (what is saved); static fields are left out."""
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "rng": state.rng,
    }


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files do not restore or do not match their checksum."""


_ARRAY = "__array__"  # marks where an array of ``meta`` was taken out to the ``arrays`` item
# The checksum of _digest; checkpoints of earlier versions carry _LEGACY_CHECKSUM instead.
_CHECKSUM = "_sha256_by_path"
_LEGACY_CHECKSUM = "_sha256"


def _take_arrays(tree: Any, arrays: list[np.ndarray]) -> Any:
    """``tree`` with each numpy/jax array replaced by a JSON placeholder (host copies of the
    arrays are appended to ``arrays``) and numpy scalars by Python ones."""
    if isinstance(tree, dict):
        return {k: _take_arrays(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_take_arrays(v, arrays) for v in tree]
    if isinstance(tree, np.generic):
        return tree.item()
    if isinstance(tree, np.ndarray | jax.Array):
        array = np.asarray(jax.device_get(tree))
        arrays.append(array)
        return {_ARRAY: len(arrays) - 1, "shape": list(array.shape), "dtype": array.dtype.name}
    return tree


def _array_targets(tree: Any, targets: dict[str, np.ndarray]) -> None:
    """Collects the restore target (shape and dtype) of every placeholder in ``tree``."""
    if isinstance(tree, dict):
        if _ARRAY in tree:
            targets[str(tree[_ARRAY])] = np.empty(tree["shape"], jnp.dtype(tree["dtype"]))
            return
        for v in tree.values():
            _array_targets(v, targets)
    elif isinstance(tree, list):
        for v in tree:
            _array_targets(v, targets)


def _put_arrays(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, dict):
        if _ARRAY in tree:
            return arrays[str(tree[_ARRAY])]
        return {k: _put_arrays(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_put_arrays(v, arrays) for v in tree]
    return tree


def _sharded_over_hosts(leaves: list[Any]) -> bool:
    return any(
        isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated)
        for x in leaves
    )


def _path_name(path: tuple[Any, ...]) -> str:
    """``"opt_state/0/mu/conv_0/kernel"``: dict keys, attribute names and sequence indices
    alike, so a tree restored without its template (dicts) names a leaf as the saved one."""
    names = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(name) for name in names)


def _digest(
    state: dict[str, Any], arrays: list[np.ndarray], meta: dict[str, Any]
) -> str | None:
    """SHA-256 over the path, dtype, shape and bytes of every state array (in path order),
    of the ``arrays`` item and the canonical JSON of ``meta``; None when a state array is
    sharded over several hosts (no host sees it all).

    Keyed by paths, not by the template's leaf order, so it can be checked on a state read
    without its template (:func:`restore_params`: named tuples come back as dicts)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    if _sharded_over_hosts([leaf for _, leaf in flat]):
        return None
    named = sorted(((_path_name(path), leaf) for path, leaf in flat), key=lambda e: e[0])
    named += [(f"arrays/{i}", array) for i, array in enumerate(arrays)]
    h = hashlib.sha256()
    for name, leaf in named:
        value = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{name}:{value.dtype.name}{value.shape}".encode())
        h.update(value.tobytes())
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def _legacy_digest(
    state: dict[str, Any], arrays: list[np.ndarray], meta: dict[str, Any]
) -> str | None:
    """The checksum of earlier versions: like :func:`_digest` but over the leaves in the
    template's order, without paths."""
    leaves = jax.tree.leaves(state)
    if _sharded_over_hosts(leaves):
        return None
    h = hashlib.sha256()
    for leaf in [*leaves, *arrays]:
        value = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{value.dtype.name}{value.shape}".encode())
        h.update(value.tobytes())
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def _verify(where: str, meta: dict[str, Any], state: Any, arrays: dict[str, np.ndarray]) -> None:
    """Checks a restored checkpoint against the checksum in its ``meta`` (which it pops).

    Raises:
      CorruptCheckpointError: naming ``where``, when the arrays or meta differ from what was
        saved.
    """
    saved, legacy = meta.pop(_CHECKSUM, None), meta.pop(_LEGACY_CHECKSUM, None)
    ordered = [arrays[str(i)] for i in range(len(arrays))]
    if saved is not None:
        digest = _digest(state, ordered, meta)
    elif legacy is not None:
        saved, digest = legacy, _legacy_digest(state, ordered, meta)
    else:
        return  # saved without a checksum (its arrays were sharded over several hosts)
    if digest is not None and digest != saved:
        raise CorruptCheckpointError(f"checkpoint {where} does not match its checksum")
