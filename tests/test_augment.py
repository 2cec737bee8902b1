"""Tests for flaxconv.augment: the pure transforms, the Keras-style layers, and their place
in the model (active in train_step only; never in eval_step or predict); dropout wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxconv as fc
from flaxconv import augment as A


def _images(n=8, h=12, w=10, c=1, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((n, h, w, c), np.float32))


RANDOM_OPS = {
    "rotation": lambda k, x: A.random_rotation(k, x, 0.1),
    "translation": lambda k, x: A.random_translation(k, x, 0.2, 0.2),
    "zoom": lambda k, x: A.random_zoom(k, x, 0.3),
    "zoom_xy": lambda k, x: A.random_zoom(k, x, 0.3, (-0.2, 0.1)),
    "flip": lambda k, x: A.random_flip(k, x, "horizontal_and_vertical"),
    "crop": lambda k, x: A.random_crop(k, x, 7, 6),
}


@pytest.mark.parametrize("name", list(RANDOM_OPS))
def test_random_ops_are_deterministic_per_key_and_differ_per_example(name):
    op = jax.jit(RANDOM_OPS[name])
    # Eight copies of one image: any difference between rows comes from per-example draws.
    x = jnp.repeat(_images(1), 8, axis=0)
    a, b = op(jax.random.key(1), x), op(jax.random.key(1), x)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, op(jax.random.key(2), x))
    distinct = {np.asarray(row).tobytes() for row in a}
    assert len(distinct) >= 3, f"{name}: only {len(distinct)} distinct transforms in 8 rows"
    assert a.dtype == x.dtype


@pytest.mark.parametrize("fill_mode", ["reflect", "nearest", "wrap", "constant"])
def test_bilinear_resampling_stays_in_the_input_range(fill_mode):
    x = _images(16) * 0.5 + 0.25  # values in [0.25, 0.75]; constant fill 0.25
    key = jax.random.key(0)
    for y in (
        A.random_rotation(key, x, 0.5, fill_mode=fill_mode, fill_value=0.25),
        A.random_translation(key, x, 0.3, 0.3, fill_mode=fill_mode, fill_value=0.25),
        A.random_zoom(key, x, 0.5, fill_mode=fill_mode, fill_value=0.25),
    ):
        assert y.shape == x.shape
        assert float(y.min()) >= 0.25 - 1e-6 and float(y.max()) <= 0.75 + 1e-6


def test_directions_follow_keras():
    x = jnp.zeros((1, 9, 9, 1)).at[0, 0, 4, 0].set(1.0)  # a dot at the top center
    turned = A.rotate(x, jnp.array([jnp.pi / 2]), fill_mode="constant")  # counter-clockwise
    assert np.argwhere(np.asarray(turned[0, ..., 0]) > 0.5).tolist() == [[4, 0]]
    moved = A.affine(x, jnp.ones((1, 2)), jnp.array([[2.0, 1.0]]), fill_mode="constant")
    assert np.argwhere(np.asarray(moved[0, ..., 0]) > 0.5).tolist() == [[2, 5]]  # down, right
    # Zooming out by 2 about the center (4, 4) moves the dot halfway to it.
    out = A.affine(x, jnp.full((1, 2), 2.0), jnp.zeros((1, 2)), fill_mode="constant")
    assert np.argwhere(np.asarray(out[0, ..., 0]) > 0.2).tolist() == [[2, 4]]


@pytest.mark.parametrize("fill_mode", ["reflect", "nearest", "constant"])
def test_layers_match_keras_for_a_fixed_draw(fill_mode):
    keras = pytest.importorskip("keras")
    x = np.asarray(_images(2, 14, 14, 2))
    layers = [  # degenerate ranges (lo == hi), so the random draw is known
        (keras.layers.RandomRotation((0.05, 0.05), fill_mode=fill_mode),
         A.RandomRotation((0.05, 0.05), fill_mode=fill_mode)),
        (keras.layers.RandomTranslation((0.1, 0.1), (-0.2, -0.2), fill_mode=fill_mode),
         A.RandomTranslation((0.1, 0.1), (-0.2, -0.2), fill_mode=fill_mode)),
        (keras.layers.RandomZoom((0.2, 0.2), (-0.1, -0.1), fill_mode=fill_mode),
         A.RandomZoom((0.2, 0.2), (-0.1, -0.1), fill_mode=fill_mode)),
    ]
    for theirs, ours in layers:
        want = np.asarray(theirs(x, training=True))
        got = ours.apply({}, jnp.asarray(x), train=True, rngs={"augment": jax.random.key(0)})
        np.testing.assert_allclose(got, want, atol=1e-5)
    resized = A.Resizing(9, 20).apply({}, jnp.asarray(x), train=False)
    np.testing.assert_allclose(resized, keras.layers.Resizing(9, 20)(x), atol=1e-5)


def test_flip_and_crop_produce_flips_and_windows_of_the_input():
    x = _images(32, 8, 8)
    flipped = A.random_flip(jax.random.key(0), x, "horizontal")
    same = np.all(flipped == x, axis=(1, 2, 3))
    mirrored = np.all(flipped == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored) and same.any() and mirrored.any()
    crops = A.random_crop(jax.random.key(0), x, 5, 6)
    assert crops.shape == (32, 5, 6, 1)
    for image, crop in zip(np.asarray(x), np.asarray(crops), strict=True):
        windows = [image[i : i + 5, j : j + 6] for i in range(4) for j in range(3)]
        assert any(np.array_equal(crop, w) for w in windows)
    np.testing.assert_array_equal(A.center_crop(x, 4, 4), x[:, 2:6, 2:6])


def test_layers_are_the_identity_at_eval_and_random_in_training():
    x = _images(4)
    rngs = {"augment": jax.random.key(0)}
    for layer in (A.RandomRotation(0.2), A.RandomTranslation(0.2, 0.1), A.RandomZoom(0.2),
                  A.RandomFlip()):
        assert layer.apply({}, x, train=False) is x
        assert not np.array_equal(layer.apply({}, x, train=True, rngs=rngs), x)
    crop = A.RandomCrop(6, 6)
    np.testing.assert_array_equal(crop.apply({}, x, train=False), x[:, 3:9, 2:8])
    assert crop.apply({}, x, train=True, rngs=rngs).shape == (4, 6, 6, 1)
    for train in (False, True):  # deterministic preprocessing runs in both modes
        np.testing.assert_allclose(A.Rescaling(2.0, -1.0).apply({}, x, train=train), 2 * x - 1)
        assert A.Resizing(6, 5).apply({}, x, train=train).shape == (4, 6, 5, 1)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: A.RandomRotation(-0.1), r"factor=-0.1; expected a number >= 0"),
        (lambda: A.RandomRotation((0.2, 0.1)), r"factor=\(0.2, 0.1\); expected -1.0 <= lo <= hi"),
        (lambda: A.RandomRotation(0.1, fill_mode="mirror"), "fill_mode='mirror'"),
        (lambda: A.RandomTranslation(0.1, "x"), "width_factor='x'"),
        (lambda: A.RandomZoom(0.1, interpolation="cubic"), "interpolation='cubic'"),
        (lambda: A.RandomFlip("diagonal"), "mode='diagonal'"),
        (lambda: A.RandomCrop(0, 4), "height=0; expected a positive int"),
        (lambda: A.Resizing(4, 4.5), "width=4.5"),
    ],
)
def test_bad_settings_fail_when_the_layer_is_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_images_are_named():
    with pytest.raises(ValueError, match=r"cannot crop 9x4 out of 8x8"):
        A.random_crop(jax.random.key(0), _images(2, 8, 8), 9, 4)
    with pytest.raises(ValueError, match=r"shape \(8, 8, 1\); expected \[B, H, W, C\]"):
        A.random_rotation(jax.random.key(0), _images(1, 8, 8)[0], 0.1)
    with pytest.raises(TypeError, match="dtype uint8; expected a float dtype"):
        A.random_zoom(jax.random.key(0), jnp.zeros((1, 8, 8, 1), jnp.uint8), 0.1)


def test_keras_like_builds_the_usual_stack():
    layers = A.keras_like(rotation=0.05, translation=0.1, zoom=0.0, flip="horizontal")
    assert [type(layer).__name__ for layer in layers] == [
        "RandomFlip", "RandomRotation", "RandomTranslation"
    ]
    assert A.keras_like() == ()


# ----------------------------------------------------------------------------- in the model


@pytest.fixture(scope="module")
def states():
    """Three states with the same parameters (one compile each, shared by the tests below):
    a plain model, one with augmentation and one with dropout."""
    images = np.random.default_rng(0).integers(0, 256, (16, 12, 12, 1), np.uint8)
    labels = np.arange(16, dtype=np.int32) % 3
    kwargs = dict(features=(4,), hidden=(8,), num_classes=3)
    models = {
        "plain": fc.models.ConvStack(**kwargs),
        "augmented": fc.models.ConvStack(
            **kwargs, augment=A.keras_like(rotation=0.2, translation=0.2, zoom=0.2)
        ),
        "dropout": fc.models.ConvStack(**kwargs, dropout_rate=0.5),
    }
    tx = fc.optim.make("sgd", learning_rate=0.1)
    make = lambda model: fc.create_train_state(jax.random.key(0), model, tx, images[:1])
    return {k: make(m) for k, m in models.items()}, {"image": images, "label": labels}


def test_augmentation_runs_in_train_step_but_never_in_eval_or_predict(states):
    (plain, augmented), batch = (states[0]["plain"], states[0]["augmented"]), states[1]
    np.testing.assert_array_equal(fc.predict(plain, batch["image"]),
                                  fc.predict(augmented, batch["image"]))
    for key, value in fc.eval_step(plain, batch).items():
        np.testing.assert_array_equal(fc.eval_step(augmented, batch)[key], value)
    # Same parameters, same step: the training loss differs only through the augmentation,
    # and it is a pure function of (state, batch).
    _, plain_metrics = fc.train_step(plain, batch)
    _, aug_metrics = fc.train_step(augmented, batch)
    _, again = fc.train_step(augmented, batch)
    assert float(aug_metrics["loss_sum"]) != float(plain_metrics["loss_sum"])
    assert float(again["loss_sum"]) == float(aug_metrics["loss_sum"])
    # The next step draws new transforms (the key folds in state.step).
    _, next_metrics = fc.train_step(augmented.replace(step=augmented.step + 1), batch)
    _, plain_next = fc.train_step(plain.replace(step=plain.step + 1), batch)
    assert float(next_metrics["loss_sum"]) != float(aug_metrics["loss_sum"])
    assert float(plain_next["loss_sum"]) == float(plain_metrics["loss_sum"])


def test_augmented_train_step_composes_with_vmap_and_scan(states):
    state, batch = states[0]["augmented"], states[1]
    states = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    states = states.replace(rng=jnp.stack([state.rng, state.rng + 1]))  # two members
    _, metrics = jax.vmap(fc.train_step, in_axes=(0, None))(states, batch)
    assert metrics["loss_sum"].shape == (2,)
    assert metrics["loss_sum"][0] != metrics["loss_sum"][1]  # each member its own draws
    body = lambda s, _: fc.train_step_fn(s, batch)
    final, per_step = jax.jit(lambda s: jax.lax.scan(body, s, None, length=2))(state)
    assert int(final.step) == 2 and per_step["loss_sum"].shape == (2,)
    assert per_step["loss_sum"][0] != per_step["loss_sum"][1]


def test_dropout_is_wired_to_train(states):
    (plain, dropped), batch = (states[0]["plain"], states[0]["dropout"]), states[1]
    # Dropout has no parameters: the same weights, and evaluation ignores it.
    np.testing.assert_array_equal(fc.predict(plain, batch["image"]),
                                  fc.predict(dropped, batch["image"]))
    _, plain_metrics = fc.train_step(plain, batch)
    _, dropped_metrics = fc.train_step(dropped, batch)
    assert float(dropped_metrics["loss_sum"]) != float(plain_metrics["loss_sum"])
    x = jnp.asarray(batch["image"], jnp.float32) / 255
    run = lambda seed: dropped.model.apply(
        dropped.variables(), x, train=True, rngs={"dropout": jax.random.key(seed)}
    )
    assert not np.array_equal(run(0), run(1))
    np.testing.assert_array_equal(run(0), run(0))
