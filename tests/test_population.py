"""Populations: vmapped members equal solo runs; learning rates, ensembles, per-example
gradients, reporting, sharding over devices, the sweep experiment and its errors."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxconv as fc
from flaxconv import population as pop
from flaxconv.epochs import epoch_plan, evaluate, train_epoch_fn
from flaxconv.fit import data_order_key
from flaxconv.steps import loss_fn

REPO = Path(__file__).resolve().parents[1]
SHAPE = (12, 12, 1)  # small images: the member/solo equivalence does not need MNIST's size
LRS = (1e-3, 3e-3, 0.0)  # member 2 is frozen: the control
SEEDS = (0, 1, 2)


def tiny_model(**options):
    # conv 12->10 (4), pool ->5, conv ->3 (8), flatten 72, head 10
    return fc.models.get("dlwp_mnist", features=(4, 8), **options)


# One model and optimizer object for most tests, so their jitted functions compile once.
MODEL = tiny_model()
TX = fc.optim.make("rmsprop", learning_rate=1e-3)


def synthetic(n, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)
    labels = (images.reshape(n, -1)[:, :10].argmax(-1)).astype(np.int32)  # learnable
    return images, labels


def close(a, b, tol=1e-5):
    chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


@pytest.fixture(autouse=True, scope="module")
def full_float32_matmuls():
    # On GPUs the default matmul precision (TF32) rounds a vmapped (batched) matmul and the
    # solo one differently, and 30 steps grow that past the tolerance; CPUs are unaffected.
    with jax.default_matmul_precision("float32"):
        yield


@jax.jit
def solo_epoch(state, images, labels, indices, mask):
    return train_epoch_fn(state, images, labels, indices, mask)


@pytest.fixture(scope="module")
def trained():
    """A 3-member population after one 30-step epoch, each member in its own data order:
    the one ``fc.fit`` draws for its seed."""
    images, labels = synthetic(480)
    plan = epoch_plan(len(labels), 16)
    keys = pop.keys_from_seeds(SEEDS)
    init = pop.create_population(keys, MODEL, TX, images[:1], learning_rates=LRS)
    order_keys = jax.vmap(data_order_key, in_axes=(0, None))(init, 0)
    indices = pop.population_indices(plan, order_keys)
    assert indices.shape == (3, plan.steps, 16)
    start = jax.tree.map(jnp.copy, init)  # train_population_epoch donates its input
    states, sums = pop.train_population_epoch(start, images, labels, indices, plan.mask)
    return dict(init=init, states=states, sums=sums, images=images, labels=labels, plan=plan,
                indices=indices, keys=keys)


def test_member_init_is_create_train_state_with_its_key(trained):
    for i, seed in [(0, SEEDS[0]), (2, SEEDS[2])]:
        solo = fc.create_train_state(jax.random.key(seed), MODEL, TX, trained["images"][:1])
        member = pop.select_member(trained["init"], i)
        chex.assert_trees_all_equal(member.params, solo.params)
        chex.assert_trees_all_equal(member.rng, solo.rng)
        assert float(fc.optim.learning_rate(member.opt_state)) == np.float32(LRS[i])


def test_each_member_ends_equal_to_the_model_trained_alone(trained):
    images, labels, plan = trained["images"], trained["labels"], trained["plan"]
    for i in (0, 1):  # lr 1e-3 (tx's) and 3e-3 (set per member): both must match a solo run
        tx = TX if i == 0 else fc.optim.make("rmsprop", learning_rate=LRS[i])
        solo = fc.create_train_state(jax.random.key(SEEDS[i]), MODEL, tx, images[:1])
        solo, solo_sums = solo_epoch(solo, images, labels, trained["indices"][i], plan.mask)
        member = pop.select_member(trained["states"], i)
        close(member.params, solo.params)
        close(member.opt_state.inner_state, solo.opt_state.inner_state)
        assert int(member.step) == int(solo.step) == plan.steps
        close({k: v[i] for k, v in trained["sums"].items()}, solo_sums, tol=1e-4)


def test_learning_rates_differ_in_effect(trained):
    init, states = trained["init"], trained["states"]
    frozen = pop.select_member(states, 2)  # lr = 0
    chex.assert_trees_all_equal(frozen.params, pop.select_member(init, 2).params)
    assert int(frozen.step) == trained["plan"].steps  # it did run the steps
    for i in (0, 1):
        moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                             pop.select_member(states, i).params,
                             pop.select_member(init, i).params)
        assert min(jax.tree.leaves(moved)) > 0


def test_shared_order_equals_solo_and_vmapped_train_step_works(trained):
    images, labels, plan = trained["images"], trained["labels"], trained["plan"]
    states = jax.tree.map(jnp.copy, trained["init"])
    indices = pop.population_indices(plan, jax.random.key(5))
    assert indices.shape == (plan.steps, 16)
    # The DESIGN contract: vmap of the public step over the member axis, one shared batch.
    batch = {"image": images[:16], "label": labels[:16]}
    stepped, metrics = jax.vmap(fc.train_step, in_axes=(0, None))(states, batch)
    assert metrics["loss_sum"].shape == (3,) and stepped.step.tolist() == [1, 1, 1]
    solo = pop.select_member(states, 0)
    states, _ = pop.train_population_epoch(states, images, labels, indices, plan.mask)
    solo, _ = solo_epoch(solo, images, labels, indices, plan.mask)
    close(pop.select_member(states, 0).params, solo.params)


def test_a_one_member_population_trains_like_the_model_alone():
    # A lone member runs the unbatched step (on CPU: not the vmapped formulation).
    images, labels = synthetic(480)
    plan = epoch_plan(len(labels), 16)
    init = pop.create_population(pop.keys_from_seeds(SEEDS[:1]), MODEL, TX, images[:1])
    indices = pop.population_indices(plan, jax.random.key(5))
    states, sums = pop.train_population_epoch(jax.tree.map(jnp.copy, init), images, labels,
                                              indices, plan.mask)
    solo, solo_sums = solo_epoch(pop.select_member(init, 0), images, labels, indices, plan.mask)
    close(pop.select_member(states, 0).params, solo.params)
    close({k: v[0] for k, v in sums.items()}, solo_sums, tol=1e-4)


@pytest.mark.parametrize("vmap_size", [1, 2, 3])
def test_members_vmapped_or_taking_turns_train_alike(trained, vmap_size):
    # All vmapped (3), in vmapped groups that take turns (2: groups of 2 and 1), or one
    # after another (1): the same population, whatever the backend's default.
    start = jax.tree.map(jnp.copy, trained["init"])
    states, sums = pop.train_population_epoch(start, trained["images"], trained["labels"],
                                              trained["indices"], trained["plan"].mask,
                                              vmap_size=vmap_size)
    close(states.params, trained["states"].params)
    close(sums["loss_sum"], trained["sums"]["loss_sum"], tol=1e-4)
    assert states.model == trained["states"].model
    assert pop.resolve_vmap_size(None, 8, "cpu") == 1
    assert pop.resolve_vmap_size(None, 8, "gpu") == 8
    with pytest.raises(ValueError, match="vmap_size=0"):
        pop.resolve_vmap_size(0, 8)


def test_evaluate_population_equals_each_member_evaluated_alone(trained):
    images, labels = synthetic(130, seed=2)  # 130 = 2 full batches of 50 + a padded one
    sums = pop.evaluate_population(trained["states"], images, labels, batch_size=50)
    assert sums["confusion"].shape == (3, 10, 10)
    for i in range(3):
        alone = evaluate(pop.select_member(trained["states"], i), images, labels, batch_size=50)
        close({k: v[i] for k, v in sums.items()}, alone)
    assert np.all(np.asarray(sums["count"]) == 130)


def test_ensemble_predict_is_the_mean_of_member_softmaxes(trained):
    states, images = trained["states"], trained["images"][:20]
    probs = pop.ensemble_predict(states, images)
    members = [jax.nn.softmax(fc.predict(pop.select_member(states, i), images)) for i in range(3)]
    close(probs, np.mean(members, axis=0), tol=1e-6)
    close(probs.sum(-1), np.ones(20), tol=1e-5)


def test_ensemble_evaluate_is_exact_over_a_padded_last_batch(trained):
    states = trained["states"]
    images, labels = synthetic(70, seed=3)
    sums = pop.ensemble_evaluate(states, images, labels, batch_size=32)
    probs = np.asarray(pop.ensemble_predict(states, images))
    assert float(sums["count"]) == 70
    assert float(sums["correct"]) == np.sum(probs.argmax(-1) == labels)
    nll = -np.log(probs[np.arange(70), labels]).sum()
    np.testing.assert_allclose(float(sums["loss_sum"]), nll, rtol=1e-4)
    assert 0 <= fc.summarize(sums)["accuracy"] <= 1


def test_select_and_stack_members_round_trip(trained):
    states = trained["states"]
    members = [pop.select_member(states, i) for i in range(3)]
    assert members[0].step.shape == () and members[0].input_shape == SHAPE
    chex.assert_trees_all_equal(pop.stack_members(members), states)
    chex.assert_trees_all_equal(pop.select_member(states, -1), members[2])
    with pytest.raises(IndexError, match="member index 3 is out of range for a population of 3"):
        pop.select_member(states, 3)
    with pytest.raises(ValueError, match="expected \\[K\\]: a population"):
        pop.select_member(members[0], 0)


def test_per_example_grads_equal_a_loop_of_single_example_grads(trained):
    state = pop.select_member(trained["states"], 0)
    images, labels = trained["images"][:6], trained["labels"][:6]
    mask = np.array([True] * 5 + [False])
    grads = pop.per_example_grads(state, {"image": images, "label": labels, "mask": mask})
    assert jax.tree.map(np.shape, grads) == jax.tree.map(lambda p: (6, *p.shape), state.params)
    x = images.astype(np.float32) / 255
    grad = jax.jit(lambda x, y, m: jax.grad(loss_fn, has_aux=True)(state.params, state, x, y, m)[0])
    for b in range(5):
        one = grad(x[b : b + 1], labels[b : b + 1], np.ones(1, np.float32))
        close(jax.tree.map(lambda g, b=b: g[b], grads), one, tol=1e-5)
    chex.assert_trees_all_equal(
        jax.tree.map(lambda g: g[5], grads), jax.tree.map(jnp.zeros_like, state.params))
    # No dropout or BatchNorm: the mean over examples is the batch gradient.
    batch_grad = grad(x[:5], labels[:5], np.ones(5, np.float32))
    close(jax.tree.map(lambda g: g[:5].mean(0), grads), batch_grad, tol=1e-5)


def test_best_member_and_table():
    summary = {"loss": np.array([0.5, 0.25, np.nan]), "accuracy": np.array([0.9, 0.95, 0.1])}
    assert pop.best_member(summary) == 1
    assert pop.best_member(summary, by="loss") == 1  # the NaN (diverged) member never wins
    sums = {"loss_sum": np.array([10.0, 4.0]), "correct": np.array([90.0, 99.0]),
            "count": np.array([100.0, 100.0])}
    assert pop.best_member(sums) == 1
    table = pop.population_table(sums, learning_rates=[1e-3, 1e-2], seeds=[0, 7])
    lines = table.splitlines()
    assert lines[0].split() == ["member", "seed", "learning_rate", "loss", "accuracy"]
    assert lines[1].split() == ["0", "0", "1.00e-03", "0.1000", "90.00%"]
    assert lines[2].split() == ["1", "7", "1.00e-02", "0.0400", "99.00%", "*"]
    # sample std of (90, 99) = 6.36; of (0.1, 0.04) = 0.0424
    assert lines[3] == ("mean ± std over 2 members: loss 0.0700 ± 0.0424, "
                        "accuracy 94.50% ± 6.36%")
    assert len(lines) == 4
    plain = pop.population_table({"loss": [0.3], "accuracy": [0.8]})
    assert plain.splitlines()[1].split() == ["0", "-", "-", "0.3000", "80.00%"]
    with pytest.raises(ValueError, match="seeds has 3 entries for 2 members"):
        pop.population_table(sums, seeds=[0, 1, 2])
    with pytest.raises(ValueError, match="by='speed'"):
        pop.best_member(sums, by="speed")
    with pytest.raises(ValueError, match="expected metric sums"):
        pop.population_table({"acc": [1.0]})


def test_errors_name_the_value_and_what_was_expected(trained):
    model, x = MODEL, np.zeros((1, *SHAPE), np.uint8)
    tx = fc.optim.make("sgd", learning_rate=0.1)
    with pytest.raises(ValueError, match="num_models is needed"):
        pop.create_population(jax.random.key(0), model, tx, x)
    with pytest.raises(ValueError, match="num_models=3 but 2 keys"):
        pop.create_population(pop.keys_from_seeds([0, 1]), model, tx, x, num_models=3)
    with pytest.raises(ValueError, match="got 3 learning rates for 2 members"):
        pop.create_population(jax.random.key(0), model, tx, x, 2, learning_rates=[1, 2, 3])
    with pytest.raises(ValueError, match="expected finite numbers >= 0"):
        pop.create_population(jax.random.key(0), model, tx, x, 2, learning_rates=[0.1, -1])
    schedule = fc.optim.make("sgd", learning_rate=optax.linear_schedule(0.1, 0.0, 10))
    with pytest.raises(ValueError, match="learning rate is a schedule"):
        pop.create_population(jax.random.key(0), model, schedule, x, 2, learning_rates=[1, 2])
    with pytest.raises(ValueError, match="expected a jax.random.key"):
        pop.create_population([0, 1, 2], model, tx, x)
    plan, states = trained["plan"], jax.tree.map(jnp.copy, trained["states"])
    bad = jnp.zeros((2, plan.steps, plan.batch_size), jnp.int32)
    with pytest.raises(ValueError, match=r"indices has shape \(2, 30, 16\); expected \[S, B\]"):
        pop.train_population_epoch(states, trained["images"], trained["labels"], bad, plan.mask)
    with pytest.raises(ValueError, match="expected \\[K\\]: a population"):
        pop.ensemble_predict(pop.select_member(states, 0), trained["images"][:2])


SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, chex
import flaxconv as fc
from flaxconv import population as pop
from flaxconv.epochs import epoch_plan
assert jax.device_count() == 4, jax.devices()
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (64, 12, 12, 1), dtype=np.uint8)
labels = rng.integers(0, 10, 64).astype(np.int32)
plan = epoch_plan(64, 16)
model = fc.models.get("dlwp_mnist", features=(4, 8))
tx = fc.optim.make("rmsprop", learning_rate=1e-3)
def make():
    return pop.create_population(jax.random.key(0), model, tx, images[:1], num_models=8,
                                 learning_rates=np.geomspace(1e-4, 1e-2, 8))
indices = pop.population_indices(plan, jax.random.split(jax.random.key(1), 8))
plain, _ = pop.train_population_epoch(make(), images, labels, indices, plan.mask)
mesh = pop.population_mesh()
sharded = pop.shard_population(make(), mesh)
data = pop.replicate_data((jnp.asarray(images), jnp.asarray(labels)), mesh)
sharded, sums = pop.train_population_epoch(sharded, *data, indices, plan.mask)
for leaf in jax.tree.leaves(sharded):  # still 2 whole members per device
    assert len(leaf.sharding.device_set) == 4, leaf.sharding
    assert leaf.addressable_shards[0].data.shape[0] == 2, leaf.sharding
chex.assert_trees_all_close(jax.device_get(sharded), jax.device_get(plain), rtol=1e-5, atol=1e-5)
six = jax.tree.map(lambda x: x[:6], plain)
try:
    pop.shard_population(six, mesh)
except ValueError as e:
    print("ERROR:", e)
print("SHARDED OK")
"""


def test_sharded_population_trains_like_the_unsharded_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SHARDED_SCRIPT)], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARDED OK" in out.stdout
    assert ("ERROR: cannot split 6 members evenly over 4 devices on mesh axis 'members': "
            "K must be a multiple of 4") in out.stdout


def test_member_equals_fit_run_with_its_seed_and_learning_rate(trained):
    # The sweep's claim: in fit's data order, member i is `fc.fit` run with seed i.
    images, labels = trained["images"], trained["labels"]
    tx = fc.optim.make("rmsprop", learning_rate=LRS[1])
    solo = fc.create_train_state(jax.random.key(SEEDS[1]), MODEL, tx, images[:1])
    solo, _ = fc.fit(solo, (images, labels), epochs=1, batch_size=16, verbose="silent")
    close(pop.select_member(trained["states"], 1).params, solo.params)


# --------------------------------------------------------------------------- the sweep script


def load_sweep():
    path = REPO / "experiments" / "mnist_sweep.py"
    spec = importlib.util.spec_from_file_location("mnist_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mnist_dir():
    root = os.environ.get("FLAXCONV_DATA_DIR")
    if not root or not (Path(root) / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("real MNIST needs FLAXCONV_DATA_DIR (with mnist/*.gz)")
    return root


def test_sweep_writes_results_for_each_member(tmp_path, capsys):
    mnist_dir()
    sweep = load_sweep()
    workdir = tmp_path / "sweep"
    code = sweep.main([
        "--model", "dense", "--num-models", "2", "--learning-rates", "logspace:1e-3:1e-2",
        "--epochs", "1", "--batch-size", "64", "--train-examples", "512",
        "--data-source", "raw", "--workdir", str(workdir),
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "mean ± std over 2 members" in out and "ensemble" in out
    results = json.loads((workdir / "results.json").read_text())
    members = results["members"]
    assert [m["seed"] for m in members] == [0, 1]
    np.testing.assert_allclose([m["learning_rate"] for m in members], [1e-3, 1e-2])
    for m in members:
        assert 0.5 < m["test_accuracy"] <= 1 and np.isfinite(m["test_loss"])
    assert 0.5 < results["ensemble_test_accuracy"] <= 1
    assert results["best_member"]["index"] in (0, 1)
    assert len(results["epoch_seconds"]) == 1 and results["train_seconds"] > 0
    assert results["devices"] and results["config"]["num_models"] == 2
    assert results["test_examples"] == 10_000


@pytest.mark.parametrize("argv, message", [
    (["--learning-rates", "logspace:1e-4"], "--learning-rates 'logspace:1e-4'"),
    (["--learning-rates", "fast"], "--learning-rates 'fast'"),
    (["--num-models", "3", "--learning-rates", "1e-3,1e-2"], "2 learning rates for 3 members"),
    (["--num-models", "2", "--seeds", "1,2,3"], "3 seeds for 2 members"),
    (["--num-models", "0"], "--num-models 0"),
    (["--model", "resnet"], "--model 'resnet'"),
    (["--optimizer", "lion"], "--optimizer 'lion'"),
    (["--epochs", "two"], "--epochs: invalid int value"),
])
def test_sweep_bad_flags_give_one_error_line(argv, message, capsys):
    sweep = load_sweep()
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("mnist_sweep.py: error:")


def test_sweep_flag_parsing():
    sweep = load_sweep()
    config = sweep.parse_flags(["--num-models", "3", "--learning-rates", "logspace:1e-4:1e-2"])
    np.testing.assert_allclose(config.learning_rates, [1e-4, 1e-3, 1e-2])
    assert config.seeds == [0, 1, 2]
    config = sweep.parse_flags(["--seeds", "5,6", "--learning-rates", "0.01"])
    assert config.num_models == 2 and config.learning_rates == [0.01, 0.01]
    config = sweep.parse_flags(["--num-models", "3", "--seeds", "4"])
    assert config.seeds == [4, 4, 4]  # one seed: every member starts alike (an lr sweep)


def test_evaluate_a_population_is_each_member_evaluated_alone(trained):
    states = trained["states"]
    images, labels = synthetic(70, seed=4)
    weight = np.random.default_rng(4).uniform(0, 2, 70).astype(np.float32)
    names = ("loss", "accuracy", "f1_score", "top_3", "confusion")
    got = fc.evaluate(states, images, labels, names, batch_size=32, sample_weight=weight)
    assert got["loss"].shape == (3,) and got["confusion"].shape == (3, 10, 10)
    for i in range(3):
        alone = fc.evaluate(pop.select_member(states, i), images, labels, names, batch_size=32,
                            sample_weight=weight)
        close({k: got[k][i] for k in alone}, alone)
    # The finished per-member numbers are what the table and best_member read.
    assert pop.best_member(got) == int(np.argmax(got["accuracy"]))
    assert len(pop.population_table(got).splitlines()) == 5


def test_evaluate_an_ensemble_is_the_mean_of_member_softmaxes(trained):
    states = trained["states"]
    images, labels = synthetic(70, seed=3)
    got = fc.evaluate(states, images, labels, ("loss", "accuracy", "f1_score"),
                      ensemble=True, batch_size=32)
    probs = np.asarray(pop.ensemble_predict(states, images))
    assert got["count"] == 70
    assert got["accuracy"] == np.mean(probs.argmax(-1) == labels)
    np.testing.assert_allclose(got["loss"], -np.log(probs[np.arange(70), labels]).mean(),
                               rtol=1e-4)
    # The deprecated raw-sum entry point gives the same numbers through the same engine.
    with pytest.warns(DeprecationWarning, match="ensemble=True"):
        sums = fc.population.ensemble_evaluate(states, images, labels, batch_size=32)
    assert float(sums["correct"]) / 70 == got["accuracy"]
    with pytest.raises(ValueError, match="ensemble=True needs a population"):
        fc.evaluate(pop.select_member(states, 0), images, labels, ensemble=True)
