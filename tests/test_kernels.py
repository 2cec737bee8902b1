"""The kernel seam (flaxconv.kernels): each formulation against XLA's own operations, values
and gradients; the rewrite of any model's convolutions and pools, under jit, vmap and scan;
its fallbacks and opt-out; and that a hand-written module gets what the presets get."""

import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import flaxconv as fc
from flaxconv import kernels as K
from flaxconv.kernels import policy as kernel_policy
from flaxconv.kernels import seam as kernel_seam


def assert_close_to_scale(actual, expected, tol=2e-5):
    """float32 sums of many products in different orders: close relative to the scale."""
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True):
        scale = max(float(jnp.max(jnp.abs(a))), 1e-6)
        np.testing.assert_allclose(b, a, rtol=0, atol=tol * scale)


def values_and_grads(fn, *args):
    """``sum(sin(fn(*args)))``'s value, ``fn(*args)`` and the gradients in every argument."""

    def loss(*args):
        y = fn(*args)
        return jnp.sum(jnp.sin(y)), y

    return jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)(*args)


# --------------------------------------------------------------------------- formulations


@pytest.mark.parametrize("impl", ["im2col", "xla_nhwc", "winograd"])
@pytest.mark.parametrize("padding", ["VALID", "SAME", ((2, 0), (1, 2))])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize("shape", [(4, 28, 28, 1), (3, 13, 13, 32), (2, 5, 5, 64)])
def test_conv_formulations_match_xla_values_and_gradients(shape, strides, padding, impl):
    x = jax.random.normal(jax.random.key(1), shape)
    kernel = jax.random.normal(jax.random.key(2), (3, 3, shape[-1], 16)) * 0.1

    def loss(impl):
        def f(x, kernel):
            y = K.conv2d(x, kernel, strides, padding, formulation=impl)
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
            K.conv2d(x, kernel, padding=padding)


def test_max_pool_gradient_goes_to_the_first_maximum():
    x = jax.random.normal(jax.random.key(3), (2, 11, 9, 3))  # odd sizes: the floor crops

    def reference(x):  # JAX's own max gradient, the same where there are no ties
        n, _, _, c = x.shape
        return x[:, :10, :8].reshape(n, 5, 2, 4, 2, c).max(axis=(2, 4))

    y = K.max_pool(x)
    np.testing.assert_array_equal(y, reference(x))
    g = jax.grad(lambda x: jnp.sum(jnp.sin(K.max_pool(x))))(x)
    np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(jnp.sin(reference(x))))(x))
    assert not np.any(g[:, 10:]) and not np.any(g[:, :, 8:])
    ties = jax.grad(lambda x: K.max_pool(x, 3).sum())(jnp.ones((1, 6, 6, 1)))[0, :, :, 0]
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
    y = K.max_pool(jnp.asarray(x), window, relu=True)
    grad = jax.grad(lambda x: K.max_pool(x, window, relu=True).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(grad, expected_grad)
    np.testing.assert_array_equal(y, K.max_pool(jax.nn.relu(jnp.asarray(x)), window))


def _conv_relu_pool_by_layers(x, kernel, bias, padding):
    return K.max_pool(K.conv2d(x, kernel, padding=padding) + bias, relu=True)


@pytest.mark.parametrize("impl", ["winograd", "fused", "unfused"])
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
        lambda *a: K.conv_relu_pool(*a, padding=padding, formulation=impl))
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    for a, b in zip(expected_grads, grads, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(a))))


@pytest.mark.parametrize("impl", ["winograd", "fused"])
def test_conv_relu_pool_ties_send_the_gradient_to_the_first_maximum(impl):
    # A zero input: every position of every window ties at the bias.
    x, kernel = jnp.zeros((2, 8, 8, 16)), jax.random.normal(jax.random.key(0), (3, 3, 16, 4))
    bias = jnp.array([-1.0, 0.0, 0.5, 2.0])

    def grads(block):
        return jax.grad(lambda *a: jnp.sum(block(*a)), argnums=(0, 1, 2))(x, kernel, bias)

    expected = grads(lambda *a: _conv_relu_pool_by_layers(*a, "VALID"))
    got = grads(lambda *a: K.conv_relu_pool(*a, formulation=impl))
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
        K.conv_relu_pool(x[..., :3], kernel, bias)
    with pytest.raises(ValueError, match=r"expected \[N, H, W, 4\] and \(6,\)"):
        K.conv_relu_pool(x, kernel, bias[:5])
    for window in [0, 1.5]:
        with pytest.raises(ValueError, match=f"window={window}; expected a positive integer"):
            K.conv_relu_pool(x, kernel, bias, window=window)
        with pytest.raises(ValueError, match="expected a positive integer"):
            K.max_pool(x, window)


def test_winograd_runs_16_products_where_it_applies():
    def products(x_shape, kernel_shape, dtype=jnp.float32, **kwargs):
        x, kernel = jnp.zeros(x_shape, dtype), jnp.zeros(kernel_shape, dtype)
        block = functools.partial(K.conv_relu_pool, formulation="winograd", **kwargs)
        return _matmul_shapes(jax.make_jaxpr(block)(x, kernel, jnp.zeros(kernel_shape[-1])).jaxpr)

    # conv_1 of dlwp_mnist as trained: 5x5 tiles of 2x2 outputs, 16 [N*25, 32] @ [32, 64].
    assert products((64, 12, 12, 32), (3, 3, 32, 64)) == [(64 * 25, 64)] * 16
    # The first layer (9 * C_in <= C_out) runs the direct way, one patches matmul; other
    # windows and bfloat16 run the "fused" block, XLA's forward convolution (no matmul).
    assert products((64, 26, 26, 1), (3, 3, 1, 32)) == [(64, 24, 24, 32)]
    assert products((8, 12, 12, 32), (3, 3, 32, 64), window=3) == []
    assert products((8, 12, 12, 32), (3, 3, 32, 64), jnp.bfloat16) == []




# --------------------------------------------------------------------------- the rewrite


class OneConv(nn.Module):
    """One ``nn.Conv``, as a user writes it."""

    features: int
    kernel: int
    strides: int
    padding: object
    use_bias: bool

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.features, (self.kernel, self.kernel), self.strides,
                       padding=self.padding, use_bias=self.use_bias)(x)


def rewritten_and_plain(model, x, policy="cpu"):
    variables = model.init(jax.random.key(0), x)
    plain = lambda v, x: model.apply(v, x)  # noqa: E731
    return variables, plain, K.rewrite(plain, policy)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("padding", ["VALID", "SAME", ((2, 1), (0, 1))])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("kernel, channels", [(1, 8), (3, 1), (3, 8), (3, 32), (5, 4)])
def test_every_covered_convolution_matches_xla_values_and_gradients(
        kernel, channels, strides, padding, use_bias):
    x = jax.random.normal(jax.random.key(1), (2, 11, 10, channels))
    model = OneConv(12, kernel, strides, padding, use_bias)
    variables, plain, fast = rewritten_and_plain(model, x)
    choices = K.explain(plain, variables, x, policy="cpu")
    assert len(choices) == 1 and not choices[0].fallback, choices
    (_, expected), expected_grads = values_and_grads(plain, variables, x)
    (_, y), grads = values_and_grads(fast, variables, x)
    assert_close_to_scale(y, expected)
    assert_close_to_scale(grads, expected_grads)


class ConvNet(nn.Module):
    """A hand-written convnet: conv -> relu -> pool blocks (max and average, relu before and
    after the pool), a strided SAME conv, BatchNorm, dropout, a dense head."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.max_pool(nn.relu(nn.Conv(8, (3, 3), padding="VALID")(x)), (2, 2), (2, 2))
        x = nn.relu(nn.max_pool(nn.Conv(16, (3, 3), padding="SAME")(x), (2, 2), (2, 2)))
        x = nn.Conv(16, (3, 3), strides=2, padding="SAME", use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.Dropout(0.3, deterministic=not train)(x.reshape(x.shape[0], -1))
        return nn.Dense(10)(x)


def convnet_loss(model, variables, x, rngs):
    out, updates = model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(out)), updates


def test_a_hand_written_convnet_gets_fast_formulations_and_xlas_values():
    model, x = ConvNet(), jax.random.normal(jax.random.key(1), (4, 26, 26, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    rngs = {"dropout": jax.random.key(2)}
    loss = functools.partial(convnet_loss, model)
    choices = K.explain(loss, variables, x, rngs, policy="cpu")
    formulations = [c.formulation for c in choices]
    assert formulations[0].startswith("winograd (+ bias, relu, max_pool 2x2)"), formulations
    assert formulations[1].endswith("(+ bias, relu, max_pool 2x2)"), formulations
    assert formulations[2:] == ["im2col", "reshape-sum"], formulations
    grad = jax.grad(loss, has_aux=True)
    expected = jax.jit(grad)(variables, x, rngs)
    got = jax.jit(jax.grad(K.rewrite(loss, "cpu"), has_aux=True))(variables, x, rngs)
    assert_close_to_scale(got[0], expected[0])
    assert_close_to_scale(got[1], expected[1])


def test_the_rewrite_holds_under_vmap_and_inside_scan():
    model, x = ConvNet(), jax.random.normal(jax.random.key(1), (4, 14, 14, 3))
    members = jax.vmap(lambda k: model.init(k, x, train=False))(jax.random.split(
        jax.random.key(0), 2))
    rngs = {"dropout": jax.random.key(2)}

    def grads(loss):
        # Three members on one batch (a population), then a scan of two SGD steps each.
        def step(variables, _):
            g, updates = jax.grad(loss, has_aux=True)(variables, x, rngs)
            params = jax.tree.map(lambda p, d: p - 0.1 * d, variables["params"], g["params"])
            return {"params": params, **updates}, g["params"]

        return jax.jit(jax.vmap(lambda v: lax.scan(step, v, None, length=2)))(members)

    plain = functools.partial(convnet_loss, model)
    assert_close_to_scale(grads(K.rewrite(plain, "cpu")), grads(plain), tol=1e-4)
    # Per-example gradients: vmapped over the examples, the parameters shared.
    single = jax.tree.map(lambda a: a[0], members)

    def per_example(loss):
        return jax.vmap(lambda xi: jax.grad(lambda v: loss(v, xi[None], rngs)[0])(single))(x)

    assert_close_to_scale(per_example(K.rewrite(plain, "cpu")), per_example(plain))


def test_plain_jax_functions_are_rewritten_too():
    x = jax.random.normal(jax.random.key(1), (2, 12, 12, 4))
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 4, 8))

    def f(x, kernel):
        y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return lax.reduce_window(jax.nn.relu(y), -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                 "VALID")

    choices = K.explain(f, x, kernel, policy="cpu")
    assert [c.formulation for c in choices] == ["winograd (relu, max_pool 2x2)"]
    assert_close_to_scale(values_and_grads(K.rewrite(f, "cpu"), x, kernel),
                          values_and_grads(f, x, kernel))


def _precisions(jaxpr) -> list:
    """The ``precision`` of every dot_general and conv_general_dilated in ``jaxpr`` and the
    jaxprs inside it (custom VJPs' rules included, once they are traced)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append(eqn.params["precision"])
        for param in eqn.params.values():
            for item in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    found += _precisions(inner)
    return found


class PreciseConvNet(nn.Module):
    """Every covered kind of layer with ``precision=HIGHEST``: a first layer's fused block
    (one patches matmul), a Winograd block, a fused block around XLA's convolution, a
    strided im2col, a lone Winograd."""

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, precision=lax.Precision.HIGHEST)
        x = nn.max_pool(nn.relu(conv(32, (3, 3), padding="VALID")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(conv(32, (3, 3), padding="VALID")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(conv(16, (5, 5), padding="SAME")(x)), (2, 2), (2, 2))
        x = conv(32, (3, 3), strides=2, padding="SAME")(x)
        return conv(32, (3, 3), padding="SAME")(jnp.tile(x, (1, 8, 8, 1)))


def test_a_convolutions_precision_is_kept_by_every_formulation_forward_and_backward():
    model, x = PreciseConvNet(), jax.random.normal(jax.random.key(1), (2, 62, 62, 1))
    variables, plain, fast = rewritten_and_plain(model, x)
    formulations = [c.formulation for c in K.explain(plain, variables, x, policy="cpu")]
    assert formulations == ["fused (+ bias, relu, max_pool 2x2)",
                            "winograd (+ bias, relu, max_pool 2x2)",
                            "fused (+ bias, relu, max_pool 2x2)", "im2col", "winograd"]
    assert "precision highest" in K.explain(plain, variables, x, policy="cpu")[0].op
    highest = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
    grad_jaxpr = jax.make_jaxpr(lambda v, x: values_and_grads(fast, v, x))(variables, x)
    precisions = _precisions(grad_jaxpr.jaxpr)
    assert len(precisions) > 30 and set(precisions) == {highest}, set(precisions)
    assert_close_to_scale(values_and_grads(fast, variables, x),
                          values_and_grads(plain, variables, x))


def test_a_default_precision_context_reaches_the_formulations():
    model, x = ConvNet(), jax.random.normal(jax.random.key(1), (4, 26, 26, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    rngs = {"dropout": jax.random.key(2)}
    loss = functools.partial(convnet_loss, model)
    with jax.default_matmul_precision("highest"):
        choices = K.explain(loss, variables, x, rngs, policy="cpu")
        grads = jax.make_jaxpr(jax.grad(K.rewrite(loss, "cpu"), has_aux=True))(
            variables, x, rngs)
    assert not any(c.fallback for c in choices), choices
    highest = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
    assert set(_precisions(grads.jaxpr)) == {highest}


def test_two_different_operand_precisions_stay_with_xla():
    def f(x, kernel):
        return lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=(lax.Precision.HIGHEST, lax.Precision.DEFAULT))

    x, kernel = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 4, 8))
    (choice,) = K.explain(f, x, kernel, policy="cpu")
    assert choice.fallback and "precision" in choice.formulation, choice
    np.testing.assert_allclose(K.rewrite(f, "cpu")(x, kernel), f(x, kernel))
    with pytest.raises(ValueError, match="precision='float64'; expected None or one of"):
        K.conv2d(x, kernel, formulation="im2col", precision="float64")


class Uncovered(nn.Module):
    """Layers the seam leaves to XLA: grouped and dilated convolutions, an overlapping
    padded pool, a convolution inside ``nn.scan``-like control flow (``lax.cond``)."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(8, (3, 3), feature_group_count=2, padding="SAME")(x)
        x = nn.Conv(8, (3, 3), kernel_dilation=2, padding="SAME")(x)
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        conv = nn.Conv(8, (3, 3), padding="SAME")
        x = conv(x)  # binds the parameters; the cond below reuses them
        x = lax.cond(x.sum() > 0, lambda y: y * 2, lambda y: y, x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_what_the_seam_does_not_cover_runs_as_xla_and_trains():
    state = fc.create_train_state(jax.random.key(0), Uncovered(), fc.optim.make("adam", 1e-2),
                                  np.zeros((1, 12, 12, 4)))
    choices = fc.steps.explain_kernels(state, np.zeros((8, 12, 12, 4), np.uint8))
    reasons = [c.formulation for c in choices]
    assert reasons[:3] == ["xla (grouped convolution)", "xla (dilated convolution)",
                           "xla (overlapping, padded or dilated window)"], reasons
    batch = {"image": np.random.default_rng(0).integers(0, 256, (8, 12, 12, 4), np.uint8),
             "label": np.arange(8) % 10}
    first = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the seam neither warns nor fails here
        for _ in range(20):
            state, metrics = fc.train_step(state, batch)
            first = first or fc.metrics.compute(metrics)["loss"]
    assert fc.metrics.compute(metrics)["loss"] < 0.5 * first
    xla = state.replace(kernels="xla")
    np.testing.assert_allclose(fc.predict(state, batch["image"]),
                               fc.predict(xla, batch["image"]), rtol=1e-5, atol=1e-5)


def test_a_failing_rewrite_warns_once_and_runs_the_model_as_written(monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug in the seam")

    monkeypatch.setattr(kernel_seam, "_plan", broken)
    monkeypatch.setattr(kernel_seam, "_warned", set())
    state = fc.create_train_state(jax.random.key(0), fc.models.get("dlwp_mnist"),
                                  fc.optim.make("rmsprop"), np.zeros((1, 28, 28, 1)))
    images = np.zeros((2, 28, 28, 1), np.uint8)
    with pytest.warns(RuntimeWarning, match="could not rewrite .* a bug in the seam"):
        logits = fc.predict_fn(state, images)
    np.testing.assert_allclose(logits, fc.predict(state.replace(kernels="xla"), images),
                               rtol=1e-6)
    # A model that fails by itself fails with its own error, not the seam's.
    with pytest.raises(ValueError, match="expected"):
        fc.predict(state, np.zeros((2, 28, 28, 3), np.uint8))


def test_the_opt_out_and_bad_policy_names(monkeypatch):
    model, x = fc.models.get("dlwp_mnist"), np.zeros((1, 28, 28, 1))
    state = fc.create_train_state(jax.random.key(0), model, fc.optim.make("rmsprop"), x)
    assert state.kernels == "auto"
    xla = state.replace(kernels="xla")
    assert all(c.formulation == "xla (kernels='xla')"
               for c in fc.steps.explain_kernels(xla, x))
    monkeypatch.setenv(K.ENV_VAR, "xla")
    assert fc.create_train_state(jax.random.key(0), model, fc.optim.make("sgd"), x).kernels == "xla"
    monkeypatch.setenv(K.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="FLAXCONV_KERNELS='fast'; expected one of"):
        fc.create_train_state(jax.random.key(0), model, fc.optim.make("sgd"), x)
    with pytest.raises(ValueError, match="kernels='fft'; expected one of"):
        fc.create_train_state(jax.random.key(0), model, fc.optim.make("sgd"), x, kernels="fft")


def test_the_policy_per_backend_and_jaxlib_version():
    assert kernel_policy.resolve("auto", "tpu") is kernel_policy.XLA
    assert kernel_policy.resolve("auto", "gpu").name == "gpu"
    old, new = kernel_policy.cpu_policy((0, 10)), kernel_policy.cpu_policy((0, 12))
    valid = ((0, 0), (0, 0))
    conv_2 = kernel_policy.ConvSpec((3, 3, 64, 128), (1, 1), valid, jnp.float32, (3, 3))
    conv_1 = kernel_policy.ConvSpec((3, 3, 32, 64), (1, 1), valid, jnp.float32, (10, 10))
    same = kernel_policy.ConvSpec((3, 3, 32, 32), (1, 1), ((1, 1), (1, 1)), jnp.float32,
                                  (16, 16))
    # jaxlib 0.10's XLA:CPU convolutions (YNNPACK) lose to im2col on small maps; 0.11+'s win.
    assert (old.conv(conv_2), new.conv(conv_2)) == ("im2col", "xla_nhwc")
    # 32+ channels on a map of 64+ positions: Winograd; 16 channels: its transformed input
    # costs more than it saves.
    assert old.conv(same) == new.conv(same) == "winograd"
    narrow = kernel_policy.ConvSpec((3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)), jnp.float32,
                                    (32, 32))
    assert old.conv(narrow) == new.conv(narrow) == "xla_nhwc"
    assert old.block(conv_1, 2) == new.block(conv_1, 2) == "winograd"
    strided = kernel_policy.ConvSpec((3, 3, 64, 128), (2, 2), valid, jnp.float32, (2, 2))
    assert new.conv(strided) == "im2col"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU table")
def test_a_plain_jit_of_the_public_step_runs_winograd():
    # No compiler option, no special jit: fc.train_step_fn traced anywhere has conv_1's 16
    # Winograd products [64 * 25, 32] @ [32, 64] (forward), as fit's step has.
    state = fc.create_train_state(jax.random.key(0), fc.models.get("dlwp_mnist"),
                                  fc.optim.make("rmsprop"), np.zeros((1, 28, 28, 1)))
    batch = {"image": np.zeros((64, 28, 28, 1), np.uint8), "label": np.zeros(64, np.int32)}
    products = _matmul_shapes(jax.make_jaxpr(fc.train_step_fn)(state, batch).jaxpr)
    assert products.count((64 * 25, 64)) == 16
    xla = _matmul_shapes(jax.make_jaxpr(fc.train_step_fn)(state.replace(kernels="xla"),
                                                          batch).jaxpr)
    assert (64 * 25, 64) not in xla


@pytest.mark.parametrize("name", ["dlwp_mnist", "fashion_cnn"])
def test_presets_train_trimmed_through_the_seam_with_the_untrimmed_gradients(name):
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1)),
                         jnp.float32) / 255
    trimmed = fc.models.get(name)
    full = fc.models.get(name, trim=False)
    assert trimmed.used_input_size(28, 28) == (26, 26)  # conv_1's 11x11 map pools to 5x5
    variables = full.init(jax.random.key(0), images, train=False)

    def logits_and_gradients(model, policy):
        forward = K.rewrite(lambda p: model.apply({"params": p}, images, train=True), policy)
        return forward(variables["params"]), jax.grad(lambda p: jnp.sum(jnp.sin(forward(p))))(
            variables["params"])

    assert_close_to_scale(jax.jit(lambda: logits_and_gradients(trimmed, "cpu"))(),
                          logits_and_gradients(full, "xla"), tol=5e-5)


class HandWrittenDLWP(nn.Module):
    """Deep Learning with Python's MNIST convnet, written with plain Flax layers."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Conv(128, (3, 3), padding="VALID")(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_a_hand_written_module_runs_what_the_preset_runs():
    x = np.zeros((64, 28, 28, 1), np.uint8)
    tx = fc.optim.make("rmsprop")
    preset = fc.create_train_state(jax.random.key(0), fc.models.get("dlwp_mnist"), tx, x[:1])
    hand = fc.create_train_state(jax.random.key(0), HandWrittenDLWP(), tx, x[:1])
    for train in (True, False):
        formulations = [[c.formulation for c in fc.steps.explain_kernels(s, x, train)]
                        for s in (preset, hand)]
        assert formulations[0] == formulations[1], formulations
    assert fc.num_params(preset.params) == fc.num_params(hand.params) == 104_202


def test_fit_runs_the_public_train_step():
    # fc.fit's array path (a scan of train_step_fn over the epoch) against a Python loop of
    # fc.train_step over the same batches: the same step, the same parameters.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (96, 28, 28, 1), np.uint8)
    labels = rng.integers(0, 10, 96).astype(np.int32)
    state = fc.create_train_state(jax.random.key(0), HandWrittenDLWP(),
                                  fc.optim.make("rmsprop"), images[:1])
    plan = fc.epochs.epoch_plan(96, 32)
    indices = plan.indices(None)
    scanned, _ = jax.jit(fc.epochs.train_epoch_fn)(state, jnp.asarray(images),
                                                   jnp.asarray(labels), indices, plan.mask)
    looped = state
    for idx in np.asarray(indices):
        looped, _ = fc.train_step(looped, {"image": images[idx], "label": labels[idx]})
    chex.assert_trees_all_close(scanned.params, looped.params, atol=1e-6, rtol=1e-5)


def test_presets_keep_their_parameter_names_and_shapes():
    # Checkpoints written before the presets became plain Flax modules still load.
    state = fc.create_train_state(jax.random.key(0), fc.models.get("dlwp_mnist"),
                                  fc.optim.make("rmsprop"), np.zeros((1, 28, 28, 1)))
    shapes = {jax.tree_util.keystr(path): leaf.shape
              for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    assert shapes == {
        "['conv_0']['bias']": (32,), "['conv_0']['kernel']": (3, 3, 1, 32),
        "['conv_1']['bias']": (64,), "['conv_1']['kernel']": (3, 3, 32, 64),
        "['conv_2']['bias']": (128,), "['conv_2']['kernel']": (3, 3, 64, 128),
        "['head']['bias']": (10,), "['head']['kernel']": (1152, 10),
    }


def test_a_formulation_change_resumes_the_same_workdir(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 256, (64, 28, 28, 1), np.uint8), rng.integers(0, 10, 64))
    def new_state(kernels):  # fit donates the state it is given
        return fc.create_train_state(jax.random.key(0), HandWrittenDLWP(),
                                     fc.optim.make("rmsprop"), data[0][:1], kernels=kernels)

    fc.fit(new_state("auto"), data, epochs=1, batch_size=32, workdir=str(tmp_path), verbose=0)
    resumed, history = fc.fit(new_state("xla"), data, epochs=2, batch_size=32,
                              workdir=str(tmp_path), verbose=0)
    assert int(resumed.step) == 4 and len(history["loss"]) == 2


def test_the_models_do_not_import_the_kernels():
    # The seam is deletable without touching a model: no module of flaxconv.models imports it.
    import ast
    import pathlib

    for path in pathlib.Path(fc.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not any("kernels" in name for name in names), (path.name, names)
