"""The benchmarks' FLOP accounting: the GEMM bound of conv_impl.py is the same work as the
training FLOPs every "% of matmul peak" divides by, and both follow the real model."""

import pathlib
import sys

import jax
import numpy as np

import flaxconv as fc

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))

import conv_impl  # noqa: E402
import mnist_speed  # noqa: E402


def test_gemm_bound_does_the_step_flops_of_the_real_model():
    batch = 64
    gemm_flops = sum(2 * m * k * n for _, m, k, n in conv_impl.gemm_shapes(batch))
    assert gemm_flops == mnist_speed.train_flops_per_example() * batch

    # LAYERS (output H*W, fan-in, fan-out) against the preset's own kernels and feature maps.
    model = fc.models.get("dlwp_mnist")
    params = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32), train=False)
    kernels = [params["params"][f"conv_{i}"]["kernel"].shape for i in range(3)]
    kernels.append(params["params"]["head"]["kernel"].shape)
    _, state = model.apply(params, np.zeros((1, 28, 28, 1), np.float32), train=False,
                           capture_intermediates=True, mutable=["intermediates"])
    maps = [state["intermediates"][f"conv_{i}"]["__call__"][0].shape for i in range(3)]
    expected = [("conv", h * w, kh * kw * cin, cout)
                for (_, h, w, _), (kh, kw, cin, cout) in zip(maps, kernels[:3], strict=True)]
    expected.append(("dense", 1, *kernels[3]))
    assert mnist_speed.LAYERS == expected
