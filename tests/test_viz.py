"""Inspection: feature maps, filters, the Keras-like summary, training curves."""

import functools

import jax
import numpy as np
import optax
import pytest
from PIL import Image

import flaxconv as fc

SHAPE = (12, 12, 1)


@functools.lru_cache
def make_state(input_shape=SHAPE, features=(4, 8)):
    model = fc.models.get("dlwp_mnist", num_classes=3, features=features, batch_norm=True)
    return fc.create_train_state(
        jax.random.key(0), model, optax.sgd(0.1), np.zeros((1, *input_shape))
    )


def images(n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


def png(path):
    """The PNG at ``path`` as an ``[H, W, channels]`` uint8 array."""
    return np.asarray(Image.open(path))


def test_feature_maps_png_has_one_row_per_image_and_layer(tmp_path):
    state = make_state()
    path = fc.viz.feature_maps(state, images(2), tmp_path / "maps.png", cell=32)
    layers = fc.viz.map_layers(state)
    assert layers == ["conv_0", "bn_0", "pool_0", "conv_1", "bn_1"]
    # conv_1/bn_1 have the most channels (8); 2 images x 5 layers rows.
    assert png(path).shape[:2] == (32 * 2 * 5, 110 + 32 * 8)

    one = fc.viz.feature_maps(state, images(1)[0], tmp_path / "one.png", layers="pool_*",
                              channels=[3, 0])
    assert png(one).shape[:2] == (64, 110 + 64 * 2)


def test_each_cell_draws_its_map_on_its_own_viridis_scale(tmp_path):
    import matplotlib

    state, x = make_state(), images(1)
    maps = fc.viz.activations(state, x)
    pixels = png(fc.viz.feature_maps(state, x, tmp_path / "maps.png", cell=32))
    viridis = matplotlib.colormaps["viridis"]
    for r, name in enumerate(maps):  # one image: one row per layer
        for channel in (0, 3):
            m = maps[name][0, :, :, channel]
            # The cell's first pixel (past its 1-pixel border) is the map's [0, 0].
            drawn = pixels[r * 32 + 1, 110 + channel * 32 + 1, :3].astype(int)
            expected = np.round(
                np.asarray(viridis((m[0, 0] - m.min()) / (m.max() - m.min()))[:3]) * 255)
            np.testing.assert_allclose(drawn, expected, atol=1, err_msg=f"{name}/{channel}")
    # Filters: one symmetric gray scale for all of them, mid-gray at 0.
    kernel = np.asarray(state.params["conv_0"]["kernel"])[:, :, 0, :]
    pixels = png(fc.viz.filters(state, tmp_path / "f.png"))
    scale = np.abs(kernel).max()
    for o in range(kernel.shape[-1]):
        drawn = pixels[24 + 2, o * 48 + 2, :3].astype(int)
        gray = matplotlib.colormaps["gray"]((kernel[0, 0, o] + scale) / (2 * scale))
        np.testing.assert_allclose(drawn, np.round(np.asarray(gray[:3]) * 255), atol=1,
                                   err_msg=f"filter {o}")


def test_feature_maps_differ_for_different_inputs(tmp_path):
    state = make_state()
    a, b = images(1, seed=1), images(1, seed=2)
    maps_a, maps_b = fc.viz.activations(state, a), fc.viz.activations(state, b)
    assert list(maps_a) == fc.viz.map_layers(state)
    assert maps_a["conv_0"].shape == (1, 10, 10, 4) and maps_a["pool_0"].shape == (1, 5, 5, 4)
    for name in maps_a:
        assert not np.allclose(maps_a[name], maps_b[name]), name
    # The picture changes with the input, and the same input draws the same picture.
    draw = lambda x, name: png(fc.viz.feature_maps(state, x, tmp_path / name))  # noqa: E731
    first, again, other = draw(a, "a.png"), draw(a, "a2.png"), draw(b, "b.png")
    assert first.shape == other.shape
    np.testing.assert_array_equal(first, again)
    assert np.mean(first != other) > 0.05


def test_feature_maps_bad_input_names_what_was_expected(tmp_path):
    state = make_state()
    with pytest.raises(ValueError, match=r"\['dense_\*'\] match no layer.*\['conv_0', 'bn_0'"):
        fc.viz.feature_maps(state, images(1), tmp_path / "x.png", layers="dense_*")
    with pytest.raises(ValueError, match=r"\['head'\] match no layer with \[N, H, W, C\]"):
        fc.viz.activations(state, images(1), layers="head")
    with pytest.raises(ValueError, match=r"channels \[5\] are not channels of conv_0; it has 4"):
        fc.viz.feature_maps(state, images(1), tmp_path / "x.png", channels=[0, 5])
    with pytest.raises(ValueError, match=r"shape \(1, 28, 28, 1\); expected \('B', 12, 12, 1\)"):
        fc.viz.activations(state, np.zeros((1, 28, 28, 1), np.uint8))
    dense = fc.create_train_state(
        jax.random.key(0), fc.models.get("dense"), optax.sgd(0.1), np.zeros((1, *SHAPE))
    )
    with pytest.raises(ValueError, match="ConvStack has no layer with"):
        fc.viz.feature_maps(dense, images(1), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"layer=None is not a conv layer; expected one of \[\]"):
        fc.viz.filters(dense, tmp_path / "x.png")


def test_filters_png_has_one_cell_per_filter(tmp_path):
    state = make_state()
    first = fc.viz.filters(state, tmp_path / "f0.png")  # the first conv: 4 filters 3x3x1
    assert png(first).shape[:2] == (24 + 48, 48 * 4)
    second = fc.viz.filters(state, tmp_path / "f1.png", "conv_1", input_channel=3, columns=3)
    assert png(second).shape[:2] == (24 + 48 * 3, 48 * 3)  # 8 filters in rows of 3
    with pytest.raises(ValueError, match=r"layer='head' is not a conv layer.*\['conv_0', 'conv_1'"):
        fc.viz.filters(state, tmp_path / "x.png", "head")
    with pytest.raises(ValueError, match=r"input_channel=4; conv_1 has 4 input channels"):
        fc.viz.filters(state, tmp_path / "x.png", "conv_1", input_channel=4)

    rgb = make_state(input_shape=(8, 8, 3), features=(6,))
    path = fc.viz.filters(rgb, tmp_path / "rgb.png", cell=20)
    pixels = png(path)
    assert pixels.shape[:2] == (24 + 20, 20 * 6)
    # Colored cells: the RGB channels of the drawn kernels differ somewhere.
    body = pixels[24:, :, :3].astype(int)
    assert np.abs(body[..., 0] - body[..., 1]).max() > 0


def test_summary_counts_frozen_layers_as_non_trainable():
    state = make_state()
    lines = fc.summary(state).splitlines()
    head = fc.num_params(state.params["head"])
    total = fc.num_params(state.params) + fc.num_params(state.batch_stats)
    assert f" Total params: {total:,}" in lines
    assert f" Non-trainable params: {fc.num_params(state.batch_stats):,}" in lines  # BN stats
    frozen = fc.summary(state, frozen=("conv_*", "bn_*")).splitlines()
    assert f" Total params: {total:,}" in frozen
    assert f" Trainable params: {head:,}" in frozen
    assert f" Non-trainable params: {total - head:,}" in frozen
    with pytest.raises(ValueError, match=r"\['dense_0'\] match no layer"):
        fc.summary(state, frozen="dense_0")


def test_plot_history_writes_a_png(tmp_path):
    history = {"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.6, 0.8]}
    path = fc.viz.plot_history(history, tmp_path / "curves.png")
    assert png(path).shape[:2] == (400, 1000)
