"""The benchmarks' FLOP accounting: the layer shapes every "% of matmul peak" divides by
follow the real model, whole (the model's FLOPs) and trimmed (what flaxconv executes), and
the GEMM bound of conv_impl.py does exactly those FLOPs."""

import pathlib
import sys

import jax
import numpy as np

import flaxconv as fc

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))

import conv_impl  # noqa: E402
import mnist_speed  # noqa: E402


def model_layers(train: bool) -> list[tuple[str, int, int, int]]:
    """(kind, output H*W, fan-in, fan-out) of dlwp_mnist's layers, read from the model: as
    evaluated (train=False, every layer whole) or as trained (trimmed)."""
    model = fc.models.get("dlwp_mnist")
    images = np.zeros((1, 28, 28, 1), np.float32)
    params = model.init(jax.random.key(0), images, train=False)
    kernels = [params["params"][f"conv_{i}"]["kernel"].shape for i in range(3)]
    _, state = model.apply(params, images, train=train, capture_intermediates=True,
                           mutable=["intermediates"])
    maps = [state["intermediates"][f"conv_{i}"]["__call__"][0].shape for i in range(3)]
    layers = [("conv", h * w, kh * kw * cin, cout)
              for (_, h, w, _), (kh, kw, cin, cout) in zip(maps, kernels, strict=True)]
    return [*layers, ("dense", 1, *params["params"]["head"]["kernel"].shape)]


def test_flop_counts_follow_the_real_model_whole_and_trimmed():
    assert mnist_speed.LAYERS == model_layers(train=False)
    assert mnist_speed.TRIMMED_LAYERS == model_layers(train=True)
    model_flops = mnist_speed.train_flops_per_example()
    assert round(model_flops / 1e4) == 1821  # the 18.2 MFLOP per example
    assert mnist_speed.train_flops_per_example(mnist_speed.TRIMMED_LAYERS) < 0.9 * model_flops


def test_gemm_bound_does_the_flops_it_is_compared_with():
    batch = 64
    for layers in (mnist_speed.LAYERS, mnist_speed.TRIMMED_LAYERS):
        gemm_flops = sum(2 * m * k * n for _, m, k, n in conv_impl.gemm_shapes(batch, layers))
        assert gemm_flops == mnist_speed.train_flops_per_example(layers) * batch
