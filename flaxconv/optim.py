"""The Optax optimizer factory, with Keras's option names, defaults and update rules.

>>> tx = flaxconv.optim.make("rmsprop", learning_rate=1e-3)       # Keras's RMSprop, exactly
>>> tx = flaxconv.optim.make("sgd", learning_rate=0.01, momentum=0.9, nesterov=True)
>>> tx = flaxconv.optim.make("adam", learning_rate=optax.cosine_decay_schedule(1e-3, 5000))
>>> tx = flaxconv.optim.make("rmsprop", 1e-3, frozen=("conv_*", "bn_*"))  # train the head only
>>> tx = flaxconv.optim.make("adam", 1e-3, weight_decay=1e-4, exclude_from_weight_decay="*/bias")
>>> tx = flaxconv.optim.make("sgd", 0.1, use_ema=True, ema_momentum=0.99)
>>> averaged = flaxconv.optim.ema_params(state.opt_state, state.params)

The learning rate is always injected into the optimizer state
(``optax.inject_hyperparams``): callbacks such as ReduceLROnPlateau and populations of
models with one learning rate each read and write it as
``opt_state.hyperparams["learning_rate"]`` without rebuilding the optimizer.

Freezing (fine-tuning) is by layer-name pattern: :func:`freeze` restricts any optimizer to
the trainable parameters (``optax.masked``) and gives the frozen ones zero updates: no
change, and no optimizer state (moments are kept for the trainable leaves only).
``make(..., frozen=...)`` is ``freeze`` applied inside the learning-rate injection.

One update of :func:`make`'s optimizer is Keras's ``optimizer.apply`` (``keras/src/
optimizers/base_optimizer.py``), in Keras's order: clip the gradients; the optimizer's own
step; decoupled weight decay ``x -= lr * wd * x``; the moving average of the weights
(``use_ema``), which every ``ema_overwrite_frequency`` steps replaces the weights.
"""

from __future__ import annotations

import fnmatch
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# Keras's option names and defaults per optimizer (epsilon_placement is flaxconv's).
DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": dict(beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, weight_decay=None,
                 nesterov=False, epsilon_placement="keras"),
    "rmsprop": dict(rho=0.9, momentum=0.0, epsilon=1e-7, centered=False, weight_decay=None),
    "sgd": dict(momentum=0.0, nesterov=False, weight_decay=None),
}
CLIP_OPTIONS = dict(clipnorm=None, global_clipnorm=None, clipvalue=None)
# Keras's base-optimizer options, taken by every optimizer; exclude_from_weight_decay is
# Keras's method of that name, given here as layer-name patterns (see layer_mask).
COMMON_OPTIONS = dict(**CLIP_OPTIONS, use_ema=False, ema_momentum=0.99,
                      ema_overwrite_frequency=None, exclude_from_weight_decay=())

# The valid values of numeric options: a test and its description for the error message.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "momentum": (lambda x: 0 <= x <= 1, "a number in [0, 1]"),
    "rho": (lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "beta_1": (lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "beta_2": (lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "epsilon": (lambda x: x >= 0, "a number >= 0"),
    "weight_decay": (lambda x: x >= 0, "None or a number >= 0"),
    "clipnorm": (lambda x: x > 0, "None or a number > 0"),
    "global_clipnorm": (lambda x: x > 0, "None or a number > 0"),
    "clipvalue": (lambda x: x > 0, "None or a number > 0"),
    "ema_momentum": (lambda x: 0 <= x <= 1, "a number in [0, 1]"),
}
_FLAGS = ("amsgrad", "nesterov", "centered", "use_ema")
EPSILON_PLACEMENTS = ("keras", "optax")


def names() -> tuple[str, ...]:
    """The optimizer names accepted by :func:`make`."""
    return tuple(DEFAULTS)


def _is_number(x: Any) -> bool:
    # numbers.Real takes Python and NumPy scalars; bool is an int but no number here,
    # and NaN fails every range test.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_options(o: dict[str, Any]) -> None:
    """Raises a ValueError naming the first option outside its valid values."""
    for key, (ok, expected) in _RANGES.items():
        if key not in o or (o[key] is None and expected.startswith("None")):
            continue
        if not (_is_number(o[key]) and ok(o[key])):
            raise ValueError(f"{key}={o[key]!r}; expected {expected}")
    for key in _FLAGS:
        if key in o and not isinstance(o[key], bool):
            raise ValueError(f"{key}={o[key]!r}; expected True or False")
    frequency = o["ema_overwrite_frequency"]
    if frequency is not None and not (
        isinstance(frequency, numbers.Integral) and not isinstance(frequency, bool)
        and frequency >= 1
    ):
        raise ValueError(
            f"ema_overwrite_frequency={frequency!r}; expected None or an integer >= 1"
        )
    if o.get("epsilon_placement", "keras") not in EPSILON_PLACEMENTS:
        raise ValueError(
            f"epsilon_placement={o['epsilon_placement']!r}; expected one of "
            f"{list(EPSILON_PLACEMENTS)}"
        )
    clips = {k: o[k] for k in CLIP_OPTIONS if o[k] is not None}
    if len(clips) > 1:  # as Keras: which one would win is not obvious
        raise ValueError(f"clipping options {clips}; expected at most one of {list(CLIP_OPTIONS)}")


def _base(name: str, learning_rate: Any, o: dict[str, Any]) -> optax.GradientTransformation:
    if name == "rmsprop":
        # Keras adds epsilon inside the square root, lr * g / sqrt(v + eps), and its
        # momentum accumulates these lr-scaled steps, as optax.rmsprop does.
        return optax.rmsprop(
            learning_rate,
            decay=o["rho"],
            eps=o["epsilon"],
            eps_in_sqrt=True,
            centered=o["centered"],
            momentum=o["momentum"] or None,
        )
    if name == "adam":
        return optax.chain(
            scale_by_adam(
                o["beta_1"], o["beta_2"], o["epsilon"], amsgrad=o["amsgrad"],
                nesterov=o["nesterov"], epsilon_placement=o["epsilon_placement"],
            ),
            optax.scale_by_learning_rate(learning_rate),
        )
    # optax's trace sums raw gradients and the current learning rate scales the sum;
    # Keras's sums lr-scaled gradients. The same for a constant learning rate.
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
      learning_rate: a number >= 0 or an Optax schedule (a function of the step count).
      frozen: layer-name patterns of parameters that get no update and no optimizer state
        (see :func:`freeze`); checked against the parameters when the optimizer is
        initialized. BatchNorm statistics are not parameters: to keep them too, freeze
        with :func:`flaxconv.finetune.freeze`, which also runs those layers in inference
        mode.
      **options: Keras's option names, defaults and valid ranges as in Keras:
        adam: ``beta_1=0.9, beta_2=0.999`` (in [0, 1)), ``epsilon=1e-7, amsgrad=False,
        nesterov=False`` and ``epsilon_placement="keras"``: Keras's update
        ``lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)``;
        ``"optax"`` gives optax.adam's ``lr * m_hat / (sqrt(v_hat) + epsilon)`` (see
        :func:`scale_by_adam`);
        rmsprop: ``rho=0.9`` (in [0, 1)), ``momentum=0.0, epsilon=1e-7, centered=False``
        (epsilon inside the square root, as Keras);
        sgd: ``momentum=0.0`` (in [0, 1]), ``nesterov=False``; with momentum, optax's
        trace of gradients is scaled by the current learning rate, where Keras's
        velocity sums ``lr * g``: the same unless the learning rate changes;
        all: ``weight_decay=None``: Keras's decoupled decay ``x -= lr * wd * x`` at each
        step, apart from the gradient step (for adam that is AdamW);
        ``exclude_from_weight_decay=()``: layer-name patterns (see :func:`layer_mask`,
        e.g. ``"*/bias"``, ``"bn_*"``) of parameters that are not decayed (Keras takes
        substrings of variable names: its ``["bias"]`` is ``"*/bias"`` here);
        ``clipnorm`` (each parameter's gradient by its own norm), ``global_clipnorm``,
        ``clipvalue``: at most one of them;
        ``use_ema=False, ema_momentum=0.99, ema_overwrite_frequency=None``: keep Keras's
        moving average of the weights in the optimizer state (see :func:`weight_ema`); every
        ``ema_overwrite_frequency`` steps the weights are replaced by it. Keras's ``fit``
        also replaces them at the end of training; flaxconv's does not: take
        :func:`ema_params` yourself.

    Returns:
      An ``optax.GradientTransformation`` whose state carries
      ``hyperparams["learning_rate"]``.

    Raises:
      ValueError: an unknown optimizer or option, naming the valid ones; an option out of
      its range, naming the value and the range; more than one clipping option; (at
      ``init``) a ``frozen`` or ``exclude_from_weight_decay`` pattern that matches no
      parameter, listing the layer names.
    """
    if name not in DEFAULTS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {list(DEFAULTS)}")
    valid = {**DEFAULTS[name], **COMMON_OPTIONS}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for optimizer {name!r}; expected some of {sorted(valid)}"
        )
    if not callable(learning_rate) and not (_is_number(learning_rate) and learning_rate >= 0):
        raise ValueError(
            f"learning_rate={learning_rate!r}; expected a number >= 0 or an optax schedule"
        )
    o = {**valid, **options}
    _check_options(o)
    frozen = _patterns(frozen, "frozen")
    excluded = _patterns(o["exclude_from_weight_decay"], "exclude_from_weight_decay")

    def build(learning_rate):
        parts = []
        if o["clipvalue"] is not None:
            parts.append(optax.clip(o["clipvalue"]))
        if o["clipnorm"] is not None:
            # Keras's clipnorm clips each parameter's gradient by its own norm.
            parts.append(_clip_each_by_norm(o["clipnorm"]))
        if o["global_clipnorm"] is not None:
            parts.append(optax.clip_by_global_norm(o["global_clipnorm"]))
        parts.append(_base(name, learning_rate, o))
        if o["weight_decay"]:
            # Keras: x -= lr * wd * x, beside (not through) the moments and the momentum.
            mask = _decayed(excluded) if excluded else None
            parts.append(optax.add_decayed_weights(-learning_rate * o["weight_decay"], mask))
        if o["use_ema"]:
            parts.append(weight_ema(o["ema_momentum"], o["ema_overwrite_frequency"]))
        tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
        # Inside the injection, so the learning rate stays at opt_state.hyperparams and
        # clipping, weight decay and the average see the trainable parameters only (as
        # Keras's do).
        return freeze(tx, frozen) if frozen else tx

    tx = optax.inject_hyperparams(build)(learning_rate=learning_rate)
    if not (o["weight_decay"] and excluded):
        return tx

    def init_fn(params):
        # Checked here, against all the parameters: inside, frozen ones are hidden.
        layer_mask(params, excluded, "exclude_from_weight_decay")
        return tx.init(params)

    return tx._replace(init=init_fn)


def _decayed(excluded: tuple[str, ...]) -> Callable[[Any], Any]:
    """The weight-decay mask: True for the leaves outside the ``excluded`` layers."""

    def mask(params):
        # Not strict: inside freeze the frozen leaves are hidden; make checks at init.
        return jax.tree.map(lambda e: not e, layer_mask(params, excluded, strict=False))

    return mask


def _clip_each_by_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales each gradient leaf so that its L2 norm is at most ``max_norm`` (Keras clipnorm)."""

    def update_fn(updates, state, params=None):
        del params
        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g)))
            return g * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class ScaleByAdamState(NamedTuple):
    """:func:`scale_by_adam`'s state: the step count and Adam's moments (uncorrected)."""

    count: jax.Array  # steps taken, int32
    mu: Any  # first moment m
    nu: Any  # second moment v
    nu_max: Any  # amsgrad's running maximum of v; None without amsgrad


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-7,
    *,
    amsgrad: bool = False,
    nesterov: bool = False,
    epsilon_placement: str = "keras",
) -> optax.GradientTransformation:
    """Adam's step direction (to be scaled by ``-learning_rate``), Keras's by default.

    With the uncorrected moments ``m = b1 m + (1 - b1) g`` and ``v = b2 v + (1 - b2) g^2``
    at step ``t = 1, 2, ...``, and ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``::

      "keras":  m_hat * sqrt(1 - b2^t) / (sqrt(v) + eps)    # Keras 3's Adam.update_step
      "optax":  m_hat / (sqrt(v_hat) + eps)                 # optax.scale_by_adam

    The two differ only in where epsilon sits: Keras's is Kingma & Ba's "epsilon hat"
    (Adam, 2015, end of section 2), the same as optax's with ``eps / sqrt(1 - b2^t)``, so
    ``sqrt(1000)`` times larger at the first step (b2 = 0.999), and alike once
    ``b2^t`` is small.

    amsgrad: ``v`` in the denominator becomes the running maximum of the uncorrected
    ``v`` (Keras's rule, for both placements; Reddi et al., 2018).
    nesterov: ``m_hat`` becomes ``b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)``, as
    optax's ``nesterov=True`` (NAdam, Dozat 2016); Keras's Adam has no such option.
    """
    if epsilon_placement not in EPSILON_PLACEMENTS:
        raise ValueError(
            f"epsilon_placement={epsilon_placement!r}; expected one of {list(EPSILON_PLACEMENTS)}"
        )

    def init_fn(params):
        zeros = optax.tree_utils.tree_zeros_like
        return ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros(params),
            nu=zeros(params),
            nu_max=zeros(params) if amsgrad else None,
        )

    def update_fn(updates, state, params=None):
        del params
        # Keras's own forms of the moment updates (equal to b m + (1 - b) g).
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (g * g - v) * (1 - b2), state.nu, updates)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else None
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        c1, c2 = 1 - b1**t, 1 - b2**t  # the bias corrections

        def direction(g, m, v):
            m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / c1 if nesterov else m / c1
            if epsilon_placement == "keras":
                u = m_hat * jnp.sqrt(c2) / (jnp.sqrt(v) + eps)
            else:
                u = m_hat / (jnp.sqrt(v / c2) + eps)
            return u.astype(g.dtype)

        updates = jax.tree.map(direction, updates, mu, nu_max if amsgrad else nu)
        return updates, ScaleByAdamState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


class WeightEmaState(NamedTuple):
    """:func:`weight_ema`'s state: the step count and the average of the parameters."""

    count: jax.Array  # steps taken, int32
    average: Any  # the moving average of the parameters after each step


def weight_ema(
    momentum: float = 0.99, overwrite_frequency: int | None = None
) -> optax.GradientTransformation:
    """Keras's moving average of the weights (``use_ema``), kept in the optimizer state.

    With ``x = params + updates`` the parameters after step ``t = 1, 2, ...``::

      average = x                                            at t = 1
      average = momentum * average + (1 - momentum) * x      after

    and, when ``overwrite_frequency`` divides ``t``, the update becomes
    ``average - params``: the parameters move onto the average (exactly where the
    average is within a factor of 2 of the parameter, by Sterbenz's lemma; else to one
    rounding). This is Keras's ``_update_model_variables_moving_average`` and
    ``_overwrite_model_variables_with_average_value`` (keras/src/optimizers/
    base_optimizer.py). Unlike ``optax.ema``, which averages the updates, this averages
    the parameters; it must come last in a chain, to see the final updates, and needs
    ``params``. :func:`ema_params` reads the average back.

    Args:
      momentum: the average's decay, in [0, 1].
      overwrite_frequency: None (never overwrite; see :func:`ema_params`) or an integer >= 1.
    """

    def init_fn(params):
        # The parameters themselves (step 1 replaces them), so that ema_params is
        # meaningful before the first step.
        average = jax.tree.map(jnp.array, params)
        return WeightEmaState(count=jnp.zeros([], jnp.int32), average=average)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        new = optax.apply_updates(params, updates)
        decay = jnp.where(state.count == 0, 0.0, momentum)
        average = jax.tree.map(
            lambda a, x: (decay * a + (1 - decay) * x).astype(a.dtype), state.average, new
        )
        count = optax.safe_increment(state.count)
        if overwrite_frequency:
            overwrite = count % overwrite_frequency == 0
            updates = jax.tree.map(
                lambda u, a, p: jnp.where(overwrite, a - p, u), updates, average, params
            )
        return updates, WeightEmaState(count=count, average=average)

    return optax.GradientTransformation(init_fn, update_fn)


def ema_params(opt_state: Any, params: Any) -> Any:
    """``params`` with each leaf replaced by its moving average in ``opt_state``.

    The average is the one kept by ``make(..., use_ema=True)`` (:func:`weight_ema`).
    Keras's ``fit`` ends by writing it into the model (``finalize_variable_values``);
    flaxconv's ``fit`` does not, so do it after training::

      state = state.replace(params=fc.optim.ema_params(state.opt_state, state.params))

    Leaves without an average (frozen layers) are taken from ``params``.

    Raises:
      ValueError: ``opt_state`` holds no average, or more than one.
    """
    found = [
        s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, WeightEmaState))
        if isinstance(s, WeightEmaState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"the optimizer state holds {len(found)} weight averages; expected one: build "
            "the optimizer with flaxconv.optim.make(..., use_ema=True)"
        )
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return jax.tree.map(
        lambda a, p: p if is_masked(a) else a, found[0].average, params, is_leaf=is_masked
    )


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
