"""Data parallelism (flaxconv.parallel, fc.fit on many devices) and mixed precision.

The multi-device checks need several devices, and XLA only simulates them on CPU when
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set before JAX starts; so pytest
runs this file as a script in a subprocess with that flag. The same checks also run
in-process where the backend has several real devices (GPUs, a TPU host), and by hand:

    python tests/test_parallel.py                    # on the real devices (two or more)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tests/test_parallel.py                # on 8 simulated CPU devices
"""

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxconv as fc
from flaxconv import epochs as ep
from flaxconv import parallel
from flaxconv.checkpoint import load_state, save_state, state_arrays

REPO = Path(__file__).resolve().parents[1]
SHAPE = (12, 12, 1)  # small images: equivalence does not need MNIST's size
BATCH = 32  # global; splits over 1, 2, 4 and 8 devices
TOL = 1e-5


def tiny_model(**options):
    # conv 12->10 (4), pool ->5, conv ->3 (8), flatten 72, head 10
    return fc.models.get("dlwp_mnist", features=(4, 8), **options)


def synthetic(n, seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = (images.reshape(n, -1)[:, :10].argmax(-1)).astype(np.int32)  # learnable
    return images, labels


@functools.cache
def make_tx(optimizer, lr):
    # One optimizer object per setting: it is static in the state, so a new one would
    # make every jitted function compile again.
    return fc.optim.make(optimizer, learning_rate=lr)


@functools.cache
def _initial_state(model, optimizer, lr, shape):
    tx = make_tx(optimizer, lr)
    return fc.create_train_state(jax.random.key(0), model, tx, np.zeros((1, *shape), np.uint8))


def new_state(model=None, optimizer="rmsprop", lr=1e-3, shape=SHAPE):
    """A fresh copy (fit donates its input) of the step-0 state, initialized once."""
    return jax.tree.map(jnp.copy, _initial_state(model or tiny_model(), optimizer, lr, shape))


def on(devices, tree):
    return parallel.replicate(tree, parallel.data_mesh(devices))


def devices_of(tree):
    return set().union(*(leaf.sharding.device_set for leaf in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------- multi-device
# Each check runs on whatever devices there are (at least two) and raises on failure.


N = 256  # examples: 8 steps of BATCH per epoch


def check_each_device_gathers_and_trains_on_its_rows():
    """The compiled epoch of fit's fast path runs B / D rows per device, not B on each."""
    d = jax.device_count()
    images, labels = synthetic(N)

    def compiled(devices):
        state = on(devices, new_state())
        state, x, y, plan = ep.place_for_fit(state, images, labels, BATCH)
        indices = plan.indices(jax.random.key(1))
        assert indices.sharding.spec == jax.sharding.PartitionSpec(None, "data")
        return ep.train_epoch.lower(state, x, y, indices, plan.mask).compile()

    many, one = compiled(jax.devices()), compiled(jax.devices()[:1])
    hlo = many.as_text()
    # The image gather (uint8 rows of SHAPE) yields this device's B / D rows only.
    rows = r"u8\[(\d+),(?:1,)?" + ",".join(map(str, SHAPE)) + r"\]\S* gather\("
    gathered = {int(b) for b in re.findall(rows, hlo)}
    assert gathered == {BATCH // d}, (gathered, d)
    assert "all-reduce(" in hlo  # the gradients (and metric sums) are summed over devices
    # Per-device arithmetic shrinks with the batch share (the replicated update does not).
    ratio = one.cost_analysis()["flops"] / many.cost_analysis()["flops"]
    assert ratio > d / 2, (ratio, d)


@functools.cache
def fit_on_one_and_on_all():
    """The same 2-epoch fit on one device and (by default) on all; with histories."""
    images, labels = synthetic(N)
    kwargs = dict(epochs=2, batch_size=BATCH, validation_data=synthetic(100, seed=1),
                  verbose="silent")
    one = fc.fit(on(jax.devices()[:1], new_state()), (images, labels), **kwargs)
    return one, fc.fit(new_state(), (images, labels), **kwargs)


def check_fit_on_all_devices_equals_fit_on_one():
    (one, h1), (many, hn) = fit_on_one_and_on_all()
    assert devices_of(one.params) == {jax.devices()[0]}
    assert devices_of(many.params) == set(jax.devices())
    assert int(many.step) == int(one.step) == 2 * N // BATCH
    chex.assert_trees_all_close(
        jax.device_get(many.params), jax.device_get(one.params), rtol=TOL, atol=TOL
    )
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(hn[key], h1[key], rtol=TOL, atol=TOL, err_msg=key)
    assert hn["loss"][-1] < hn["loss"][0]


def check_checkpoints_move_between_device_counts():
    (one, _), (many, _) = fit_on_one_and_on_all()
    with tempfile.TemporaryDirectory() as tmp:
        for saved, devices in ((many, jax.devices()[:1]), (one, jax.devices())):
            path = os.path.join(tmp, f"from_{len(devices_of(saved.params))}")
            save_state(path, saved)
            restored, _ = load_state(path, on(devices, new_state()))
            assert devices_of(restored.params) == set(devices)
            chex.assert_trees_all_equal(
                *jax.device_get((state_arrays(restored), state_arrays(saved)))
            )


def check_batch_size_must_split_over_devices():
    d = jax.device_count()
    images, labels = synthetic(64)
    with pytest.raises(ValueError, match=rf"batch_size={d + 1} does not split evenly over the "
                                         rf"{d} devices of mesh axis 'data'.*multiple of {d}"):
        fc.fit(new_state(), (images, labels), batch_size=d + 1, verbose="silent")
    with pytest.raises(ValueError, match=rf"batch\['image'\] has shape \({d + 1}, 12, 12, 1\); "
                                         rf"expected a leading \(batch\) size that splits "
                                         rf"evenly over the {d} devices"):
        parallel.shard_batch({"image": images[: d + 1], "label": labels[: d + 1]})


def check_a_users_own_step_with_named_shardings():
    """The module docstring's recipe: the user's jit with in/out NamedShardings."""
    mesh = parallel.data_mesh()
    rep, split = parallel.replicated(mesh), parallel.data_sharding(mesh)
    step = jax.jit(fc.train_step_fn, in_shardings=(rep, split), out_shardings=(rep, rep))
    images, labels = synthetic(BATCH)
    batch = parallel.shard_batch({"image": images, "label": labels}, mesh)
    assert {s.data.shape[0] for s in batch["image"].addressable_shards} == {
        BATCH // jax.device_count()
    }
    state, metrics = step(parallel.replicate(new_state(), mesh), batch)
    ref_state, ref_metrics = fc.train_step(new_state(), {"image": images, "label": labels})
    assert devices_of(state.params) == set(jax.devices())
    chex.assert_trees_all_close(
        jax.device_get((state.params, metrics)),
        jax.device_get((ref_state.params, ref_metrics)),
        rtol=TOL, atol=TOL,
    )


MULTI_DEVICE_CHECKS = (
    check_each_device_gathers_and_trains_on_its_rows,
    check_fit_on_all_devices_equals_fit_on_one,
    check_checkpoints_move_between_device_counts,
    check_batch_size_must_split_over_devices,
    check_a_users_own_step_with_named_shardings,
)


def run_multi_device_checks():
    if jax.device_count() < 2:
        raise RuntimeError(f"these checks need two or more devices; have {jax.devices()}")
    # Full-precision matmuls, so that GPUs' TF32 does not blur the 1-vs-D comparison.
    with jax.default_matmul_precision("highest"):
        for check in MULTI_DEVICE_CHECKS:
            start, cpu = time.perf_counter(), time.process_time()
            check()
            print(f"{check.__name__}: ok on {jax.device_count()} {jax.default_backend()} "
                  f"devices ({time.perf_counter() - start:.1f}s, "
                  f"{time.process_time() - cpu:.1f}s cpu)", flush=True)


def test_data_parallel_on_8_simulated_cpu_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, __file__], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    for check in MULTI_DEVICE_CHECKS:
        assert f"{check.__name__}: ok on 8 cpu devices" in out.stdout, out.stdout


@pytest.mark.skipif(jax.device_count() < 2, reason="one device here (the 8 simulated CPU "
                    "devices run in test_data_parallel_on_8_simulated_cpu_devices)")
def test_data_parallel_on_real_devices():
    run_multi_device_checks()


# --------------------------------------------------------------------------- one device


def test_helpers_on_one_process():
    mesh = parallel.data_mesh()
    assert mesh.axis_names == ("data",) and parallel.axis_size(mesh) == jax.device_count()
    with pytest.raises(ValueError, match="empty list of devices"):
        parallel.data_mesh([])
    with pytest.raises(ValueError, match=r"mesh has axes \('members',\); expected an axis "
                                         r"named 'data'"):
        parallel.data_sharding(parallel.data_mesh(axis="members"))
    assert [parallel.process_slice(10, i, 3) for i in range(3)] == [
        slice(0, 3), slice(3, 6), slice(6, 10)]
    with pytest.raises(ValueError, match=r"process_index=3; expected an integer in \[0, 3\)"):
        parallel.process_slice(10, 3, 3)
    images, labels = synthetic(40)
    # One process: its share is everything, and its rows make the whole global batch.
    share = parallel.process_share((images, labels))
    np.testing.assert_array_equal(share[0], images)
    ours = list(parallel.process_batches(images, labels, 16, shuffle=True, seed=3, epoch=1))
    reference = list(fc.data.batches(images, labels, 16, shuffle=True, seed=3, epoch=1))
    assert len(ours) == len(reference) == 3
    for a, b in zip(ours, reference, strict=True):
        chex.assert_trees_all_equal(jax.device_get(a), b)
    sharded = parallel.global_batch(reference[0], mesh)
    assert sharded["image"].sharding == parallel.data_sharding(mesh)


def test_initialize_without_a_configuration_does_nothing(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "FLAXCONV_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'; expected an integer"):
        parallel.initialize()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match=r"missing \['coordinator_address', 'process_id'\]"):
        parallel.initialize()
    with pytest.raises(ValueError, match=r"process_id=2; expected an integer in \[0, 2\)"):
        parallel.initialize("127.0.0.1:1", process_id=2)
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.setenv("FLAXCONV_DISTRIBUTED", "yes")
    with pytest.raises(ValueError, match="FLAXCONV_DISTRIBUTED='yes'; expected 'auto'"):
        parallel.initialize()


# --------------------------------------------------------------------------- mixed precision


def test_bfloat16_compute_trains_with_float32_params_and_optimizer_state():
    state = new_state(tiny_model(dtype="bfloat16"), optimizer="adam", lr=1e-2)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 256).astype(np.int32)  # brightness tells the class
    images = (labels[:, None, None, None] * 24 + rng.integers(0, 16, (256, *SHAPE)))
    images = images.astype(np.uint8)
    _, inter = state.model.apply(
        state.variables(), images[:2].astype(np.float32) / 255, train=False,
        capture_intermediates=True, mutable=["intermediates"],
    )
    assert inter["intermediates"]["conv_0"]["__call__"][0].dtype == jnp.bfloat16
    state, history = fc.fit(state, (images, labels), epochs=8, batch_size=BATCH,
                            verbose="silent")
    assert history["loss"][-1] < 0.5 * history["loss"][0], history["loss"]
    # Adam's step count is an integer; every floating leaf must be float32.
    floats = [x for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
    logits = fc.predict(state, images[:4])
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_batch_norm_model_in_bfloat16_keeps_float32_statistics():
    state = new_state(tiny_model(dtype="bfloat16", batch_norm=True))
    images, labels = synthetic(64)
    state, _ = fc.train_step(state, {"image": images, "label": labels})
    stats = jax.tree.leaves(state.batch_stats)
    assert stats and all(x.dtype == jnp.float32 for x in stats)


def test_a_bad_compute_dtype_is_named():
    with pytest.raises(ValueError, match=r"dtype='bf16'.*expected a floating dtype"):
        new_state(tiny_model(dtype="bf16"))
    with pytest.raises(ValueError, match=r"dtype=.*int8.*expected a floating dtype"):
        new_state(tiny_model(dtype=jnp.int8))


def test_experiment_dtype_flag_and_devices(tmp_path, monkeypatch):
    from flaxconv import experiment

    images, labels = synthetic(96, shape=(28, 28, 1))
    monkeypatch.setattr(experiment.data, "load", lambda name, split, **_: (images, labels))
    trained = []

    def fit(state, *args, **kwargs):  # the real fit, recording the model it trains
        trained.append(state.model)
        return fc.fit(state, *args, **kwargs)

    monkeypatch.setattr(experiment, "fit", fit)
    config = experiment.parse_flags(
        experiment.default_config(),
        ["--dtype", "bfloat16", "--epochs", "1", "--batch-size", "32", "--verbose", "silent",
         "--workdir", str(tmp_path), "--model", "dense"],
        "test",
    )
    results = experiment.train_and_evaluate(config)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["dtype"] == "bfloat16" == results["config"]["dtype"]
    assert saved["devices"] == [str(d) for d in jax.devices()]
    assert [m.dtype for m in trained] == ["bfloat16"]


if __name__ == "__main__":
    run_multi_device_checks()
