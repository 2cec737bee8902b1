"""flaxconv.epochs: one data order on every path (arrays in fit, a stream of batches, an
image folder, a population, the data-parallel split), one padding rule, and the moved
names' deprecated aliases."""

import importlib

import chex
import jax
import numpy as np
import pytest
from tiny_data import pixel_dataset

import flaxconv as fc
from flaxconv import population as pop

CLASSES = 4
MODEL = fc.models.get("dense", num_classes=CLASSES, hidden=(8,))
TX = fc.optim.make("sgd", learning_rate=0.1)
N, BATCH, SEED = 50, 8, 123


def new_state(seed=0):
    return fc.create_train_state(jax.random.key(seed), MODEL, TX, np.zeros((1, 8, 8, 1)))


def seen_labels(batches):
    """The labels of an epoch's batches in the order they came, padding dropped."""
    return np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"])] for b in batches])


def test_epoch_order_is_a_reproducible_int32_permutation_per_epoch():
    order = fc.epochs.epoch_order(SEED, 2, N)
    assert order.dtype == np.int32 and order.shape == (N,)
    assert sorted(order) == list(range(N))
    np.testing.assert_array_equal(order, fc.epochs.epoch_order(np.int64(SEED), 2, N))
    assert not np.array_equal(order, fc.epochs.epoch_order(SEED, 3, N))
    assert not np.array_equal(order, fc.epochs.epoch_order(SEED + 1, 2, N))
    # a key's two words are (seed, epoch): data_order_key's keys name fit's orders
    key = jax.random.wrap_key_data(np.array([SEED, 2], np.uint32))
    np.testing.assert_array_equal(fc.epochs.key_order(key, N), order)
    for bad, message in [((-1, 0, N), "seed=-1"), ((0, 1.5, N), "epoch=1.5"),
                         ((0, 0, True), "n=True")]:
        with pytest.raises(ValueError, match=message):
            fc.epochs.epoch_order(*bad)


def test_same_seed_same_order_on_arrays_stream_folder_population_and_split(tmp_path):
    images, labels = pixel_dataset(N, CLASSES)
    images[:, 0, 0, 0] = np.arange(N)  # pixel (0, 0) names the example
    want = fc.epochs.epoch_order(SEED, 1, N)

    # a stream of numpy batches
    stream = fc.data.batches(images, labels, BATCH, shuffle=True, seed=SEED, epoch=1)
    ids = np.concatenate([b["image"][b["mask"], 0, 0, 0] for b in stream])
    np.testing.assert_array_equal(ids, want)

    # an image folder (pixel values survive PNG)
    fc.data.write_image_folder(tmp_path / "f", images, labels, list("abcd"))
    folder = fc.data.image_folder(tmp_path / "f", image_size=(8, 8), color_mode="grayscale",
                                  batch_size=BATCH, shuffle=True, seed=SEED)
    np.testing.assert_array_equal(folder.order(1), want)

    # arrays in a plan, single-device and split over a mesh
    plan = fc.epochs.epoch_plan(N, BATCH)
    indices = np.asarray(plan.indices(want))[np.asarray(plan.mask)]
    np.testing.assert_array_equal(indices, want)
    split = fc.epochs.epoch_plan(N, BATCH, mesh=fc.parallel.data_mesh())
    assert isinstance(split, fc.epochs.DataParallelPlan)
    np.testing.assert_array_equal(split.indices(want), plan.indices(want))
    # the data-parallel split reading per process
    parts = fc.parallel.process_batches(images, labels, BATCH, shuffle=True, seed=SEED,
                                        epoch=1)
    ids = np.concatenate([np.asarray(b["image"])[np.asarray(b["mask"]), 0, 0, 0]
                          for b in parts])
    np.testing.assert_array_equal(ids, want)

    # a population: a seed per member, and per member fit's own order
    states = pop.create_population(pop.keys_from_seeds([0, 1]), MODEL, TX, images[:1])
    seeds = pop.order_seeds(states)
    per_member = pop.population_indices(plan, seeds, epoch=1)
    for i, seed in enumerate(seeds):
        member = pop.select_member(states, i)
        assert seed == int(fc.epochs.order_seed(member))
        np.testing.assert_array_equal(
            per_member[i], plan.indices(fc.epochs.epoch_order(seed, 1, N)))
    keys = jax.vmap(fc.epochs.data_order_key, in_axes=(0, None))(states, 1)
    np.testing.assert_array_equal(pop.population_indices(plan, keys), per_member)
    np.testing.assert_array_equal(pop.population_indices(plan, SEED, epoch=1),
                                  plan.indices(want))


def test_fit_on_arrays_equals_fit_on_the_stream_of_its_seed():
    images, labels = pixel_dataset(N, CLASSES)
    seed = int(fc.epochs.order_seed(new_state()))

    def stream(epoch):
        return fc.data.batches(images, labels, BATCH, shuffle=True, seed=seed, epoch=epoch)

    on_arrays, _ = fc.fit(new_state(), (images, labels), 2, batch_size=BATCH,
                          verbose="silent")
    on_stream, _ = fc.fit(new_state(), stream, 2, verbose="silent")
    chex.assert_trees_all_close(on_arrays.params, on_stream.params, atol=1e-6, rtol=1e-6)
    # and another seed trains differently: the order mattered
    other, _ = fc.fit(new_state(1).replace(params=new_state().params), (images, labels), 2,
                      batch_size=BATCH, verbose="silent")
    assert int(fc.epochs.order_seed(new_state(1))) != seed
    assert not np.allclose(jax.tree.leaves(other.params)[0],
                           jax.tree.leaves(on_arrays.params)[0])


def test_pad_batch_is_the_one_padding_rule():
    rows = {"image": np.ones((3, 2, 2, 1), np.uint8), "label": np.array([4, 5, 6], np.int32)}
    batch = fc.epochs.pad_batch(rows, 5)
    assert batch["image"].shape == (5, 2, 2, 1) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["label"], [4, 5, 6, 0, 0])
    np.testing.assert_array_equal(batch["mask"], [True, True, True, False, False])
    assert not batch["image"][3:].any()
    empty = fc.epochs.pad_batch({"label": np.zeros(0, np.int32)}, 2)
    np.testing.assert_array_equal(empty["mask"], [False, False])
    # every path pads the same way
    plan = fc.epochs.epoch_plan(13, 5)
    np.testing.assert_array_equal(np.asarray(plan.mask)[-1], fc.epochs.padding_mask(3, 5))
    with pytest.raises(ValueError, match="at most batch_size=2"):
        fc.epochs.pad_batch(rows, 2)
    with pytest.raises(ValueError, match="one length"):
        fc.epochs.pad_batch({"a": np.zeros(2), "b": np.zeros(3)}, 4)


def test_moved_names_warn_and_still_work():
    images, labels = pixel_dataset(16, CLASSES)
    with pytest.warns(DeprecationWarning, match="flaxconv.epochs.place_for_fit"):
        place = fc.parallel.place_for_fit
    assert place is fc.epochs.place_for_fit
    with pytest.warns(DeprecationWarning, match="flaxconv.epochs.epoch_plan"):
        plan = fc.parallel.epoch_plan(16, 8)
    assert isinstance(plan, fc.epochs.DataParallelPlan) and plan.steps == 2
    with pytest.warns(DeprecationWarning, match="flaxconv.epochs.DataParallelPlan"):
        assert fc.parallel.DataParallelPlan is fc.epochs.DataParallelPlan
    fit_module = importlib.import_module("flaxconv.fit")  # fc.fit is the function

    with pytest.warns(DeprecationWarning, match="flaxconv.epochs.data_order_key"):
        assert fit_module.data_order_key is fc.epochs.data_order_key
    assert "num_classes" not in fit_module.__all__ and "check_labels" not in fit_module.__all__
    with pytest.raises(AttributeError, match="no_such_name"):
        fc.parallel.no_such_name  # noqa: B018
