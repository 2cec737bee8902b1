"""Keras's update rules that Optax does not have, as ``optax.GradientTransformation`` objects.

* :func:`scale_by_adam`: Adam's step direction with Keras's placement of epsilon (or
  optax's), amsgrad and nesterov;
* :func:`weight_ema` and :func:`ema_params`: Keras's moving average of the weights
  (``use_ema``), kept in the optimizer state, and reading it back;
* :func:`clip_each_by_norm`: Keras's ``clipnorm`` (each parameter by its own norm).

:func:`flaxconv.optim.make` chains them with Optax's own transforms; each also composes
with any Optax optimizer. Pure functions of (updates, state, params), so they jit, vmap
and scan as Optax's do. This module imports nothing from flaxconv.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

#: Where :func:`scale_by_adam` puts epsilon: Keras's place or optax's.
EPSILON_PLACEMENTS = ("keras", "optax")


def clip_each_by_norm(max_norm: float) -> optax.GradientTransformation:
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

