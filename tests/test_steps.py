"""The public step functions: purity, learning, exact metric sums, vmap/scan, bad input."""

import functools
import re

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
        first = first if first is not None else fc.summarize(metrics)["loss"]
    assert fc.summarize(metrics)["loss"] < 0.8 * first


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


@pytest.mark.parametrize("impl", ["im2col", "xla_nhwc"])
@pytest.mark.parametrize("padding", ["VALID", "SAME", ((2, 0), (1, 2))])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize("shape", [(4, 28, 28, 1), (3, 13, 13, 32), (2, 5, 5, 64)])
def test_conv_formulations_match_xla_values_and_gradients(shape, strides, padding, impl):
    x = jax.random.normal(jax.random.key(1), shape)
    kernel = jax.random.normal(jax.random.key(2), (3, 3, shape[-1], 16)) * 0.1

    def loss(impl):
        def f(x, kernel):
            y = fc.models.conv2d(x, kernel, strides, padding, impl=impl)
            return jnp.sum(jnp.sin(y)), y
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, kernel)

    (value_a, y_a), grads_a = loss("xla")
    (value_b, y_b), grads_b = loss(impl)
    np.testing.assert_allclose(y_a, y_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        # float32 sums of up to N*H*W products in different orders: relative to the scale.
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(a))))


def test_conv_rejects_bad_padding():
    x, kernel = jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 4))
    for padding in ["FULL", ((1, 1),), ((1, -1), (0, 0))]:
        with pytest.raises(ValueError, match="padding="):
            fc.models.conv2d(x, kernel, padding=padding)


def test_max_pool_gradient_goes_to_the_first_maximum():
    x = jax.random.normal(jax.random.key(3), (2, 11, 9, 3))  # odd sizes: the floor crops

    def reference(x):  # JAX's own max gradient, the same where there are no ties
        n, _, _, c = x.shape
        return x[:, :10, :8].reshape(n, 5, 2, 4, 2, c).max(axis=(2, 4))

    y = fc.models.max_pool(x)
    np.testing.assert_array_equal(y, reference(x))
    g = jax.grad(lambda x: jnp.sum(jnp.sin(fc.models.max_pool(x))))(x)
    np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(jnp.sin(reference(x))))(x))
    assert not np.any(g[:, 10:]) and not np.any(g[:, :, 8:])
    ties = jax.grad(lambda x: fc.models.max_pool(x, 3).sum())(jnp.ones((1, 6, 6, 1)))[0, :, :, 0]
    expected = np.zeros((6, 6))
    expected[::3, ::3] = 1  # TensorFlow's MaxPool gradient: the first maximum in row order
    np.testing.assert_array_equal(ties, expected)


def _pool_of_relu_by_loops(x, window):
    """TensorFlow's relu -> MaxPool, values and the gradient of their sum, window by window."""
    n, h, w, c = x.shape
    y = np.zeros((n, h // window, w // window, c), np.float32)
    grad = np.zeros_like(x)
    for b, i, j, ch in np.ndindex(y.shape):
        block = np.maximum(x[b, i * window:(i + 1) * window, j * window:(j + 1) * window, ch], 0)
        first = int(np.argmax(block))  # the first maximum in row-major order
        r, s = i * window + first // window, j * window + first % window
        y[b, i, j, ch] = block.flat[first]
        grad[b, r, s, ch] = float(x[b, r, s, ch] > 0)  # relu's gradient at 0 is 0
    return y, grad


@pytest.mark.parametrize("shape, window", [((2, 7, 9, 3), 2), ((2, 6, 6, 2), 3)])
def test_max_pool_with_relu_is_pool_of_relu_with_tensorflows_gradient(shape, window):
    # Rounded to 0.5: many ties, zeros and all-negative windows.
    x = np.round(2 * np.random.default_rng(0).normal(size=shape)).astype(np.float32) / 2
    expected_y, expected_grad = _pool_of_relu_by_loops(x, window)
    y = fc.models.max_pool(jnp.asarray(x), window, relu=True)
    grad = jax.grad(lambda x: fc.models.max_pool(x, window, relu=True).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(grad, expected_grad)
    np.testing.assert_array_equal(y, fc.models.max_pool(jax.nn.relu(jnp.asarray(x)), window))


def _conv_relu_pool_by_layers(x, kernel, bias, padding):
    return fc.models.max_pool(fc.models.conv2d(x, kernel, padding=padding, impl="xla") + bias,
                              relu=True)


@pytest.mark.parametrize("impl", ["winograd", "xla_nhwc", "im2col"])
@pytest.mark.parametrize("shape, padding", [
    ((4, 12, 12, 32), "VALID"),    # dlwp_mnist's conv_1 as trained
    ((3, 13, 11, 16), "VALID"),    # odd maps: the pool's floor drops a row and a column
    ((2, 9, 10, 24), "SAME"),
    ((2, 5, 6, 16), ((1, 0), (2, 1))),
    ((2, 4, 4, 16), "VALID"),      # a single 2x2 tile
    ((4, 26, 26, 1), "VALID"),     # few input channels (conv_0): the direct block
])
def test_conv_relu_pool_matches_its_layers_values_and_gradients(shape, padding, impl):
    x = jax.random.normal(jax.random.key(1), shape)
    kernel = jax.random.normal(jax.random.key(2), (3, 3, shape[-1], 20)) * 0.2
    bias = jnp.linspace(-0.3, 0.3, 20)

    def value_and_grads(block):
        def loss(*args):
            y = block(*args)
            return jnp.sum(jnp.sin(y)), y
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, kernel, bias)

    (_, expected), expected_grads = value_and_grads(
        lambda *a: _conv_relu_pool_by_layers(*a, padding))
    (_, y), grads = value_and_grads(
        lambda *a: fc.models.conv_relu_pool(*a, padding=padding, impl=impl))
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    for a, b in zip(expected_grads, grads, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(a))))


@pytest.mark.parametrize("impl", ["winograd", "xla_nhwc"])
def test_conv_relu_pool_ties_send_the_gradient_to_the_first_maximum(impl):
    # A zero input: every position of every window ties at the bias.
    x, kernel = jnp.zeros((2, 8, 8, 16)), jax.random.normal(jax.random.key(0), (3, 3, 16, 4))
    bias = jnp.array([-1.0, 0.0, 0.5, 2.0])

    def grads(block):
        return jax.grad(lambda *a: jnp.sum(block(*a)), argnums=(0, 1, 2))(x, kernel, bias)

    expected = grads(lambda *a: _conv_relu_pool_by_layers(*a, "VALID"))
    got = grads(lambda *a: fc.models.conv_relu_pool(*a, impl=impl))
    np.testing.assert_array_equal(got[2], [0, 0, 2 * 3 * 3, 2 * 3 * 3])  # relu'(0) = 0
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def _matmul_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of the dot_generals in ``jaxpr`` and the jaxprs inside it."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(eqn.outvars[0].aval.shape)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                shapes += _matmul_shapes(inner)
    return shapes


def test_conv_relu_pool_rejects_what_does_not_fit():
    x, kernel, bias = jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 4, 6)), jnp.zeros(6)
    with pytest.raises(ValueError, match=r"expected \[N, H, W, 4\] and \(6,\)"):
        fc.models.conv_relu_pool(x[..., :3], kernel, bias)
    with pytest.raises(ValueError, match=r"expected \[N, H, W, 4\] and \(6,\)"):
        fc.models.conv_relu_pool(x, kernel, bias[:5])
    for window in [0, 1.5]:
        with pytest.raises(ValueError, match=f"window={window}; expected a positive integer"):
            fc.models.conv_relu_pool(x, kernel, bias, window=window)
        with pytest.raises(ValueError, match="expected a positive integer"):
            fc.models.max_pool(x, window)
    with pytest.raises(ValueError, match="relu_pool needs strides"):
        fc.models.Conv(6, strides=(2, 2)).init(jax.random.key(0), x, relu_pool=2)


def test_winograd_runs_16_products_where_it_applies():
    def products(x_shape, kernel_shape, dtype=jnp.float32, **kwargs):
        x, kernel = jnp.zeros(x_shape, dtype), jnp.zeros(kernel_shape, dtype)
        block = functools.partial(fc.models.conv_relu_pool, impl="winograd", **kwargs)
        return _matmul_shapes(jax.make_jaxpr(block)(x, kernel, jnp.zeros(kernel_shape[-1])).jaxpr)

    # conv_1 of dlwp_mnist as trained: 5x5 tiles of 2x2 outputs, 16 [N*25, 32] @ [32, 64].
    assert products((64, 12, 12, 32), (3, 3, 32, 64)) == [(64 * 25, 64)] * 16
    # The first layer (9 * C_in <= C_out), other windows and bfloat16 run the direct way, one
    # patches matmul each (outside tuned_jit a lone convolution is im2col).
    assert products((64, 26, 26, 1), (3, 3, 1, 32)) == [(64, 24, 24, 32)]
    assert products((8, 12, 12, 32), (3, 3, 32, 64), window=3) == [(8, 10, 10, 64)]
    assert products((8, 12, 12, 32), (3, 3, 32, 64), jnp.bfloat16) == [(8, 10, 10, 64)]


@pytest.mark.parametrize("conv_impl", ["auto", "winograd", "xla_nhwc"])
@pytest.mark.parametrize("name", ["dlwp_mnist", "fashion_cnn"])
def test_trimmed_training_pass_has_the_untrimmed_logits_and_gradients(name, conv_impl):
    # The training pass (trimmed, each conv -> relu -> pool one block) against the layers
    # one by one on the whole input, with XLA's convolution.
    images = jnp.asarray(random_batch(8)["image"], jnp.float32) / 255
    trimmed = fc.models.get(name, conv_impl=conv_impl)
    full = fc.models.get(name, trim=False, conv_impl="xla")
    assert trimmed.used_input_size(28, 28) == (26, 26)  # conv_1's 11x11 map pools to 5x5
    variables = full.init(jax.random.key(0), images, train=False)

    def logits_and_gradients(model, train):
        def loss(params):
            return jnp.sum(jnp.sin(model.apply({"params": params}, images, train=train)))

        return model.apply(variables, images, train=train), jax.grad(loss)(variables["params"])

    chex.assert_trees_all_close(
        fc.models.tuned_jit(lambda: logits_and_gradients(trimmed, True))(),
        logits_and_gradients(full, False), atol=2e-5, rtol=2e-5
    )


def test_trim_leaves_inputs_whole_where_every_pixel_counts():
    assert fc.models.get("dlwp_mnist").used_input_size(30, 29) == (30, 26)
    assert fc.models.get("dlwp_mnist", batch_norm=True).used_input_size(28, 28) == (28, 28)
    assert fc.models.get("dlwp_mnist", padding="SAME").used_input_size(28, 28) == (28, 28)
    assert fc.models.get("dense").used_input_size(28, 28) == (28, 28)
    assert fc.models.get("dlwp_mnist").used_input_size(9, 9) == (9, 9)  # too small to pool


def test_conv_impls_share_parameters_and_auto_resolves_per_backend():
    state = make_state(conv_impl="xla")
    images = random_batch(4)["image"]
    for impl in ["im2col", "xla_nhwc", "winograd"]:
        other = state.replace(model=fc.models.get("dlwp_mnist", conv_impl=impl))
        np.testing.assert_allclose(fc.predict(state, images), fc.predict(other, images),
                                   rtol=1e-5, atol=1e-5)
    assert fc.models.resolve_conv_impl("auto", "cpu") == "winograd"
    assert fc.models.resolve_conv_impl("auto", "cpu", vmapped=True) == "im2col"
    assert fc.models.resolve_conv_impl("auto", "gpu") == "im2col"
    assert fc.models.resolve_conv_impl("auto", "tpu") == "xla"
    with pytest.raises(ValueError, match="conv_impl='fft'"):
        fc.models.resolve_conv_impl("fft")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's convolution choice")
def test_auto_uses_eigen_convolutions_inside_tuned_jit_and_im2col_elsewhere():
    state, batch = make_state(), random_batch(8)  # conv_impl="auto"
    plain = jax.jit(fc.train_step_fn).lower(state, batch).compile().as_text()
    tuned = fc.models.tuned_jit(fc.train_step_fn).lower(state, batch).compile().as_text()
    assert "convolution(" not in plain  # im2col: slices and matmuls only
    if not fc.models.COMPILER_OPTIONS:
        assert "convolution(" not in tuned
        return
    assert "convolution(" in tuned

    def ynn_convolutions(hlo):
        # The computations holding a convolution, and the YNNPACK fusions that call them.
        blocks = [b.strip() for b in hlo.split("\n\n")]
        with_conv = {b.split()[0] for b in blocks if "convolution(" in b}
        return [line for line in hlo.splitlines() if "__ynn_fusion" in line
                and set(re.findall(r"calls=(%[\w.-]+)", line)) & with_conv]

    # xla_nhwc is fast only while XLA:CPU honours COMPILER_OPTIONS; a jaxlib that drops or
    # renames the option should fail here rather than silently run 2x slower.
    assert not ynn_convolutions(tuned)
    nhwc = state.replace(model=fc.models.get("dlwp_mnist", conv_impl="xla_nhwc"))
    assert ynn_convolutions(jax.jit(fc.train_step_fn).lower(nhwc, batch).compile().as_text())
    # A tuned jit is a top-level jit; the public steps stay composable inside others.
    jax.jit(lambda s, b: fc.train_step(s, b))(state, batch)
