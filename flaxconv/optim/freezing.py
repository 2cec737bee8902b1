"""Freezing by layer name: layer-name patterns over parameter trees, and :func:`freeze`.

A layer is a path of names in a params (or batch_stats) tree, ``/``-joined
(``conv_0``, ``blocks/0``); patterns are ``fnmatch`` patterns over those paths and their
leaves (``"conv_*"``, ``"*/bias"``). :func:`layer_mask` turns patterns into a bool
pytree; :func:`freeze` wraps any Optax optimizer so that the matched parameters get no
update and no optimizer state. :func:`flaxconv.optim.make` (``frozen=``,
``exclude_from_weight_decay=``), :mod:`flaxconv.finetune` (freezing, partial restores) and
``flaxconv.viz.summary`` (``frozen=``) all select layers through these. This module imports nothing
from flaxconv.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax


def as_patterns(patterns: str | Sequence[str], what: str) -> tuple[str, ...]:
    """``patterns`` (one pattern or a sequence) as a tuple; a TypeError naming ``what``
    unless each is a non-empty string."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    bad = [p for p in patterns if not isinstance(p, str) or not p]
    if bad:
        raise TypeError(f"{what}={patterns!r}; expected layer-name patterns (non-empty strings)")
    return patterns


def layer_names(tree: Any) -> list[str]:
    """The layer paths of a variables tree: each leaf's path without its variable name,
    ``/``-joined, in tree order (``["conv_0", "conv_1", "head"]`` for a ConvStack)."""
    names = []
    for path, _ in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(key_name(k) for k in path[:-1])
        if name not in names:
            names.append(name)
    return names


def key_name(key: Any) -> str:
    """One step of a ``jax.tree_util`` key path as a name: a dict key, a sequence index or
    an attribute name, as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def layer_mask(
    tree: Any, patterns: str | Sequence[str], what: str = "patterns", strict: bool = True
) -> Any:
    """Which leaves of ``tree`` belong to a layer matched by ``patterns``: a bool pytree.

    A leaf at path ``("conv_0", "kernel")`` is matched when a pattern matches (``fnmatch``,
    case-sensitive) any prefix of its ``/``-joined path: ``"conv_0"`` or ``"conv_0/kernel"``.
    So ``"conv_*"`` selects every conv layer, ``"conv_0"`` one layer, ``"*/bias"`` every bias.

    Args:
      tree: a params (or batch_stats) tree.
      patterns: a pattern or a sequence of them.
      what: how the patterns are named in errors (e.g. ``"frozen"``).
      strict: every pattern must match at least one leaf.

    Raises:
      ValueError: (``strict``) a pattern matches nothing; the message lists the layer names.
    """
    patterns = as_patterns(patterns, what)
    used = set()

    def matched(path, _):
        parts = [key_name(k) for k in path]
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hits = {p for p in patterns if any(fnmatch.fnmatchcase(x, p) for x in prefixes)}
        used.update(hits)
        return bool(hits)

    mask = jax.tree_util.tree_map_with_path(matched, tree)
    unused = [p for p in patterns if p not in used]
    if strict and unused:
        raise ValueError(
            f"{what} pattern(s) {unused} match no layer; the layers are {layer_names(tree)}"
        )
    return mask


def freeze(
    tx: optax.GradientTransformation, frozen: str | Sequence[str]
) -> optax.GradientTransformation:
    """``tx`` for the parameters outside the ``frozen`` layers; zero updates for the rest.

    ``optax.masked`` restricts ``tx`` to the trainable leaves and the frozen leaves get zero
    updates (``optax.set_to_zero``'s role in ``multi_transform``): they never change, bit
    for bit, and ``tx`` keeps no state for them (moments exist for the trainable leaves
    only). Unlike ``multi_transform``, the optimizer state keeps the structure of ``tx``'s
    own state, so an injected learning rate stays at ``opt_state.hyperparams`` where
    callbacks (ReduceLROnPlateau), populations and ``fit``'s ``lr`` log look for it.
    Gradients of frozen leaves are still asked for; under ``jit`` XLA drops that dead work.

    Args:
      tx: any Optax optimizer.
      frozen: layer-name patterns (see :func:`layer_mask`), e.g. ``("conv_*", "bn_*")``.

    Returns:
      A ``GradientTransformation`` with ``tx``'s state structure (frozen leaves in it are
      ``optax.MaskedNode`` placeholders, which hold no arrays).

    Raises:
      ValueError: at ``init``, a pattern that matches no parameter, listing the layers.
    """
    frozen = as_patterns(frozen, "frozen")
    is_frozen = lambda tree: layer_mask(tree, frozen, "frozen")  # noqa: E731
    masked = optax.masked(tx, lambda params: jax.tree.map(lambda f: not f, is_frozen(params)))

    def init_fn(params):
        return masked.init(params).inner_state

    def update_fn(updates, state, params=None):
        updates, state = masked.update(updates, optax.MaskedState(inner_state=state), params)
        # optax.masked passes the frozen leaves' updates (the raw gradients) through.
        zero = lambda u, f: jnp.zeros_like(u) if f else u  # noqa: E731
        return jax.tree.map(zero, updates, is_frozen(updates)), state.inner_state

    return optax.GradientTransformation(init_fn, update_fn)
