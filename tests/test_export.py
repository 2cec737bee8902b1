"""fc.export: a jax.export artifact for cpu, cuda and tpu (lowered here, on CPU) that a
process which never imports flaxconv or Flax loads with jax alone, and whose logits are
fc.predict's for batch sizes 1, 7 and 64, uint8 or float32 images in."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import numpy as np
import pytest
from serving_models import CLASSES, IMAGES, states, trained

import flaxconv as fc
from flaxconv.export import ExportError, export_kernels

SERVE = textwrap.dedent("""
    import sys
    import jax, numpy as np
    root = sys.argv[1]
    for name, sizes in (("preset_uint8", (1, 7, 64)), ("preset_float32", (7,)),
                        ("nnx_uint8", (7,))):
        with open(f"{root}/{name}.exported", "rb") as f:
            served = jax.export.deserialize(f.read())
        images = np.load(f"{root}/images_{name.split('_')[1]}.npy")
        for n in sizes:
            np.save(f"{root}/{name}_{n}.npy", np.asarray(served.call(images[:n])))
    assert not any(m.split(".")[0] in ("flaxconv", "flax", "optax") for m in sys.modules)
    print("served", jax.default_backend())
""")


def test_an_export_serves_with_bare_jax_for_any_batch_size(tmp_path):
    preset, nnx_state = states()["preset"], states()["nnx"]  # BatchNorm and dropout
    floats = IMAGES.astype(np.float32) / 255
    np.save(tmp_path / "images_uint8.npy", IMAGES)
    np.save(tmp_path / "images_float32.npy", floats)
    exported = fc.export(preset, tmp_path / "preset_uint8.exported")
    fc.export(preset, tmp_path / "preset_float32.exported", input_dtype="float32")
    fc.export(nnx_state, tmp_path / "nnx_uint8.exported")
    assert exported.platforms == ("cpu", "cuda", "tpu")
    assert str(exported.in_avals[0]) == "uint8[batch,8,8,1]"
    assert str(exported.out_avals[0]) == f"float32[batch,{CLASSES}]"
    run = subprocess.run([sys.executable, "-c", SERVE, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0 and "served cpu" in run.stdout, run.stderr[-3000:]
    for name, state, images, sizes in (("preset_uint8", preset, IMAGES, (1, 7, 64)),
                                       ("preset_float32", preset, floats, (7,)),
                                       ("nnx_uint8", nnx_state, IMAGES, (7,))):
        expected = np.asarray(fc.predict(state, images))
        for n in sizes:
            logits = np.load(tmp_path / f"{name}_{n}.npy")
            assert logits.dtype == np.float32 and logits.shape == (n, CLASSES)
            np.testing.assert_allclose(logits, expected[:n], rtol=1e-5, atol=1e-5)


def test_each_platform_gets_formulations_it_lowers():
    assert export_kernels("auto", ("cpu", "cuda", "tpu")) == "xla"
    assert export_kernels("im2col", ("cpu", "tpu")) == "xla"
    assert export_kernels("auto", ("cpu",)) == "cpu"
    assert export_kernels("auto", ("cuda",)) == "gpu"
    assert export_kernels("auto", ("tpu",)) == "xla"
    assert export_kernels("im2col", ("cuda",)) == "im2col"
    state = states()["preset"]
    # A CPU-only machine lowers for an accelerator it does not have.
    for platforms in (("tpu",), ("cuda",)):
        assert fc.export(state, None, platforms=platforms).platforms == platforms
    # One platform: that platform's table, so the logits are fc.predict's there.
    served = fc.export(state, None, platforms="cpu")
    np.testing.assert_allclose(served.call(IMAGES), fc.predict(state, IMAGES),
                               rtol=1e-6, atol=1e-6)


class FixedBatch(nn.Module):
    """Needs a concrete batch size (``int`` of a symbolic dimension fails)."""

    @nn.compact
    def __call__(self, x, *, train):
        return nn.Dense(CLASSES)(x.reshape(int(x.shape[0]), -1))


def test_bad_arguments_and_unexportable_models_are_named(tmp_path):
    state = states()["preset"]
    with pytest.raises(ValueError, match=r"platforms=\('cpu', 'gpu'\); expected distinct "
                                         r"names from \('cpu', 'cuda', 'rocm', 'tpu'\)"):
        fc.export(state, tmp_path / "x", platforms=("cpu", "gpu"))
    with pytest.raises(ValueError, match=r"input_dtype='int32'; expected one of"):
        fc.export(state, tmp_path / "x", input_dtype="int32")
    with pytest.raises(ExportError, match=r"^cannot export FixedBatch for \('cpu', 'cuda', "
                                          r"'tpu'\) with images uint8\[batch, 8, 8, 1\] \("):
        fc.export(trained(FixedBatch()), tmp_path / "x")
    assert not (tmp_path / "x").exists()
