"""The Optax optimizer factory, with Keras's option names and defaults.

>>> tx = flaxconv.optim.make("rmsprop", learning_rate=1e-3)       # Keras's RMSprop, exactly
>>> tx = flaxconv.optim.make("sgd", learning_rate=0.01, momentum=0.9, nesterov=True)
>>> tx = flaxconv.optim.make("adam", learning_rate=optax.cosine_decay_schedule(1e-3, 5000))
>>> tx = flaxconv.optim.make("rmsprop", 1e-3, frozen=("conv_*", "bn_*"))  # train the head only

The learning rate is always injected into the optimizer state
(``optax.inject_hyperparams``): callbacks such as ReduceLROnPlateau and populations of
models with one learning rate each read and write it as
``opt_state.hyperparams["learning_rate"]`` without rebuilding the optimizer.

Freezing (fine-tuning) is by layer-name pattern: :func:`freeze` restricts any optimizer to
the trainable parameters (``optax.masked``) and gives the frozen ones zero updates: no
change, and no optimizer state (moments are kept for the trainable leaves only).
``make(..., frozen=...)`` is ``freeze`` applied inside the learning-rate injection.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Keras's option names and defaults per optimizer.
DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": dict(beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=None, nesterov=False),
    "rmsprop": dict(rho=0.9, momentum=0.0, epsilon=1e-7, centered=False, weight_decay=None),
    "sgd": dict(momentum=0.0, nesterov=False, weight_decay=None),
}
CLIP_OPTIONS = dict(clipnorm=None, global_clipnorm=None, clipvalue=None)


def names() -> tuple[str, ...]:
    """The optimizer names accepted by :func:`make`."""
    return tuple(DEFAULTS)


def _base(name: str, learning_rate: Any, o: dict[str, Any]) -> optax.GradientTransformation:
    if name == "rmsprop":
        # Keras adds epsilon inside the square root: lr * g / sqrt(v + eps).
        return optax.rmsprop(
            learning_rate,
            decay=o["rho"],
            eps=o["epsilon"],
            eps_in_sqrt=True,
            centered=o["centered"],
            momentum=o["momentum"] or None,
        )
    if name == "adam":
        # Keras's epsilon is the paper's "epsilon hat" (added to the uncorrected sqrt(v));
        # optax adds it to the bias-corrected one. They differ only in the first steps.
        if o["weight_decay"]:
            return optax.adamw(
                learning_rate, o["beta_1"], o["beta_2"], o["epsilon"],
                weight_decay=o["weight_decay"], nesterov=o["nesterov"],
            )
        return optax.adam(
            learning_rate, o["beta_1"], o["beta_2"], o["epsilon"], nesterov=o["nesterov"]
        )
    return optax.sgd(learning_rate, momentum=o["momentum"] or None, nesterov=o["nesterov"])


def make(
    name: str,
    learning_rate: float | Callable[[Any], Any] = 1e-3,
    *,
    frozen: str | Sequence[str] = (),
    **options: Any,
) -> optax.GradientTransformation:
    """An Optax optimizer with Keras's semantics for ``name``.

    Args:
      name: "adam", "rmsprop" or "sgd".
      learning_rate: a float or an Optax schedule (a function of the step count).
      frozen: layer-name patterns of parameters that get no update and no optimizer state
        (see :func:`freeze`); checked against the parameters when the optimizer is
        initialized. BatchNorm statistics are not parameters: to keep them too, freeze
        with :func:`flaxconv.finetune.freeze`, which also runs those layers in inference
        mode.
      **options: Keras's option names, defaults as in Keras:
        adam: ``beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=None, nesterov=False``
        (decoupled weight decay, AdamW, when set);
        rmsprop: ``rho=0.9, momentum=0.0, epsilon=1e-7, centered=False`` (epsilon inside
        the square root, as Keras; ``weight_decay`` adds ``wd * param`` to the update);
        sgd: ``momentum=0.0, nesterov=False, weight_decay=None``;
        all: ``clipnorm`` (per-parameter norm), ``global_clipnorm``, ``clipvalue``.

    Returns:
      An ``optax.GradientTransformation`` whose state carries
      ``hyperparams["learning_rate"]``.

    Raises:
      ValueError: an unknown optimizer or option, naming the valid ones; a learning rate
      that is neither a positive number nor a callable; (at ``init``) a ``frozen`` pattern
      that matches no parameter, listing the layer names.
    """
    if name not in DEFAULTS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {list(DEFAULTS)}")
    valid = {**DEFAULTS[name], **CLIP_OPTIONS}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for optimizer {name!r}; expected some of {sorted(valid)}"
        )
    if not callable(learning_rate) and not (
        isinstance(learning_rate, int | float) and learning_rate > 0
    ):
        raise ValueError(
            f"learning_rate={learning_rate!r}; expected a positive number or an optax schedule"
        )
    o = {**valid, **options}
    frozen = _patterns(frozen, "frozen")

    def build(learning_rate):
        parts = []
        if o["clipvalue"] is not None:
            parts.append(optax.clip(o["clipvalue"]))
        if o["clipnorm"] is not None:
            # Keras's clipnorm clips each parameter's gradient by its own norm.
            parts.append(_clip_each_by_norm(o["clipnorm"]))
        if o["global_clipnorm"] is not None:
            parts.append(optax.clip_by_global_norm(o["global_clipnorm"]))
        if o["weight_decay"] and name != "adam":
            parts.append(optax.add_decayed_weights(o["weight_decay"]))
        parts.append(_base(name, learning_rate, o))
        tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
        # Inside the injection, so the learning rate stays at opt_state.hyperparams and
        # clipping / weight decay see the trainable parameters only (as Keras's do).
        return freeze(tx, frozen) if frozen else tx

    return optax.inject_hyperparams(build)(learning_rate=learning_rate)


def _clip_each_by_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales each gradient leaf so that its L2 norm is at most ``max_norm`` (Keras clipnorm)."""

    def update_fn(updates, state, params=None):
        del params
        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g)))
            return g * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _hyperparams(opt_state: Any) -> dict[str, Any]:
    # Found wherever the injection sits, e.g. inside a researcher's optax.chain.
    hyperparams = optax.tree_utils.tree_get(opt_state, "hyperparams")
    if not isinstance(hyperparams, dict) or "learning_rate" not in hyperparams:
        raise ValueError(
            f"the optimizer state {type(opt_state).__name__} holds no injected learning rate; "
            "build the optimizer with flaxconv.optim.make or optax.inject_hyperparams"
        )
    return hyperparams


def learning_rate(opt_state: Any) -> Any:
    """The current learning rate held in an optimizer state made by :func:`make` (also when
    wrapped by :func:`freeze`)."""
    return _hyperparams(opt_state)["learning_rate"]


def set_learning_rate(opt_state: Any, value: Any) -> Any:
    """A copy of ``opt_state`` with its injected learning rate set to ``value``."""
    hyperparams = dict(_hyperparams(opt_state))
    # The old dtype, so that a jitted step sees the same types and does not retrace.
    hyperparams["learning_rate"] = jnp.asarray(value, jnp.result_type(hyperparams["learning_rate"]))
    if hasattr(opt_state, "hyperparams"):
        return opt_state._replace(hyperparams=hyperparams)
    return optax.tree_utils.tree_set(opt_state, hyperparams=hyperparams)


# --- Freezing by layer name -------------------------------------------------------------


def _patterns(patterns: str | Sequence[str], what: str) -> tuple[str, ...]:
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
        name = "/".join(_key_name(k) for k in path[:-1])
        if name not in names:
            names.append(name)
    return names


def _key_name(key: Any) -> str:
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
    patterns = _patterns(patterns, what)
    used = set()

    def matched(path, _):
        parts = [_key_name(k) for k in path]
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
    frozen = _patterns(frozen, "frozen")
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
