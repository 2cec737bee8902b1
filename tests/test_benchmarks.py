"""The benchmarks' FLOP accounting: the layer shapes every "% of matmul peak" divides by
follow the real model, whole (the model's FLOPs) and trimmed (what flaxconv executes, per
kernels policy), and the GEMM bound of conv_impl.py does exactly those FLOPs; the zoo's
models are the same architecture in Flax, Keras and PyTorch, and its table divides by the
right Keras row; the step profiler names the compiled operations it times. No timings."""

import pathlib
import sys

import jax
import numpy as np
import pytest

import flaxconv as fc

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))

import conv_impl  # noqa: E402
import mnist_speed  # noqa: E402
import profile_step  # noqa: E402
import zoo  # noqa: E402


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


def dlwp_state(kernels: str, **overrides) -> fc.TrainState:
    model = fc.models.get("dlwp_mnist", **overrides)
    tx = fc.optim.make("rmsprop", learning_rate=1e-3)
    images = np.zeros((1, 28, 28, 1), np.uint8)
    return fc.create_train_state(jax.random.key(0), model, tx, images, kernels=kernels)


def test_executed_layers_follow_the_kernels_policy():
    cpu = jax.default_backend() == "cpu"
    auto = mnist_speed.WINOGRAD_LAYERS if cpu else mnist_speed.TRIMMED_LAYERS
    assert mnist_speed.executed_layers(dlwp_state("auto")) == auto
    assert mnist_speed.executed_layers(dlwp_state("cpu")) == mnist_speed.WINOGRAD_LAYERS
    for kernels in ("xla", "im2col"):
        assert mnist_speed.executed_layers(dlwp_state(kernels)) == mnist_speed.TRIMMED_LAYERS
    assert mnist_speed.executed_layers(dlwp_state("auto", trim=False)) == mnist_speed.LAYERS


def test_kernels_are_described_per_layer_with_fallbacks_counted():
    line = mnist_speed.kernels_of(dlwp_state("cpu"))
    assert line.startswith("conv_0: fused(+relu,pool) · conv_1: winograd(+relu,pool) · ")
    # conv_2 alone: im2col with jaxlib 0.10, XLA's NHWC convolution from jaxlib 0.11 on.
    assert line.endswith(("conv_2: im2col (xla fallbacks: 0 of 3)",
                          "conv_2: xla_nhwc (xla fallbacks: 0 of 3)"))
    assert mnist_speed.kernels_of(dlwp_state("xla")) == (
        "opt-out: all 5 conv/pool layers on XLA's own ops")
    compact = mnist_speed.compact_formulation
    assert compact("im2col, unfused (+ bias, relu, max_pool 2x2)") == "im2col/unfused(+relu,pool)"
    assert compact("reshape-max (relu folded in)") == "reshape-max(+relu)"
    assert compact("xla (grouped convolution)") == "xla (grouped convolution)"


def test_gemm_bound_does_the_flops_it_is_compared_with():
    batch = 64
    for layers in (mnist_speed.LAYERS, mnist_speed.TRIMMED_LAYERS, mnist_speed.WINOGRAD_LAYERS):
        gemm_flops = sum(2 * m * k * n for _, m, k, n in conv_impl.gemm_shapes(batch, layers))
        assert gemm_flops == mnist_speed.train_flops_per_example(layers) * batch
    winograd = conv_impl.gemm_shapes(batch, mnist_speed.WINOGRAD_LAYERS)
    assert winograd.count(("winograd_1 forward", 64 * 25, 32, 64)) == 16


@pytest.mark.parametrize("name", zoo.MODELS)
def test_zoo_models_have_the_same_parameters_in_every_framework(name):
    shape = zoo.INPUT_SHAPES[name]
    tx = fc.optim.make("rmsprop", learning_rate=1e-3)
    images = np.zeros((2, *shape), np.uint8)
    state = fc.create_train_state(jax.random.key(0), zoo.flax_model(name), tx, images[:1])
    count = fc.state.num_params(state.params)
    if name in ("dlwp_mnist", "dlwp_linen", "dlwp_nnx"):
        assert count == 104_202  # the preset's, as Keras's summary counts it
    assert fc.predict(state, images).shape == (2, zoo.NUM_CLASSES)
    keras = pytest.importorskip("keras")
    keras_model = zoo.keras_model(name, keras)
    assert sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights) == count
    torch = pytest.importorskip("torch")
    torch_model = zoo.torch_model(name)
    assert sum(p.numel() for p in torch_model.parameters()) == count
    torch_model.eval()
    with torch.no_grad():
        out = torch_model(torch.zeros(2, shape[2], *shape[:2]))
    assert tuple(out.shape) == (2, zoo.NUM_CLASSES)


def test_the_hand_written_dlwps_linen_and_nnx_get_the_presets_formulations():
    tx = fc.optim.make("rmsprop", learning_rate=1e-3)
    images = np.zeros((1, 28, 28, 1), np.uint8)
    preset, linen, nnx = (
        fc.create_train_state(jax.random.key(0), zoo.flax_model(name), tx, images, kernels="cpu")
        for name in ("dlwp_mnist", "dlwp_linen", "dlwp_nnx"))
    # The same formulation per layer (the layers' names differ: conv_0, Conv_0, convs/0).
    formulations = [[layer.rsplit(": ", 1)[-1]
                     for layer in mnist_speed.kernels_of(state).split(" · ")]
                    for state in (preset, linen, nnx)]
    assert formulations[0] == formulations[1] == formulations[2], formulations
    assert formulations[0][:2] == ["fused(+relu,pool)", "winograd(+relu,pool)"]


def test_zoo_ratios_divide_by_keras_tf_or_else_by_keras_on_jax():
    def rows(*peers):
        return [zoo.Row("resnet", peer, ms_per_step=ms, warmup_s=1.0)
                for peer, ms in peers]

    both = zoo.table(rows(("flaxconv-fit", 2.0), ("keras-jax", 8.0), ("keras-tf", 4.0)))
    assert "x Keras-TF" in both and "| resnet | flaxconv-fit | 2.00 | 0.50x |" in both
    # A GPU machine without TensorFlow: the Keras row is Keras on JAX.
    gpu = zoo.table(rows(("flaxconv-fit", 2.0), ("keras-jax", 8.0),
                         ("keras-tf", None), ("torch", 4.0)))
    assert "x Keras-JAX" in gpu and "| resnet | flaxconv-fit | 2.00 | 0.25x |" in gpu
    assert "| resnet | torch | 4.00 | 0.50x |" in gpu


def test_the_step_profiler_times_the_operations_of_the_compiled_program(tmp_path):
    def step(x):
        return jax.numpy.tanh(x @ x.T).sum(axis=0)

    x = np.ones((256, 256), np.float32)
    compiled = jax.jit(step).lower(x).compile()
    (tmp_path / "hlo").mkdir()
    # Named as XLA names the dump of fit's epoch program.
    (tmp_path / "hlo" / "m.jit_train_epoch_fn.cpu_after_optimizations.txt").write_text(
        compiled.as_text())
    ops = profile_step.compiled_ops(str(tmp_path / "hlo"))
    assert any(shape.startswith("f32[256,256]") and "dot_general" in op_name
               for shape, op_name in ops.values())
    jax.profiler.start_trace(str(tmp_path / "trace"))
    for _ in range(3):
        jax.block_until_ready(compiled(x))
    jax.profiler.stop_trace()
    times = profile_step.op_times(str(tmp_path / "trace"), ops)
    assert times and set(times) <= set(ops) and all(t > 0 for t in times.values())


def test_the_zoo_machine_line_gives_the_matmul_peak_range_of_its_flaxconv_rows():
    info = {"date": "2026-12-06 01:57", "machine": "vm, x86_64", "cpus": 2,
            "peers_python": {"python": "3.11.7"}}
    assert "GFLOP/s" not in zoo.describe(info)
    info["matmul_gflops"] = [190, 213]
    assert zoo.describe(info).endswith(
        "; jitted 2048x2048 float32 matmul after each flaxconv row: 190-213 GFLOP/s")
