"""The benchmarks' FLOP accounting: the layer shapes every "% of matmul peak" divides by
follow the real model, whole (the model's FLOPs) and trimmed (what flaxconv executes), and
the GEMM bound of conv_impl.py does exactly those FLOPs."""

import pathlib
import sys

import jax
import numpy as np
import pytest

import flaxconv as fc

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))

import conv_impl  # noqa: E402
import mnist_speed  # noqa: E402


def model_layers(trimmed: bool) -> list[tuple[str, int, int, int]]:
    """(kind, output H*W, fan-in, fan-out) of dlwp_mnist's layers, read from the model's
    feature maps: whole, or on the input cropped as training crops it (trimmed)."""
    model = fc.models.get("dlwp_mnist")
    rows, columns = model.used_input_size(28, 28) if trimmed else (28, 28)
    images = np.zeros((1, rows, columns, 1), np.float32)
    params = model.init(jax.random.key(0), images, train=False)
    kernels = [params["params"][f"conv_{i}"]["kernel"].shape for i in range(3)]
    _, state = model.apply(params, images, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    maps = [state["intermediates"][f"conv_{i}"]["__call__"][0].shape for i in range(3)]
    layers = [("conv", h * w, kh * kw * cin, cout)
              for (_, h, w, _), (kh, kw, cin, cout) in zip(maps, kernels, strict=True)]
    return [*layers, ("dense", 1, *params["params"]["head"]["kernel"].shape)]


def test_flop_counts_follow_the_real_model_whole_and_trimmed():
    assert mnist_speed.LAYERS == model_layers(trimmed=False)
    assert mnist_speed.TRIMMED_LAYERS == model_layers(trimmed=True)
    model_flops = mnist_speed.train_flops_per_example()
    assert round(model_flops / 1e4) == 1821  # the 18.2 MFLOP per example
    assert mnist_speed.train_flops_per_example(mnist_speed.TRIMMED_LAYERS) < 0.9 * model_flops
    # Winograd's conv_1: 16 products per 2x2 tile instead of 36, conv_0 and conv_2 as trimmed.
    winograd = mnist_speed.train_flops_per_example(mnist_speed.WINOGRAD_LAYERS)
    _, hw, fan_in, fan_out = mnist_speed.TRIMMED_LAYERS[1]
    conv_1 = 3 * 2 * hw * fan_in * fan_out  # forward, input and kernel gradients
    trimmed = mnist_speed.train_flops_per_example(mnist_speed.TRIMMED_LAYERS)
    assert winograd == pytest.approx(trimmed - conv_1 * 20 / 36)


def test_executed_layers_follow_the_conv_formulation():
    model = fc.models.get("dlwp_mnist")
    expected = mnist_speed.WINOGRAD_LAYERS if fc.models.COMPILER_OPTIONS else (
        mnist_speed.TRIMMED_LAYERS)
    assert mnist_speed.executed_layers(model) == expected
    assert (mnist_speed.executed_layers(model.clone(conv_impl="xla_nhwc"))
            == mnist_speed.TRIMMED_LAYERS)
    assert mnist_speed.executed_layers(model.clone(trim=False)) == mnist_speed.LAYERS


def test_gemm_bound_does_the_flops_it_is_compared_with():
    batch = 64
    for layers in (mnist_speed.LAYERS, mnist_speed.TRIMMED_LAYERS, mnist_speed.WINOGRAD_LAYERS):
        gemm_flops = sum(2 * m * k * n for _, m, k, n in conv_impl.gemm_shapes(batch, layers))
        assert gemm_flops == mnist_speed.train_flops_per_example(layers) * batch
    winograd = conv_impl.gemm_shapes(batch, mnist_speed.WINOGRAD_LAYERS)
    assert winograd.count(("winograd_1 forward", 64 * 25, 32, 64)) == 16
