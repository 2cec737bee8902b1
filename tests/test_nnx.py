"""NNX modules, natively: the steps equal Flax's functional NNX loop written by hand, and
fit, evaluation, populations, checkpoints, sharding, summaries and feature maps work on
them as on linen modules."""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image
from tiny_data import pixel_dataset

import flaxconv as fc
from flaxconv.checkpoint import Checkpoints

# The kernel seam must rewrite NNX models as it does linen ones, never fall back with a warning.
pytestmark = pytest.mark.filterwarnings("error:flaxconv.kernels could not rewrite:RuntimeWarning")
DATA_DIR = os.environ.get("FLAXCONV_DATA_DIR")
needs_mnist = pytest.mark.skipif(
    not (DATA_DIR and os.path.isdir(os.path.join(DATA_DIR, "mnist"))),
    reason="needs real MNIST in $FLAXCONV_DATA_DIR/mnist",
)


class CNN(nnx.Module):
    """Two conv -> BatchNorm -> relu -> 2x2 max-pool blocks, dropout, a dense head. The
    BatchNorm momentum of 0.9 lets the running statistics settle within one short epoch."""

    def __init__(self, *, rngs, size=12, features=(4, 8), classes=10, rate=0.25):
        f1, f2 = features
        self.conv1 = nnx.Conv(1, f1, (3, 3), padding="VALID", rngs=rngs)
        self.bn1 = nnx.BatchNorm(f1, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(f1, f2, (3, 3), padding="VALID", rngs=rngs)
        self.bn2 = nnx.BatchNorm(f2, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(rate, rngs=rngs)
        side = ((size - 2) // 2 - 2) // 2
        self.head = nnx.Linear(f2 * side * side, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.bn1(self.conv1(x))), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.bn2(self.conv2(x))), (2, 2), (2, 2))
        return self.head(self.dropout(x.reshape(x.shape[0], -1)))


class CallRngs(nnx.Module):
    """Flax's MNIST-tutorial style: a Dropout without rngs of its own, fed at call time."""

    def __init__(self, *, rngs, classes=4):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.dropout = nnx.Dropout(0.5)
        self.head = nnx.Linear(4 * 4 * 4, classes, rngs=rngs)

    def __call__(self, x, rngs=None):
        x = nnx.max_pool(nnx.relu(self.conv(x)), (2, 2), (2, 2))
        return self.head(self.dropout(x.reshape(x.shape[0], -1), rngs=rngs))


class Tiny(nnx.Module):
    """For the 8x8 pixel dataset: conv (SAME) -> BatchNorm -> relu -> pool -> dropout -> head."""

    def __init__(self, *, rngs, classes=4):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 4, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), (2, 2))
        return self.head(self.dropout(x.reshape(x.shape[0], -1)))


def rngs(seed=0):
    return nnx.Rngs(params=seed, dropout=seed + 1)


def batch(n=16, size=12, seed=0, classes=10):
    rng = np.random.default_rng(seed)
    return {"image": rng.random((n, size, size, 1), np.float32),
            "label": rng.integers(0, classes, n).astype(np.int32)}


TX = optax.sgd(0.1, momentum=0.9)


def make_state(model=None, tx=TX, size=12, **kwargs):
    model = CNN(rngs=rngs(), size=size) if model is None else model
    return fc.create_train_state(jax.random.key(0), model, tx, np.zeros((1, size, size, 1)),
                                 **kwargs)


# --------------------------------------------------------------------------- the steps


def hand_step(graphdef, params, stats, rng_state, opt_state, state_rng, step, batch):
    """One step of Flax's functional NNX loop (nnx.merge + optax), written from the
    TrainState contract: step t's dropout key is fold_in(rng, t) split in two, first half;
    the module's dropout stream is reseeded with the first draw of nnx.Rngs(dropout=key)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state_rng), step)
    dropout_key, _ = jax.random.split(key)

    def loss_fn(params):
        # copy: the variables from outside this grad trace are not mutable inside it.
        model = nnx.merge(graphdef, params, stats, rng_state, copy=True)
        model.train()
        nnx.reseed(model, dropout=nnx.Rngs(dropout=dropout_key).dropout())
        logits = model(batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, nnx.state(model, nnx.BatchStat)

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss


@pytest.mark.parametrize("kernels, tol", [("xla", 1e-6), ("auto", 1e-4)])
def test_train_steps_equal_the_functional_nnx_loop_by_hand(kernels, tol):
    model = CNN(rngs=rngs())
    graphdef, params, stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat,
                                                   nnx.RngState)
    opt_state = TX.init(params)
    state = make_state(model, kernels=kernels)
    chex.assert_trees_all_equal(state.params, nnx.to_pure_dict(params))
    step_by_hand = jax.jit(functools.partial(hand_step, graphdef))
    for t in range(3):
        b = batch(seed=t)
        state, metrics = fc.train_step(state, b)
        params, stats, opt_state, loss = step_by_hand(params, stats, rng_state, opt_state,
                                                      state.rng, t, b)
        assert fc.metrics.compute(metrics)["loss"] == pytest.approx(float(loss), rel=tol)
        chex.assert_trees_all_close(state.params, nnx.to_pure_dict(params), rtol=tol, atol=tol)
        chex.assert_trees_all_close(state.batch_stats, nnx.to_pure_dict(stats),
                                    rtol=tol, atol=tol)
    # The comparison sees dropout: another step's key gives other parameters.
    other = step_by_hand(params, stats, rng_state, opt_state, state.rng, 7, batch(seed=3))[0]
    now, _ = fc.train_step(state, batch(seed=3))
    assert not np.allclose(now.params["head"]["kernel"],
                           nnx.to_pure_dict(other)["head"]["kernel"], rtol=tol, atol=tol)
    # Pure: the same state and batch give the same result, and the model object is intact.
    again, _ = fc.train_step(state, batch(seed=3))
    chex.assert_trees_all_equal(now.params, again.params)
    assert int(state.step) == 3 and model.dropout.deterministic is False


def test_predict_and_eval_step_use_inference_mode():
    model = CNN(rngs=rngs())
    state, _ = fc.train_step(make_state(model), batch())
    b = batch(32, seed=5)
    # By hand: the split module updated with the state's arrays, in NNX's eval mode.
    graphdef, params, stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat,
                                                   nnx.RngState)
    nnx.replace_by_pure_dict(params, state.params)
    nnx.replace_by_pure_dict(stats, state.batch_stats)
    trained = nnx.merge(graphdef, params, stats, rng_state)
    trained.eval()
    expected = trained(b["image"])
    logits = fc.predict(state, b["image"])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.model.merge(state.params, state.batch_stats)(b["image"]),
                               expected, rtol=1e-5, atol=1e-6)
    metrics = fc.eval_step(state, b)
    assert float(metrics["correct"]) == float(np.sum(np.argmax(expected, -1) == b["label"]))
    losses = optax.softmax_cross_entropy_with_integer_labels(expected, b["label"])
    assert float(metrics["loss_sum"]) == pytest.approx(float(losses.sum()), rel=1e-4)
    # Training mode differs (dropout, batch statistics); inference is deterministic.
    train_logits = state.model.apply(state.variables(), b["image"], train=True,
                                     rngs=state.step_rngs())
    assert not np.allclose(train_logits, expected, atol=1e-3)
    np.testing.assert_array_equal(fc.predict(state, b["image"]), logits)


@pytest.mark.parametrize("make", [
    lambda: CallRngs(rngs=nnx.Rngs(0)),        # rngs passed to __call__, no stream stored
    lambda: Tiny(rngs=nnx.Rngs(0)),            # a 'default' stream only: no 'dropout' one
], ids=["call_rngs", "default_stream"])
def test_dropout_gets_the_steps_key_whatever_the_rngs_style(make):
    images, labels = pixel_dataset(32, 4)
    b = {"image": images, "label": labels}
    state = fc.create_train_state(jax.random.key(0), make(), TX, images[:1])
    a, _ = fc.train_step(state, b)
    again, _ = fc.train_step(state, b)
    other, _ = fc.train_step(state.replace(rng=jax.random.key_data(jax.random.key(1))), b)
    chex.assert_trees_all_equal(a.params, again.params)  # same inputs, same outputs
    assert not np.allclose(a.params["head"]["kernel"], other.params["head"]["kernel"])
    # Evaluation draws nothing: the same logits whatever the rng.
    np.testing.assert_array_equal(fc.predict(a, images), fc.predict(a.replace(rng=other.rng),
                                                                     images))


def test_explain_kernels_puts_nnx_convolutions_through_the_seam():
    state = make_state(CNN(rngs=rngs(), size=28), size=28, kernels="auto")
    for train in (True, False):
        choices = fc.steps.explain_kernels(state, np.zeros((8, 28, 28, 1), np.uint8), train)
        convs = [c for c in choices if c.op.startswith("conv")]
        pools = [c for c in choices if "pool" in c.op]
        assert len(convs) == 2 and len(pools) == 2, choices
        assert not any(c.fallback for c in convs + pools), choices
        # Named by their attribute paths, as a linen module's layers are by theirs.
        assert [c.layer for c in convs] == ["CNN/conv1", "CNN/conv2"], choices


class ScaledConv(nnx.Conv):
    """A user's subclass that calls the layer it extends."""

    def __call__(self, x):
        return 2.0 * super().__call__(x)


class Block(nnx.Module):
    def __init__(self, *, rngs):
        self.conv = ScaledConv(1, 4, (3, 3), padding="SAME", rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.conv(x))


class Nested(nnx.Module):
    def __init__(self, *, rngs):
        self.blocks = nnx.List([Block(rngs=rngs)])
        self.last = nnx.Conv(4, 4, (3, 3), padding="VALID", rngs=rngs)
        self.head = nnx.Linear(4 * 10 * 10, 3, rngs=rngs)

    def __call__(self, x):
        x = self.last(self.blocks[0](x))
        return self.head(x.reshape(x.shape[0], -1))


def test_explain_kernels_names_nested_nnx_layers_by_path_and_trains_unchanged():
    state = make_state(Nested(rngs=rngs()))
    choices = fc.steps.explain_kernels(state, np.zeros((2, 12, 12, 1), np.uint8))
    assert [c.layer for c in choices] == ["Nested/blocks/0/conv", "Nested/last"], choices
    # The scopes are for the explanation only: the classes are as they were.
    assert ScaledConv.__call__.__qualname__ == "ScaledConv.__call__"
    assert nnx.Conv.__call__.__qualname__ == "Conv.__call__"
    logits = fc.predict(state, batch(2)["image"])
    module = state.model.merge(state.params, state.batch_stats)
    np.testing.assert_allclose(logits, module(batch(2)["image"]), rtol=1e-5, atol=1e-5)


def test_per_example_grads_and_sharded_step():
    model = CallRngs(rngs=nnx.Rngs(0))  # dropout fed at call time, no BatchNorm
    images, labels = pixel_dataset(8, 4)
    b = {"image": images, "label": labels}
    state = fc.create_train_state(jax.random.key(0), model, TX, images[:1])
    grads = fc.per_example_grads(state, b)
    assert grads["head"]["kernel"].shape == (8, 64, 4)
    # Example 0's gradient is the step's gradient on the batch of one.
    one = {k: v[:1] for k, v in b.items()}
    single = jax.grad(lambda p: fc.steps.loss_fn(p, state, *fc.steps.check_batch(state, one))[0])(
        state.params)
    chex.assert_trees_all_close(jax.tree.map(lambda g: g[0], grads), single, rtol=1e-5,
                                atol=1e-7)
    mesh = fc.parallel.data_mesh()
    rep, split = fc.parallel.replicated(mesh), fc.parallel.data_sharding(mesh)
    step = jax.jit(fc.train_step_fn, in_shardings=(rep, split), out_shardings=(rep, rep))
    sharded, _ = step(fc.parallel.replicate(state, mesh), fc.parallel.shard_batch(b, mesh))
    plain, _ = fc.train_step(state, b)
    chex.assert_trees_all_close(sharded.params, plain.params, rtol=1e-5, atol=1e-7)


def test_freezing_layers_keeps_their_params_and_batch_statistics():
    state = fc.finetune.freeze_state(make_state(), TX, ("conv1", "bn1"))
    new, _ = fc.train_step(state, batch())
    for layer in ("conv1", "bn1"):
        chex.assert_trees_all_equal(new.params[layer], state.params[layer])
    chex.assert_trees_all_equal(new.batch_stats["bn1"], state.batch_stats["bn1"])
    assert not np.allclose(new.batch_stats["bn2"]["mean"], state.batch_stats["bn2"]["mean"])
    assert not np.allclose(new.params["conv2"]["kernel"], state.params["conv2"]["kernel"])


# --------------------------------------------------------------------------- populations


def test_population_of_two_nnx_members_trains_like_each_member_alone():
    factory = functools.partial(CNN, size=12)  # rngs -> module: one initialization per key
    keys = fc.population.keys_from_seeds([0, 1])
    x = np.zeros((1, 12, 12, 1))
    states = fc.create_population(keys, factory, TX, x)
    first = fc.create_train_state(jax.random.key(0), factory, TX, x)
    chex.assert_trees_all_equal(fc.select_member(states, 0).params, first.params)
    assert not np.allclose(states.params["conv1"]["kernel"][0],
                           states.params["conv1"]["kernel"][1])

    b = batch(16)
    vmapped, _ = jax.vmap(fc.train_step, in_axes=(0, None))(states, b)
    alone, _ = fc.train_step(first, b)
    chex.assert_trees_all_close(fc.select_member(vmapped, 0).params, alone.params,
                                rtol=1e-4, atol=1e-6)

    images = (batch(40, seed=1)["image"] * 255).astype(np.uint8)
    labels = batch(40, seed=1)["label"]
    plan = fc.epochs.epoch_plan(40, batch_size=8)
    indices = plan.indices(jax.random.key(3))
    member1 = fc.select_member(states, 1)
    trained, sums = fc.train_population_epoch(states, images, labels, indices, plan.mask)
    assert sums["count"].shape == (2, plan.steps)
    single, _ = fc.epochs.train_epoch(member1, images, labels, indices, plan.mask)
    chex.assert_trees_all_close(fc.select_member(trained, 1).params, single.params,
                                rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(fc.select_member(trained, 1).batch_stats, single.batch_stats,
                                rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- fit, checkpoints


def tiny_state(seed=0):
    images, _ = pixel_dataset(1, 4)
    return fc.create_train_state(jax.random.key(seed), Tiny(rngs=nnx.Rngs(seed)),
                                 fc.optim.make("adam", learning_rate=1e-2), images)


def test_fit_resumes_an_nnx_run_exactly(tmp_path, capsys):
    data = pixel_dataset(96, 4)
    fit = functools.partial(fc.fit, train_data=data, batch_size=16, verbose="silent")
    reference, history = fit(tiny_state(), epochs=3, workdir=tmp_path / "whole")
    assert history["loss"][-1] < history["loss"][0]
    fit(tiny_state(), epochs=1, workdir=tmp_path / "cut")
    resumed, resumed_history = fit(tiny_state(), epochs=3, workdir=tmp_path / "cut",
                                   verbose="epoch")
    assert "Resuming from" in capsys.readouterr().out
    chex.assert_trees_all_equal(resumed.params, reference.params)
    chex.assert_trees_all_equal(resumed.batch_stats, reference.batch_stats)
    assert resumed_history["loss"] == history["loss"]
    # Fine-tuning's partial restore: the conv layer from the run, the rest as it was.
    fresh = tiny_state(seed=1)
    partial = fc.checkpoint.restore_params(tmp_path / "whole", fresh, include=("conv",))
    chex.assert_trees_all_equal(partial.params["conv"], reference.params["conv"])
    chex.assert_trees_all_equal(partial.params["head"], fresh.params["head"])


def flatten(x):
    return x.reshape(x.shape[0], -1)


def test_checkpoint_round_trip_of_a_sequential_model(tmp_path):
    # nnx.Sequential keeps its layers in a list: int keys in the params tree.
    r = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Conv(1, 4, (3, 3), rngs=r), nnx.BatchNorm(4, rngs=r), nnx.relu,
                           flatten, nnx.Linear(8 * 8 * 4, 4, rngs=r))
    images, labels = pixel_dataset(32, 4)
    template = fc.create_train_state(jax.random.key(0), model, TX, images[:1])
    assert sorted(template.params["layers"]) == [0, 1, 4]
    state, _ = fc.train_step(template, {"image": images, "label": labels})
    checkpoints = Checkpoints(tmp_path, asynchronous=False)
    checkpoints.save(0, state)
    restored, _ = checkpoints.restore(0, template)
    assert jax.tree.structure(restored) == jax.tree.structure(template)
    chex.assert_trees_all_equal(restored.params, state.params)
    chex.assert_trees_all_equal(restored.batch_stats, state.batch_stats)
    np.testing.assert_array_equal(fc.predict(restored, images), fc.predict(state, images))


# --------------------------------------------------------------------------- summary, viz


def test_summary_counts_linen_nnx_and_bridged_modules():
    linen = fc.summary(fc.models.get("dlwp_mnist"), (28, 28, 1))
    assert " Total params: 104,202" in linen.splitlines()  # Keras's count

    # conv1 160, bn1 32 + 32 statistics, conv2 4,640, bn2 64 + 64, head 800 x 10 + 10.
    total, fixed = 160 + 64 + 4_640 + 128 + 8_010, 32 + 64
    module = CNN(rngs=rngs(), size=28, features=(16, 32))
    state = make_state(module, size=28)
    assert fc.num_params(state.params) + fc.num_params(state.batch_stats) == total
    for text in (fc.summary(state), fc.summary(module, (28, 28, 1))):
        lines = text.splitlines()
        assert lines[0] == 'Model: "CNN"'
        assert f" Total params: {total:,}" in lines
        assert f" Non-trainable params: {fixed:,}" in lines
        rows = [line.split() for line in lines if line.startswith(("conv", "bn", "drop", "he"))]
        assert [r[:2] for r in rows] == [
            ["conv1", "(Conv)"], ["bn1", "(BatchNorm)"], ["conv2", "(Conv)"],
            ["bn2", "(BatchNorm)"], ["dropout", "(Dropout)"], ["head", "(Linear)"]]
        assert rows[0][2:] == ["(None,", "26,", "26,", "16)", "160"]
        assert rows[3][-1] == "128" and rows[-1][-1] == "8,010"
    frozen = fc.summary(state, frozen=("conv*",)).splitlines()
    assert f" Trainable params: {total - fixed - 160 - 4_640:,}" in frozen

    class Bridged(CNN):  # the linen contract: model(x, train=bool)
        def __call__(self, x, *, train=False):
            if train:
                self.train()
            else:
                self.eval()
            return super().__call__(x)

    bridged = nnx.bridge.to_linen(Bridged, size=28, features=(16, 32))
    lines = fc.summary(bridged, (28, 28, 1)).splitlines()
    assert f" Total params: {total:,}" in lines  # was 0: linen sees no submodules
    assert f" Non-trainable params: {fixed:,}" in lines
    assert any(line.split()[:2] == ["head", "?"] and line.endswith("8,010") for line in lines)


def test_activations_feature_maps_and_filters_of_an_nnx_model(tmp_path):
    state, _ = fc.train_step(make_state(), batch())
    x = batch(2, seed=9)["image"]
    assert fc.viz.map_layers(state) == ["conv1", "bn1", "conv2", "bn2"]
    maps = fc.viz.activations(state, x)
    module = state.model.merge(state.params, state.batch_stats)  # eval mode
    np.testing.assert_allclose(maps["conv1"], module.conv1(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        maps["bn2"], module.bn2(module.conv2(nnx.max_pool(nnx.relu(module.bn1(module.conv1(x))),
                                                          (2, 2), (2, 2)))),
        rtol=1e-4, atol=1e-5)
    path = fc.viz.feature_maps(state, x, tmp_path / "maps.png", cell=16)
    assert np.asarray(Image.open(path)).shape[:2] == (16 * 2 * 4, 110 + 16 * 8)
    path = fc.viz.filters(state, tmp_path / "filters.png", cell=10)
    assert np.asarray(Image.open(path)).shape[:2] == (24 + 10, 10 * 4)  # conv1: 4 filters
    with pytest.raises(ValueError, match=r"\['dense'\] match no layer"):
        fc.viz.map_layers(state, "dense")


# --------------------------------------------------------------------------- real MNIST


@needs_mnist
def test_an_nnx_convnet_learns_mnist_through_fit():
    images, labels = fc.data.load("mnist", "train", source="raw")
    test_images, test_labels = fc.data.load("mnist", "test", source="raw")
    model = CNN(rngs=rngs(), size=28, features=(16, 32))
    state = fc.create_train_state(jax.random.key(0), model, fc.optim.make("adam", 2e-3),
                                  images[:1])
    # One epoch on 12,000 images: 96.0-96.7% over three seeds (6,000 images: about 95-96%).
    state, history = fc.fit(state, (images[:12_000], labels[:12_000]), epochs=1,
                            batch_size=32, verbose="silent")
    result = fc.metrics.evaluate(state, test_images, test_labels)
    assert result["count"] == 10_000
    assert result["accuracy"] >= 0.95, result
    # fit donated the state's buffers, never the module's own: it still runs.
    assert model(jnp.zeros((1, 28, 28, 1))).shape == (1, 10)
