"""The public step functions: purity, learning, exact metric sums, vmap/scan, bad input."""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxconv as fc


def make_state(model="dlwp_mnist", optimizer="rmsprop", seed=0, **model_options):
    model = fc.models.get(model, **model_options)
    tx = fc.optim.make(optimizer, learning_rate=1e-3)
    return fc.create_train_state(jax.random.key(seed), model, tx, np.zeros((1, 28, 28, 1)))


def random_batch(n=32, seed=0, classes=10):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
        "label": rng.integers(0, classes, n).astype(np.int32),
    }


@pytest.mark.parametrize(
    "name, params", [("dlwp_mnist", 104_202), ("dlwp_ch5", 93_322),
                     ("fashion_cnn", 113_386), ("dense", 101_770)]
)
def test_presets_shapes_and_keras_param_counts(name, params):
    state = make_state(name)
    assert fc.num_params(state.params) == params  # the Keras summaries' totals
    logits = fc.predict(state, random_batch(5)["image"])
    assert logits.shape == (5, 10) and logits.dtype == jnp.float32
    assert fc.models.get(name, num_classes=24).num_classes == 24


def test_train_step_is_pure_and_does_not_donate():
    state, batch = make_state(), random_batch()
    a, metrics_a = fc.train_step(state, batch)
    b, metrics_b = fc.train_step(state, batch)  # the first call must not consume `state`
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(metrics_a, metrics_b)
    assert int(a.step) == 1 and int(state.step) == 0


def test_loss_falls_on_a_fixed_batch():
    state, batch = make_state(), random_batch(64)
    first = None
    for _ in range(30):
        state, metrics = fc.train_step(state, batch)
        first = first if first is not None else fc.metrics.compute(metrics)["loss"]
    assert fc.metrics.compute(metrics)["loss"] < 0.8 * first


def test_eval_sums_are_equal_over_uneven_batch_splits():
    state, batch = make_state(), random_batch(50)
    whole = fc.eval_step(state, batch)
    total = None
    for lo, hi in [(0, 7), (7, 30), (30, 50)]:
        part = {k: v[lo:hi] for k, v in batch.items()}
        total = fc.add_metrics(total, fc.eval_step(state, part))
    chex.assert_trees_all_close(whole, total, rtol=1e-5)
    assert float(whole["count"]) == 50 and float(whole["confusion"].sum()) == 50


def test_masked_rows_count_nowhere():
    state, batch = make_state(), random_batch(16)
    padded = {k: np.concatenate([v, v[:4]]) for k, v in batch.items()}
    padded["mask"] = np.arange(20) < 16
    chex.assert_trees_all_close(fc.eval_step(state, batch), fc.eval_step(state, padded),
                                rtol=1e-5)
    a, _ = fc.train_step(state, batch)
    b, _ = fc.train_step(state, padded)
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-7)


def test_train_step_under_vmap_trains_k_models():
    keys = jax.random.split(jax.random.key(0), 3)
    model = fc.models.get("dlwp_mnist")
    tx = fc.optim.make("sgd", learning_rate=0.1)
    states = jax.vmap(lambda k: fc.create_train_state(k, model, tx, np.zeros((1, 28, 28, 1))))(
        keys
    )
    batch = random_batch(8)
    shared, metrics = jax.vmap(fc.train_step, in_axes=(0, None))(states, batch)
    assert metrics["loss_sum"].shape == (3,)
    batches = {k: np.stack([v] * 3) for k, v in batch.items()}
    per_member, _ = jax.vmap(fc.train_step, in_axes=(0, 0))(states, batches)
    chex.assert_trees_all_close(shared.params, per_member.params, rtol=1e-5, atol=1e-7)
    one = fc.create_train_state(keys[1], model, tx, np.zeros((1, 28, 28, 1)))
    one, _ = fc.train_step(one, batch)
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[1], shared.params), one.params, rtol=1e-5, atol=1e-6
    )


def test_train_step_under_scan_equals_a_python_loop():
    state = make_state()
    batches = [random_batch(16, seed=i) for i in range(3)]
    looped = state
    for batch in batches:
        looped, _ = fc.train_step(looped, batch)
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    scanned, metrics = jax.lax.scan(fc.train_step, state, stacked)
    chex.assert_trees_all_close(scanned.params, looped.params, rtol=1e-5, atol=1e-6)
    assert metrics["loss_sum"].shape == (3,) and int(scanned.step) == 3


def test_dropout_uses_the_step_rng_and_eval_is_deterministic():
    state, batch = make_state(dropout_rate=0.5), random_batch(16)
    a, _ = fc.train_step(state, batch)
    b, _ = fc.train_step(state, batch)
    chex.assert_trees_all_equal(a.params, b.params)  # same state -> same dropout mask
    np.testing.assert_array_equal(fc.predict(a, batch["image"]), fc.predict(a, batch["image"]))


def test_batch_norm_statistics_update_in_training_only():
    state, batch = make_state(batch_norm=True), random_batch(16)
    new, _ = fc.train_step(state, batch)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.batch_stats,
                         new.batch_stats)
    assert max(jax.tree.leaves(moved)) > 0
    fc.eval_step(new, batch)  # inference mode: no mutation needed


def test_wrong_image_shape_names_both_shapes():
    state = make_state()
    with pytest.raises(ValueError, match=r"\(8, 32, 32, 3\).*expected \('B', 28, 28, 1\)"):
        fc.train_step(state, {"image": np.zeros((8, 32, 32, 3), np.float32),
                              "label": np.zeros(8, np.int32)})


def test_wrong_dtypes_are_named():
    state = make_state()
    with pytest.raises(TypeError, match="int32.*expected uint8"):
        fc.eval_step(state, {"image": np.zeros((2, 28, 28, 1), np.int32),
                             "label": np.zeros(2, np.int32)})
    with pytest.raises(ValueError, match="float32.*expected integer class ids"):
        fc.eval_step(state, {"image": np.zeros((2, 28, 28, 1), np.float32),
                             "label": np.zeros(2, np.float32)})


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="dlwp_mnist"):
        fc.models.get("resnet9000")
    with pytest.raises(ValueError, match="rmsprop"):
        fc.optim.make("adagrad")
    with pytest.raises(ValueError, match="rho"):
        fc.optim.make("rmsprop", beta_1=0.9)
    with pytest.raises(ValueError, match="features"):
        fc.models.get("dense", widht=3)


def test_rmsprop_matches_keras_formula():
    """Keras: v = rho v + (1 - rho) g^2; w -= lr g / sqrt(v + eps)."""
    tx = fc.optim.make("rmsprop", learning_rate=0.01, rho=0.8, epsilon=1e-3)
    params = {"w": jnp.array([1.0, -2.0])}
    grads = [jnp.array([0.5, 0.1]), jnp.array([-0.2, 0.3])]
    opt_state, w, v = tx.init(params), np.array([1.0, -2.0]), np.zeros(2)
    for g in grads:
        updates, opt_state = tx.update({"w": g}, opt_state, params)
        params = optax.apply_updates(params, updates)
        v = 0.8 * v + 0.2 * np.asarray(g) ** 2
        w = w - 0.01 * np.asarray(g) / np.sqrt(v + 1e-3)
    np.testing.assert_allclose(params["w"], w, rtol=1e-6)


def test_sgd_momentum_nesterov_and_schedules():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.full(3, 2.0)}
    tx = fc.optim.make("sgd", learning_rate=0.1, momentum=0.9)
    state = tx.init(params)
    u1, state = tx.update(grads, state, params)
    u2, state = tx.update(grads, state, params)
    np.testing.assert_allclose(u1["w"], -0.2)
    np.testing.assert_allclose(u2["w"], -0.1 * (2.0 + 0.9 * 2.0), rtol=1e-6)
    nesterov = fc.optim.make("sgd", learning_rate=0.1, momentum=0.9, nesterov=True)
    u, _ = nesterov.update(grads, nesterov.init(params), params)
    np.testing.assert_allclose(u["w"], -0.1 * (2.0 + 0.9 * 2.0), rtol=1e-6)
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    tx = fc.optim.make("adam", learning_rate=schedule)
    state = tx.init(params)
    for _ in range(5):
        _, state = tx.update(grads, state, params)
    assert float(fc.optim.learning_rate(state)) == pytest.approx(0.6)
    state = fc.optim.set_learning_rate(fc.optim.make("adam", 1e-3).init(params), 1e-5)
    assert float(fc.optim.learning_rate(state)) == pytest.approx(1e-5)


def test_trim_leaves_inputs_whole_where_every_pixel_counts():
    assert fc.models.get("dlwp_mnist").used_input_size(30, 29) == (30, 26)
    assert fc.models.get("dlwp_mnist", batch_norm=True).used_input_size(28, 28) == (28, 28)
    assert fc.models.get("dlwp_mnist", padding="SAME").used_input_size(28, 28) == (28, 28)
    assert fc.models.get("dense").used_input_size(28, 28) == (28, 28)
    assert fc.models.get("dlwp_mnist").used_input_size(9, 9) == (9, 9)  # too small to pool



def test_out_of_range_labels_are_never_trained_on_silently():
    state = make_state()
    batch = {"image": random_batch(4)["image"], "label": np.array([0, 1, -1, 10], np.int32)}
    new, metrics = fc.train_step(state, batch)
    assert float(metrics["invalid_labels"]) == 2 and np.isnan(float(metrics["loss_sum"]))
    # -1 no longer trains as class 9: the valid rows alone give the update.
    valid = {"image": batch["image"][:2], "label": batch["label"][:2]}
    chex.assert_trees_all_close(new.params, fc.train_step(state, valid)[0].params, atol=1e-6)
    sums = fc.eval_step(state, batch)
    assert float(sums["invalid_labels"]) == 2 and float(sums["confusion"].sum()) == 2
    # Padding rows (mask False) are never counted, whatever their label.
    padded = {**batch, "mask": np.array([True, True, False, False])}
    metrics = fc.train_step(state, padded)[1]
    assert float(metrics["invalid_labels"]) == 0 and np.isfinite(float(metrics["loss_sum"]))


def test_batch_weight_is_keras_sample_weight_and_keeps_padding_masked():
    keras = pytest.importorskip("keras")
    state = make_state("dense", optimizer="sgd")  # no dropout: training logits = predict's
    batch = random_batch(16)
    weight = np.random.default_rng(1).uniform(0, 2, 16).astype(np.float32)
    # Three members, vmapped as populations run the step, each on the batch padded to 20
    # rows (weight 5 on the padding, which must count nowhere): Keras-like fractional
    # weights, weights 1, weights 0.5.
    members = [weight, np.ones(16, np.float32), np.full(16, 0.5, np.float32)]
    batches = {k: np.stack([np.concatenate([v, v[:4]])] * 3) for k, v in batch.items()}
    batches["mask"] = np.stack([np.arange(20) < 16] * 3)
    batches["weight"] = np.stack([np.concatenate([w, np.full(4, 5.0, np.float32)])
                                  for w in members])
    states = jax.tree.map(lambda x: jnp.stack([x] * 3), state)
    new, sums = jax.vmap(fc.train_step, in_axes=(0, 0))(states, batches)
    logits = np.asarray(fc.predict(state, batch["image"]))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = loss(batch["label"], logits, sample_weight=weight)
    assert float(sums["loss_sum"][0] / sums["count"][0]) == pytest.approx(float(expected),
                                                                          rel=1e-5)
    # The correct count stays unweighted (Keras's metrics=, not weighted_metrics=).
    np.testing.assert_array_equal(sums["count"], 16)
    np.testing.assert_array_equal(sums["correct"], np.sum(logits.argmax(1) == batch["label"]))
    # sum_over_batch_size: weights of 0.5 halve the step (a weighted mean would not).
    steps = jax.tree.map(lambda a, b: a - b[None], new.params, state.params)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[2], steps),
                                jax.tree.map(lambda x: 0.5 * x[1], steps), atol=1e-7)
    with pytest.raises(ValueError, match=r"batch\['weight'\] is float32\[3\]; expected .*\[16\]"):
        fc.train_step(state, {**batch, "weight": np.ones(3, np.float32)})


def test_initialization_compiles_without_backend_optimizations_and_gives_the_same_state():
    # The installed jaxlib must accept the options: if a release drops them, this fails
    # instead of initialization silently compiling ~1 s longer on CPU.
    from flaxconv import state as state_lib

    x = jnp.zeros((1, 28, 28, 1))
    model = fc.models.get("dlwp_mnist")
    init = lambda key: model.init({"params": key}, x, train=False)  # noqa: E731
    jax.jit(init, compiler_options=state_lib.INIT_COMPILER_OPTIONS).lower(
        jax.random.key(0)).compile()
    # Bit for bit the parameters of XLA's optimized program, so results do not move.
    state = fc.create_train_state(jax.random.key(3), model, fc.optim.make("rmsprop"), x)
    init_key = jax.random.split(jax.random.key(3))[0]
    plain = jax.jit(lambda key: model.init({"params": key, "dropout": key}, x, train=False))
    chex.assert_trees_all_equal(state.params, plain(init_key)["params"])
    chex.assert_trees_all_equal(state.opt_state, jax.jit(state.tx.init)(state.params))


def test_an_xla_that_refuses_the_init_options_compiles_as_usual(monkeypatch):
    from flaxconv import state as state_lib

    monkeypatch.setattr(state_lib, "INIT_COMPILER_OPTIONS", {"xla_no_such_option": 0})
    double = state_lib._jit_once(lambda x: 2 * x)
    np.testing.assert_array_equal(double(jnp.arange(3.0)), [0.0, 2.0, 4.0])
    failing = state_lib._jit_once(lambda x: x.reshape(7))  # the function's own error stays
    with pytest.raises(TypeError, match="reshape"):
        failing(jnp.arange(3.0))


KEEP_FREED_MEMORY = """
import resource
import flax.linen as nn
import jax, numpy as np
import flaxconv as fc
from flaxconv.cpu_memory import keep_freed_memory
print(keep_freed_memory())

class BNSame(nn.Module):  # the zoo's BatchNorm + SAME model: 39 MB of scratch at batch 64
    @nn.compact
    def __call__(self, x, *, train):
        for features in (32, 64):
            x = nn.BatchNorm(use_running_average=not train)(nn.Conv(features, (3, 3))(x))
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))

images = np.zeros((64, 28, 28, 1), np.uint8)
batch = jax.device_put({"image": images, "label": np.zeros(64, np.int32)})
state = fc.create_train_state(jax.random.key(0), BNSame(), fc.optim.make("adam"), images)
step = jax.jit(fc.train_step_fn, donate_argnums=0)
scratch = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
for _ in range(20):  # the heap grows to its working size
    state, _ = step(state, batch)
jax.block_until_ready(state)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    state, _ = step(state, batch)
jax.block_until_ready(state)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10, scratch / 4096)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_each_step_faulting_its_scratch_memory_in_again():
    # Without it, glibc maps each call's 39 MB scratch buffer afresh: about one page fault
    # per page of it (~10,000) every step, on jax 0.10.2 and 0.12 alike (measured); with it,
    # 0-2,000 once the heap has grown to its working size (the first few calls).
    child = subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY], capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    applied, faults, pages = child.stdout.split()
    assert applied == "True"
    assert float(pages) > 5000  # the scratch buffer is as large as the zoo's (39 MB)
    assert float(faults) < float(pages) / 2, (faults, pages)
