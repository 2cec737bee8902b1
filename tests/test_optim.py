"""The optimizer factory against Keras 3: its own tests' golden values, and values computed
with Keras once and written down here.

"Keras's test" below means keras/src/optimizers/<name>_test.py in Keras 3.15.1; "Keras
3.15.1" means the value was computed with that version (backends jax and tensorflow agree
to the printed digits) by running the named optimizer on ``X0`` with the gradients
``GRADS``, one ``optimizer.apply_gradients`` per gradient, and printing the variable.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxconv as fc

X0 = np.array([1.0, -2.0], np.float32)
GRADS = [np.array([0.5, -0.1], np.float32), np.array([-0.2, 0.3], np.float32),
         np.array([0.4, 0.05], np.float32)]


def run(tx, grads=GRADS, x0=X0):
    """Applies ``tx`` to ``{"w": x0}`` once per gradient: the values of w after each step
    (as Keras's tests read the variable), the last optimizer state and the params."""
    params = {"w": jnp.asarray(x0)}
    opt_state, values = tx.init(params), []
    for g in grads:
        updates, opt_state = tx.update({"w": jnp.asarray(g)}, opt_state, params)
        params = optax.apply_updates(params, updates)
        values.append(np.asarray(params["w"]))
    return np.array(values), opt_state, params


# --- Values computed with Keras 3.15.1, three steps of GRADS from X0 -------------------

KERAS_3_STEPS = {
    # keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, weight_decay=0.1)
    "sgd_momentum_wd": (
        ("sgd", 0.1, dict(momentum=0.9, weight_decay=0.1)),
        [[0.94, -1.97], [0.9056, -1.9713], [0.83404404, -1.975487]],
    ),
    # keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    "sgd_nesterov_wd": (
        ("sgd", 0.1, dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
        [[0.895, -1.961], [0.88355, -1.99029], [0.7784645, -1.996897]],
    ),
    # keras.optimizers.RMSprop(learning_rate=0.01, rho=0.8, epsilon=1e-3, weight_decay=0.5)
    "rmsprop_wd": (
        ("rmsprop", 0.01, dict(rho=0.8, epsilon=1e-3, weight_decay=0.5)),
        [[0.9728596, -1.9717426], [0.9770304, -1.982786], [0.9571756, -1.9766867]],
    ),
    # keras.optimizers.RMSprop(learning_rate=0.01, rho=0.8, momentum=0.5, centered=True,
    #                          epsilon=1e-3, weight_decay=0.5)
    "rmsprop_momentum_centered_wd": (
        ("rmsprop", 0.01, dict(rho=0.8, momentum=0.5, centered=True, epsilon=1e-3,
                               weight_decay=0.5)),
        [[0.97030675, -1.9703884], [0.9622949, -1.97269], [0.93941545, -1.9729673]],
    ),
    # keras.optimizers.Adam(learning_rate=0.1, epsilon=1e-2)
    "adam_eps": (
        ("adam", 0.1, dict(epsilon=1e-2)),
        [[0.938743, -1.9759748], [0.9169724, -2.0006833], [0.8765063, -2.0246809]],
    ),
    # keras.optimizers.Adam(learning_rate=0.1, beta_2=0.5, epsilon=1e-2, weight_decay=0.5)
    "adam_b2_wd": (
        ("adam", 0.1, dict(beta_2=0.5, epsilon=1e-2, weight_decay=0.5)),
        [[0.85275066, -1.81239], [0.77177536, -1.7637625], [0.67296153, -1.7246457]],
    ),
    # keras.optimizers.Adam(learning_rate=0.1, beta_2=0.5, epsilon=1e-2, amsgrad=True,
    #                       weight_decay=0.5): v of w[0] falls at step 2, so amsgrad acts.
    "adam_amsgrad_b2_wd": (
        ("adam", 0.1, dict(beta_2=0.5, epsilon=1e-2, amsgrad=True, weight_decay=0.5)),
        [[0.85275066, -1.81239], [0.77876955, -1.7637625], [0.6804912, -1.7117655]],
    ),
    # keras.optimizers.SGD(learning_rate=1.0, global_clipnorm=0.5)
    "sgd_global_clipnorm": (
        ("sgd", 1.0, dict(global_clipnorm=0.5)),
        [[0.50970966, -1.9019419], [0.70970964, -2.201942], [0.30970964, -2.251942]],
    ),
    # keras.optimizers.SGD(learning_rate=1.0, clipnorm=0.3)
    "sgd_clipnorm": (
        ("sgd", 1.0, dict(clipnorm=0.3)),
        [[0.7058258, -1.9411652], [0.8722359, -2.1907804], [0.57455254, -2.2279909]],
    ),
}


@pytest.mark.parametrize("case", list(KERAS_3_STEPS))
def test_three_steps_match_keras(case):
    """Decoupled weight decay (also beside momentum and RMS scaling), Adam's epsilon and
    amsgrad, and clipping, step by step as Keras 3.15.1 computes them."""
    (name, lr, options), keras_values = KERAS_3_STEPS[case]
    values, _, _ = run(fc.optim.make(name, lr, **options))
    np.testing.assert_allclose(values, keras_values, rtol=1e-6, atol=0)


def test_weight_decay_is_not_added_to_the_gradient():
    """Keras shrinks x by lr * wd * x beside the step (the issue's defect 1): RMSprop's
    normalisation and SGD's momentum never see the decay term."""
    # Keras's rmsprop_test.py test_weight_decay: three fresh optimizers, one step each.
    x = jnp.asarray(2.0)
    for _ in range(3):
        tx = fc.optim.make("rmsprop", 1.0, weight_decay=0.004)
        (x,), _, _ = run(tx, grads=[np.zeros(())], x0=x)
    assert float(x) == pytest.approx(1.9760959, abs=1e-6)  # wd * x added to g: -1.1858747
    values, _, _ = run(fc.optim.make("sgd", 0.1, momentum=0.9, weight_decay=0.1))
    # Keras 3.15.1 (KERAS_3_STEPS["sgd_momentum_wd"]); the decay through the momentum
    # would give 0.8086 (flaxconv before this fix).
    assert values[-1, 0] == pytest.approx(0.83404404, abs=1e-6)


@pytest.mark.parametrize("name", ["adam", "rmsprop", "sgd"])
def test_weight_decay_exclusions_as_in_keras_tests(name):
    """Keras's adam/rmsprop/sgd_test.py test_weight_decay: lr 1, wd 0.004, zero gradients;
    var1 takes three steps (three fresh optimizers), "exclude" is not decayed."""
    params = {"var1": jnp.asarray(2.0), "exclude": jnp.asarray(2.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):
        tx = fc.optim.make(name, 1.0, weight_decay=0.004, exclude_from_weight_decay="exclude")
        updates, _ = tx.update(zeros, tx.init(params), params)
        params = optax.apply_updates(params, updates)
    assert float(params["var1"]) == pytest.approx(1.9760959, abs=1e-6)
    assert float(params["exclude"]) == 2.0


def test_weight_decay_uses_the_injected_learning_rate():
    """Keras decays by the current learning rate: a learning rate set to 0 stops it."""
    tx = fc.optim.make("sgd", 0.5, weight_decay=0.1)
    params = {"w": jnp.asarray(X0)}
    state = fc.optim.set_learning_rate(tx.init(params), 0.0)
    updates, _ = tx.update({"w": jnp.zeros(2)}, state, params)
    np.testing.assert_array_equal(updates["w"], 0.0)
    updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * 0.1 * X0, rtol=1e-7)


def test_exclude_from_weight_decay_takes_layer_patterns():
    params = {"conv_0": {"kernel": jnp.ones(3), "bias": jnp.ones(2)},
              "head": {"kernel": jnp.ones(2), "bias": jnp.ones(1)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = fc.optim.make("adam", 1.0, weight_decay=0.1, exclude_from_weight_decay="*/bias")
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert {k: float(v["kernel"][0]) for k, v in updates.items()} == {
        "conv_0": pytest.approx(-0.1, rel=1e-6), "head": pytest.approx(-0.1, rel=1e-6)}
    assert all(float(v["bias"][0]) == 0.0 for v in updates.values())
    # Checked against all the parameters, frozen ones included: excluding a frozen layer
    # is fine, a pattern that matches nothing is reported with the layer names.
    tx = fc.optim.make("sgd", 1.0, weight_decay=0.1, frozen="conv_0",
                       exclude_from_weight_decay=("conv_0", "head/bias"))
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1)
    assert float(updates["head"]["bias"][0]) == 0.0
    np.testing.assert_array_equal(updates["conv_0"]["kernel"], 0.0)  # frozen
    tx = fc.optim.make("sgd", 1.0, weight_decay=0.1, exclude_from_weight_decay="hed/*")
    with pytest.raises(ValueError, match=r"exclude_from_weight_decay.*\['conv_0', 'head'\]"):
        tx.init(params)


# --- Adam -------------------------------------------------------------------------------


def test_adam_epsilon_is_keras_by_default_and_optax_on_request():
    """Keras: x -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps); optax: eps is added
    to sqrt(v_hat). With eps = 1e-2 the two differ by 0.03 after one step."""
    grads = [g * 0.1 for g in GRADS]  # small gradients, where epsilon matters
    b1, b2, eps, lr = 0.9, 0.999, 1e-2, 0.1
    m, v, x = np.zeros(2), np.zeros(2), X0.astype(np.float64)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        x = x - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    keras_values, _, _ = run(fc.optim.make("adam", lr, epsilon=eps), grads)
    np.testing.assert_allclose(keras_values[-1], x, rtol=1e-6)
    optax_values, _, _ = run(fc.optim.make("adam", lr, epsilon=eps, epsilon_placement="optax"),
                             grads)
    reference, _, _ = run(optax.adam(lr, b1, b2, eps), grads)
    np.testing.assert_allclose(optax_values, reference, rtol=1e-6)
    assert np.max(np.abs(optax_values[0] - keras_values[0])) > 0.03


def test_adam_nesterov_is_optax_nesterov_adam():
    values, _, _ = run(fc.optim.make("adam", 0.1, nesterov=True, epsilon_placement="optax"))
    reference, _, _ = run(optax.adam(0.1, 0.9, 0.999, 1e-7, nesterov=True))
    np.testing.assert_allclose(values, reference, rtol=1e-6)


# Keras's tests test_correctness_with_golden: one step of 0.01 everywhere, then five of
# arange(0.1, 1.1, 0.1), x read before each of those five; Keras's own tolerance 5e-4.
KERAS_GOLDEN = {
    "adam": (dict(amsgrad=True), [0.999, 0.9982, 0.9974, 0.9965, 0.9955]),
    "rmsprop": (dict(centered=True), [0.9967, 0.9933, 0.9908, 0.9885, 0.9864]),
}


@pytest.mark.parametrize("name", list(KERAS_GOLDEN) + ["sgd"])
def test_keras_correctness_with_golden(name):
    grads = [np.full(10, 0.01, np.float32)] + [np.arange(0.1, 1.1, 0.1, dtype=np.float32)] * 5
    if name == "sgd":
        # SGD(nesterov=True), Keras's default lr 0.01 and momentum 0: Keras's table is
        # 0.9999 everywhere, then 0.9989 ... 0.9899, 0.9979 ... 0.9799, and so on.
        lr, options = 1e-2, dict(nesterov=True)
        golden = 0.9999 - 0.01 * np.arange(5)[:, None] * np.arange(0.1, 1.1, 0.1)
    else:  # Keras's default lr 0.001
        lr, (options, column) = 1e-3, KERAS_GOLDEN[name]
        golden = np.tile(np.array(column)[:, None], (1, 10))
    values, _, _ = run(fc.optim.make(name, lr, **options), grads, np.ones(10, np.float32))
    np.testing.assert_allclose(values[:5], golden, rtol=5e-4, atol=5e-4)


@pytest.mark.parametrize("name, keras_values", [
    # Keras's tests test_single_step: lr 0.5, grads [1, 6, 7, 2] on [1, 2, 3, 4].
    ("adam", [0.5, 1.5, 2.5, 3.5]),
    ("rmsprop", [-0.5811, 0.4189, 1.4189, 2.4189]),
    ("sgd", [0.5, -1.0, -0.5, 3.0]),
])
def test_keras_single_step(name, keras_values):
    values, _, _ = run(fc.optim.make(name, 0.5), [np.array([1.0, 6.0, 7.0, 2.0], np.float32)],
                       np.array([1.0, 2.0, 3.0, 4.0], np.float32))
    np.testing.assert_allclose(values[0], keras_values, rtol=1e-4, atol=1e-4)


# --- Clipping ---------------------------------------------------------------------------


@pytest.mark.parametrize("option, grads, clipped", [
    # Keras's optimizer_test.py: test_clip_norm, test_clip_value, test_global_clip_norm.
    (dict(clipnorm=1.0), {"a": [100.0, 100.0]}, {"a": [2**0.5 / 2, 2**0.5 / 2]}),
    (dict(clipvalue=1.0), {"a": [100.0, 100.0]}, {"a": [1.0, 1.0]}),
    (dict(global_clipnorm=1.0), {"a": [50.0, 100.0]}, {"a": [50 / 12500**0.5, 100 / 12500**0.5]}),
    # One norm over all the parameters, or one per parameter.
    (dict(global_clipnorm=1.0), {"a": [3.0], "b": [4.0]}, {"a": [0.6], "b": [0.8]}),
    (dict(clipnorm=1.0), {"a": [3.0], "b": [4.0]}, {"a": [1.0], "b": [1.0]}),
    (dict(global_clipnorm=10.0), {"a": [3.0], "b": [4.0]}, {"a": [3.0], "b": [4.0]}),
])
def test_clipping_as_keras(option, grads, clipped):
    tx = fc.optim.make("sgd", 1.0, **option)
    grads = {k: jnp.asarray(v) for k, v in grads.items()}
    updates, _ = tx.update(grads, tx.init(grads), grads)
    for k, v in clipped.items():
        np.testing.assert_allclose(updates[k], -np.array(v), rtol=1e-6)


# --- Moving average of the weights ------------------------------------------------------


def test_ema_overwrites_as_keras_sgd_test():
    """Keras's optimizer_test.py test_ema: SGD lr 1, ema_momentum 0.9, frequency 3."""
    tx = fc.optim.make("sgd", 1.0, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3)
    x0 = np.array([[3.0, 4.0], [5.0, 6.0]], np.float32)
    values, opt_state, params = run(tx, [np.ones((2, 2), np.float32)] * 3, x0)
    np.testing.assert_allclose(values[0], [[2.0, 3.0], [4.0, 5.0]])
    np.testing.assert_allclose(values[1], [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(values[2], [[1.71, 2.71], [3.71, 4.71]], rtol=1e-6)  # overwritten
    np.testing.assert_allclose(fc.optim.ema_params(opt_state, params)["w"], values[2])


def test_ema_matches_keras_with_momentum_and_at_the_end():
    # Keras 3.15.1: SGD(learning_rate=0.1, momentum=0.5, use_ema=True, ema_momentum=0.9,
    # ema_overwrite_frequency=2), four steps (GRADS then GRADS[0]): steps 2 and 4 overwrite.
    tx = fc.optim.make("sgd", 0.1, momentum=0.5, use_ema=True, ema_momentum=0.9,
                       ema_overwrite_frequency=2)
    values, _, _ = run(tx, GRADS + GRADS[:1])
    np.testing.assert_allclose(values, [[0.95, -1.99], [0.9495, -1.9925], [0.907, -2.01],
                                        [0.9343, -1.9957]], rtol=1e-6)
    # Keras 3.15.1: Adam(learning_rate=0.1, use_ema=True, ema_momentum=0.8): no overwrite;
    # the average is optimizer._model_variables_moving_average, which Keras's fit writes
    # into the model at the end and ema_params returns.
    values, opt_state, params = run(fc.optim.make("adam", 0.1, use_ema=True, ema_momentum=0.8))
    np.testing.assert_allclose(values[-1], [0.8058881, -1.9971348], rtol=1e-6)
    np.testing.assert_allclose(fc.optim.ema_params(opt_state, params)["w"],
                               [0.8756491, -1.9273369], rtol=1e-6)


def test_ema_by_hand_and_against_the_same_optimizer_without_it():
    """Keras's adam_test.py test_ema_overwrite_frequency, and the average by hand."""
    m = 0.9
    plain, _, _ = run(fc.optim.make("adam", 1.0), GRADS[:2], X0)
    tx = fc.optim.make("adam", 1.0, use_ema=True, ema_momentum=m, ema_overwrite_frequency=2)
    values, opt_state, params = run(tx, GRADS[:2], X0)
    np.testing.assert_array_equal(values[0], plain[0])  # step 1: the average is x1
    expected = m * plain[0] + (1 - m) * plain[1]
    np.testing.assert_allclose(values[1], expected, rtol=1e-6, atol=1e-7)  # overwritten
    np.testing.assert_allclose(fc.optim.ema_params(opt_state, params)["w"], expected,
                               rtol=1e-6, atol=1e-7)
    # Without overwrites the weights are the plain optimizer's, the average beside them.
    tx = fc.optim.make("adam", 1.0, use_ema=True, ema_momentum=m)
    values, opt_state, params = run(tx, GRADS[:2], X0)
    np.testing.assert_array_equal(values, plain)
    np.testing.assert_allclose(fc.optim.ema_params(opt_state, params)["w"], expected,
                               rtol=1e-6, atol=1e-7)


def test_ema_params_fills_frozen_layers_and_needs_an_average():
    params = {"conv_0": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.ones(2)}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = fc.optim.make("sgd", 0.5, frozen="conv_0", use_ema=True, ema_momentum=0.5)
    opt_state = tx.init(params)
    np.testing.assert_array_equal(fc.optim.ema_params(opt_state, params)["head"]["kernel"], 1.0)
    for _ in range(2):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    averaged = fc.optim.ema_params(opt_state, params)
    np.testing.assert_array_equal(averaged["conv_0"]["kernel"], 1.0)  # frozen: from params
    np.testing.assert_allclose(averaged["head"]["kernel"], 0.5 * 0.5 + 0.5 * 0.0)
    assert float(fc.optim.learning_rate(opt_state)) == 0.5
    with pytest.raises(ValueError, match="0 weight averages.*use_ema=True"):
        fc.optim.ema_params(fc.optim.make("sgd").init(params), params)


@functools.lru_cache
def tiny_state(tx):
    model = fc.models.get("dlwp_mnist", num_classes=3, features=(4, 8))
    return fc.create_train_state(jax.random.key(0), model, tx, np.zeros((1, 12, 12, 1)))


def test_every_option_together_in_train_step():
    """Freezing, clipping, weight decay with exclusions, amsgrad and the average, jitted
    in train_step: frozen layers stay bit for bit, the learning rate stays reachable, and
    the second step puts the weights on the average."""
    tx = fc.optim.make("adam", 1e-2, frozen="conv_0", global_clipnorm=1.0, amsgrad=True,
                       weight_decay=0.1, exclude_from_weight_decay="*/bias",
                       use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2)
    state = tiny_state(tx)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 12, 12, 1), dtype=np.uint8),
             "label": rng.integers(0, 3, 8).astype(np.int32)}
    one, _ = fc.train_step(state, batch)
    two, _ = fc.train_step(one, batch)
    for s in (one, two):
        np.testing.assert_array_equal(s.params["conv_0"]["kernel"],
                                      state.params["conv_0"]["kernel"])
    assert float(two.opt_state.hyperparams["learning_rate"]) == pytest.approx(1e-2)
    # Step 2 overwrites: the weights are 0.5 * (weights after step 1) + 0.5 * (after 2).
    averaged = fc.optim.ema_params(two.opt_state, two.params)
    for a, b in zip(jax.tree.leaves(averaged), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(two.params["head"]["kernel"], one.params["head"]["kernel"])


# --- Refused options --------------------------------------------------------------------


@pytest.mark.parametrize("name, options, message", [
    # Keras's sgd_test.py test_invalid_momentum.
    ("sgd", dict(momentum=-1.0), r"momentum=-1.0; expected a number in \[0, 1\]"),
    ("sgd", dict(momentum=2.0), r"momentum=2.0; expected a number in \[0, 1\]"),
    ("rmsprop", dict(momentum=1.5), r"momentum=1.5; expected a number in \[0, 1\]"),
    ("rmsprop", dict(rho=1.0), r"rho=1.0; expected a number in \[0, 1\)"),
    ("adam", dict(beta_1=1.0), r"beta_1=1.0; expected a number in \[0, 1\)"),
    ("adam", dict(beta_2=-0.1), r"beta_2=-0.1; expected a number in \[0, 1\)"),
    ("adam", dict(epsilon=-1e-7), r"epsilon=-1e-07; expected a number >= 0"),
    ("rmsprop", dict(epsilon=float("nan")), r"epsilon=nan; expected a number >= 0"),
    ("sgd", dict(weight_decay=-0.1), r"weight_decay=-0.1; expected None or a number >= 0"),
    ("sgd", dict(clipnorm=0.0), r"clipnorm=0.0; expected None or a number > 0"),
    ("sgd", dict(global_clipnorm=-1), r"global_clipnorm=-1; expected None or a number > 0"),
    ("adam", dict(clipvalue="1"), r"clipvalue='1'; expected None or a number > 0"),
    ("sgd", dict(momentum=True), r"momentum=True; expected a number in \[0, 1\]"),
    ("sgd", dict(nesterov="yes"), r"nesterov='yes'; expected True or False"),
    ("adam", dict(amsgrad=1), r"amsgrad=1; expected True or False"),
    ("adam", dict(epsilon_placement="paper"), r"epsilon_placement='paper'; expected one of"),
    # Keras's base optimizer: ema_momentum in [0, 1], frequency None or an integer >= 1.
    ("sgd", dict(use_ema=True, ema_momentum=1.5), r"ema_momentum=1.5; expected .*\[0, 1\]"),
    ("sgd", dict(ema_overwrite_frequency=0), r"ema_overwrite_frequency=0; expected None or"),
    ("sgd", dict(ema_overwrite_frequency=2.5), r"ema_overwrite_frequency=2.5; expected"),
    # Keras's optimizer_test.py test_clip_args: at most one clipping option.
    ("sgd", dict(clipnorm=0.1, clipvalue=0.1), r"clipping options .*clipnorm.*clipvalue"),
    ("sgd", dict(clipnorm=0.1, global_clipnorm=0.1), r"expected at most one of"),
    ("adam", dict(learning_rate=-1e-3), r"learning_rate=-0.001; expected a number >= 0"),
])
def test_out_of_range_options_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message):
        fc.optim.make(name, **options)


def test_range_ends_are_accepted():
    params = {"w": jnp.ones(2)}
    for name, options in [
        ("sgd", dict(momentum=0.0)), ("sgd", dict(momentum=1)), ("rmsprop", dict(rho=0.0)),
        ("adam", dict(beta_1=0.0, beta_2=0.0, epsilon=0.0, weight_decay=0.0)),
        ("sgd", dict(learning_rate=0.0)), ("sgd", dict(ema_momentum=0.0, use_ema=True)),
        ("sgd", dict(ema_momentum=1.0, use_ema=True, ema_overwrite_frequency=np.int64(1))),
        ("rmsprop", dict(momentum=np.float32(0.5))),
    ]:
        tx = fc.optim.make(name, **options)
        tx.update(params, tx.init(params), params)
