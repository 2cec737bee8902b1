"""fit(): history and its files, curves, validation, verbosity, bad input, non-finite losses,
incompatible and corrupt workdirs, streaming data, per-epoch validation metrics, Keras's
History, validation_split, sample_weight and class_weight (against Keras itself)."""

import csv
import functools
import glob
import json
import os

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest
from tiny_data import pixel_dataset

import flaxconv as fc
from flaxconv import data
from flaxconv.checkpoint import load_state
from flaxconv.experiment import cli, default_config
from flaxconv.fit import History, IncompatibleWorkdirError, NonFiniteLossError

CLASSES = 4
MODEL = fc.models.get("dense", num_classes=CLASSES, hidden=(16,))
TX = fc.optim.make("adam", learning_rate=1e-2)  # one object: jitted epochs compile once
BATCH = 16
REAL_DATA = os.environ.get("FLAXCONV_DATA_DIR")
needs_mnist = pytest.mark.skipif(
    not (REAL_DATA and os.path.isdir(os.path.join(REAL_DATA, "mnist"))),
    reason="needs real MNIST in $FLAXCONV_DATA_DIR/mnist",
)


def dataset(n=96, seed=0):
    return pixel_dataset(n, CLASSES, seed)


@functools.cache
def _initial(model):
    return fc.create_train_state(jax.random.key(0), model, TX, np.zeros((1, 8, 8, 1)))


def new_state(model=MODEL):
    """A fresh copy of the initial state (fit donates the buffers of the state it gets)."""
    return jax.tree.map(lambda x: x.copy(), _initial(model))


def fit(state=None, train=None, epochs=2, **kwargs):
    kwargs.setdefault("verbose", "silent")
    kwargs.setdefault("batch_size", BATCH)
    return fc.fit(new_state() if state is None else state, train or dataset(), epochs, **kwargs)


def test_history_files_curves_and_finished_saves(tmp_path):
    state, history = fit(epochs=3, validation_data=dataset(40, seed=1), workdir=tmp_path)
    assert set(history) == {
        "loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds"
    }
    assert all(len(v) == 3 for v in history.values())
    assert history["loss"][-1] < history["loss"][0]
    assert history["lr"] == [pytest.approx(1e-2)] * 3
    assert json.loads((tmp_path / "history.json").read_text()) == history
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", *history]
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3]
    assert [float(r[1]) for r in rows[1:]] == history["loss"]
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # The asynchronous save of the last epoch is on disk when fit returns.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    restored, meta = load_state(tmp_path / "checkpoints", new_state())
    chex.assert_trees_all_equal(restored.params, state.params)
    assert meta["epoch"] == 2 and meta["history"] == history


def test_validation_split_holds_out_the_last_fraction():
    images, labels = dataset()
    _, split = fit(train=(images, labels), validation_split=0.25)
    _, explicit = fit(train=(images[:72], labels[:72]), validation_data=(images[72:], labels[72:]))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert split[key] == explicit[key]
    with pytest.raises(ValueError, match="validation_split=1.5"):
        fit(validation_split=1.5)


def test_verbose_modes(capsys):
    fit(epochs=2, verbose="epoch")
    out = capsys.readouterr().out
    assert out.count("Epoch ") == 2 and "Epoch 2/2" in out
    assert "6/6 - " in out and " - loss: " in out and " - accuracy: " in out
    fit(epochs=1, verbose="bar")
    out = capsys.readouterr().out
    assert "Epoch 1/1" in out and "━" in out  # the per-step progress bar
    fit(epochs=1, verbose="silent")
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="verbose='loud'"):
        fit(verbose="loud")


def test_labels_outside_the_classes_are_rejected_before_training(tmp_path):
    images, labels = dataset()
    labels[5] = CLASSES
    with pytest.raises(ValueError, match=r"outside \[0, 4\), e.g. 4"):
        fit(train=(images, labels), workdir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing was started
    with pytest.raises(ValueError, match=r"validation labels .*e.g. -1"):
        fit(validation_data=(images[:4], np.array([0, 1, -1, 2])))


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    good, _ = fit(epochs=2, workdir=tmp_path)
    images, labels = dataset()
    # Finite pixels (NaN ones are refused before training) whose products overflow float32.
    poisoned = np.full(images.shape, 3e38, np.float32)
    with (pytest.warns(RuntimeWarning, match=r"expected floats in \[0, 1\]"),
          pytest.raises(NonFiniteLossError, match=r"became nan at step 13 \(epoch 3\)") as error):
        fit(train=(poisoned, labels), epochs=3, workdir=tmp_path)
    assert error.value.step == 2 * 6 + 1 and error.value.epoch == 2
    restored, meta = load_state(tmp_path / "checkpoints", new_state())
    assert meta["epoch"] == 1
    chex.assert_trees_all_equal(restored.params, good.params)


@needs_mnist
def test_cli_reports_a_non_finite_loss_in_one_line(tmp_path, capsys):
    argv = ["--data-source", "raw", "--train-examples", "128", "--model", "dense",
            "--optimizer", "sgd", "--learning-rate", "1e30", "--epochs", "1",
            "--verbose", "silent", "--workdir", str(tmp_path)]
    assert cli(default_config(), "", argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("error: the training loss became") and " at step " in err


def test_workdir_of_another_model_is_refused(tmp_path):
    fit(epochs=1, workdir=tmp_path)
    other = fc.models.get("dense", num_classes=CLASSES, hidden=(8,))
    with pytest.raises(IncompatibleWorkdirError, match="another configuration.*model: ConvStack"):
        fit(new_state(model=other), epochs=2, workdir=tmp_path)
    assert os.listdir(tmp_path / "checkpoints") == ["0"]  # left as it was


def test_workdir_that_is_a_file_is_refused_by_name(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("kept")
    with pytest.raises(ValueError, match=r"workdir='.*notes.txt' is a file; expected a directory"):
        fit(epochs=1, workdir=notes)
    assert notes.read_text() == "kept"


@needs_mnist
def test_cli_refuses_an_incompatible_workdir_in_one_line(tmp_path, capsys):
    common = ["--data-source", "raw", "--train-examples", "64", "--batch-size", "32",
              "--verbose", "epoch", "--metrics", "accuracy", "--workdir", str(tmp_path)]
    assert cli(default_config(), "", ["--model", "dense", "--epochs", "1", *common]) == 0
    capsys.readouterr()
    assert cli(default_config(), "", ["--model", "fashion_cnn", "--epochs", "1", *common]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("error: workdir ")
    assert "model: dense -> fashion_cnn" in err and "Epoch" not in captured.out
    # More epochs (or another verbosity) is the same run, continued.
    assert cli(default_config(), "", ["--model", "dense", "--epochs", "2", *common]) == 0
    out = capsys.readouterr().out
    assert "Resuming from" in out and out.count("Epoch ") == 1


def _corrupt(checkpoint, how):
    if how == "garble_array_bytes":  # Orbax itself would load this silently
        path = max(glob.glob(f"{checkpoint}/state/ocdbt.process_0/d/*"), key=os.path.getsize)
        raw = bytearray(open(path, "rb").read())
        raw[len(raw) // 2] ^= 0xFF
        open(path, "wb").write(bytes(raw))
    elif how == "truncate_meta":
        path = f"{checkpoint}/meta/metadata"
        open(path, "r+b").truncate(os.path.getsize(path) // 2)
    elif how == "delete_state_manifest":
        os.remove(f"{checkpoint}/state/manifest.ocdbt")


@pytest.mark.parametrize("how", ["garble_array_bytes", "truncate_meta", "delete_state_manifest"])
def test_corrupt_newest_checkpoint_is_reported_and_skipped(tmp_path, how, capsys):
    reference, history = fit(epochs=3, workdir=tmp_path)
    _corrupt(tmp_path / "checkpoints" / "2", how)
    with pytest.warns(RuntimeWarning, match="checkpoints/2 is corrupt or incomplete"):
        resumed, resumed_history = fit(epochs=3, workdir=tmp_path, verbose="epoch")
    out = capsys.readouterr().out
    assert "Resuming from" in out and out.count("Epoch ") == 1  # only epoch 3 again
    chex.assert_trees_all_equal(resumed.params, reference.params)
    assert resumed_history["loss"] == history["loss"]
    assert len(os.listdir(f"{tmp_path}/checkpoints.corrupt")) == 1  # kept aside


def test_all_checkpoints_corrupt_starts_over_with_a_warning(tmp_path):
    reference, _ = fit(epochs=2, workdir=tmp_path)
    for epoch in ("0", "1"):
        _corrupt(tmp_path / "checkpoints" / epoch, "truncate_meta")
    with pytest.warns(RuntimeWarning) as caught:
        again, history = fit(epochs=2, workdir=tmp_path)
    messages = [str(w.message) for w in caught]
    for epoch in ("1", "0"):  # newest first, each reported and moved aside
        assert any(f"checkpoints/{epoch} is corrupt or incomplete" in m for m in messages)
    assert any("training starts over" in m for m in messages)
    assert len(os.listdir(f"{tmp_path}/checkpoints.corrupt")) == 2
    assert len(history["loss"]) == 2
    chex.assert_trees_all_equal(again.params, reference.params)


def test_streaming_data_trains_and_resumes_exactly(tmp_path):
    images, labels = dataset()

    def batches(epoch):
        return data.batches(images, labels, BATCH, shuffle=True, seed=3, epoch=epoch)

    whole, history = fit(train=batches, epochs=3)
    assert len(history["loss"]) == 3 and history["loss"][-1] < history["loss"][0]
    fit(train=batches, epochs=1, workdir=tmp_path)
    resumed, resumed_history = fit(train=batches, epochs=3, workdir=tmp_path)
    chex.assert_trees_all_equal(resumed.params, whole.params)
    assert resumed_history["loss"] == history["loss"]

    bad = labels.copy()
    bad[0] = 7
    with pytest.raises(ValueError, match=r"training labels .*e.g. 7"):
        fit(train=lambda epoch: data.batches(images, bad, BATCH), epochs=1)


def test_metrics_argument_logs_validation_metrics():
    validation = dataset(40, seed=1)
    state, history = fit(validation_data=validation, metrics=("top_2", "f1", "roc_auc"))
    for key in ("val_top_2", "val_f1", "val_roc_auc"):
        assert len(history[key]) == 2
    final = fc.metrics.evaluate(state, *validation, ("top_2", "f1", "roc_auc"))
    assert history["val_top_2"][-1] == final["top_2"]
    assert history["val_f1"][-1] == final["f1"]
    assert history["val_roc_auc"][-1] == final["roc_auc"]
    with pytest.raises(ValueError, match="unknown metric 'top5'"):
        fit(validation_data=validation, metrics=("top5",))


def test_a_finished_run_run_again_returns_its_result(tmp_path, capsys):
    state, history = fit(epochs=2, workdir=tmp_path)
    again, again_history = fit(epochs=2, workdir=tmp_path, verbose="epoch")
    assert "Resuming from" in capsys.readouterr().out
    assert again_history == history
    assert isinstance(again_history, History) and again_history.epoch == [0, 1]
    chex.assert_trees_all_equal(again.params, state.params)
    assert int(again.step) == int(state.step) == 12


def keras_dense(keras, kernel=None, bias=None):
    """Keras's Flatten + Dense(CLASSES) on 8x8x1 images, logits out."""
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(CLASSES)])
    if kernel is not None:
        model.layers[-1].set_weights([kernel, bias])
    return model


def test_history_and_validation_split_are_keras_s():
    keras = pytest.importorskip("keras")
    images, labels = dataset(10)
    state, history = fit(train=(images, labels), epochs=2, batch_size=1, validation_split=0.25)
    model = keras_dense(keras)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    theirs = model.fit(images / 255.0, labels, epochs=2, batch_size=1, validation_split=0.25,
                       verbose=0)
    # Keras trains on floor(10 * 0.75) = 7 examples: 7 steps of one example per epoch.
    assert theirs.params["steps"] == history.params["steps"] == 7 and int(state.step) == 14
    assert history.params["epochs"] == theirs.params["epochs"] == 2
    assert history.epoch == theirs.epoch == [0, 1]
    assert set(theirs.history) <= set(history.history)
    assert all(len(history.history[k]) == len(v) for k, v in theirs.history.items())
    # Still the plain dict that code written for fc.fit uses.
    assert history.history["val_loss"] is history["val_loss"]
    assert isinstance(history, dict) and json.loads(json.dumps(history)) == history


@pytest.mark.parametrize("n, fraction", [(10, 0.25), (10, 0.7), (7, 0.5), (96, 0.1), (5, 0.3),
                                         (2, 0.9)])
def test_validation_split_sizes_follow_keras_rule(n, fraction):
    slicing = pytest.importorskip("keras.src.trainers.data_adapters.array_slicing")
    images, labels = dataset(n)
    try:
        train, _ = slicing.train_validation_split((images, labels), fraction)
    except ValueError:  # Keras refuses an empty split: so do we
        with pytest.raises(ValueError, match=f"validation_split={fraction} of {n} examples"):
            fit(train=(images, labels), epochs=0, validation_split=fraction)
        return
    # epochs=0 trains nothing but plans the epoch: one step per example at batch size 1.
    _, history = fit(train=(images, labels), epochs=0, batch_size=1, validation_split=fraction)
    assert history.params["steps"] == len(train[1])


class KerasDense(nn.Module):
    """The Flatten + Dense of :func:`keras_dense` as a flax module."""

    @nn.compact
    def __call__(self, x, *, train):
        return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("option", ["class_weight", "sample_weight"])
def test_weighted_loss_and_update_match_keras(option):
    keras = pytest.importorskip("keras")
    images, labels = dataset(12, seed=2)
    value = {"class_weight": {0: 2.0, 2: 0.25, 3: 0.0},
             "sample_weight": np.linspace(0.1, 1.9, 12).astype(np.float32)}[option]
    state = fc.create_train_state(jax.random.key(0), KerasDense(), fc.optim.make("sgd", 0.5),
                                  images[:1])
    dense = state.params["Dense_0"]
    model = keras_dense(keras, np.asarray(dense["kernel"]), np.asarray(dense["bias"]))
    model.compile(keras.optimizers.SGD(0.5),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    theirs = model.fit(images.astype(np.float32) / 255, labels, batch_size=12, epochs=1,
                       shuffle=False, verbose=0, **{option: value})
    # One step on the whole batch: the loss before it and the update itself.
    state, history = fit(state, (images, labels), epochs=1, batch_size=12, **{option: value})
    assert history["loss"][0] == pytest.approx(theirs.history["loss"][0], rel=1e-5)
    np.testing.assert_allclose(state.params["Dense_0"]["kernel"], model.layers[-1].kernel.numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(state.params["Dense_0"]["bias"], model.layers[-1].bias.numpy(),
                               atol=1e-6)


def test_class_weight_on_streamed_batches_weighs_each_example_by_its_class():
    images, labels = dataset()
    class_weight = {1: 3.0, 2: 0.5}
    per_class = np.array([1.0, 3.0, 0.5, 1.0], np.float32)

    def batches(epoch):
        return data.batches(images, labels, BATCH, shuffle=True, seed=1, epoch=epoch)

    def weighted(epoch):
        return ({**b, "weight": per_class[b["label"]]} for b in batches(epoch))

    by_class, _ = fit(train=batches, epochs=1, class_weight=class_weight)
    by_weight, _ = fit(train=weighted, epochs=1)
    plain, _ = fit(train=batches, epochs=1)
    chex.assert_trees_all_close(by_class.params, by_weight.params, rtol=1e-6, atol=1e-7)
    assert not np.allclose(by_class.params["head"]["bias"], plain.params["head"]["bias"])
    with pytest.raises(ValueError, match="class_weight with batches that carry a 'weight'"):
        fit(train=weighted, class_weight=class_weight)


def test_validation_sample_weights_weight_val_loss_only():
    images, labels = dataset(40, seed=1)
    weights = np.random.default_rng(0).uniform(0, 2, 40).astype(np.float32)
    state, history = fit(epochs=1, validation_data=(images, labels, weights))
    logits = np.asarray(fc.predict(state, images), np.float64)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    losses = -log_p[np.arange(40), labels]
    # Keras's sum_over_batch_size: sum(w * loss) / N, not / sum(w).
    assert history["val_loss"][-1] == pytest.approx(np.sum(weights * losses) / 40, rel=1e-5)
    assert history["val_loss"][-1] != pytest.approx(np.mean(losses), rel=1e-3)
    # Keras's metrics= (not weighted_metrics=): the accuracy is not weighted.
    assert history["val_accuracy"][-1] == np.mean(logits.argmax(1) == labels)


def test_weight_options_refuse_bad_values():
    n = len(dataset()[1])
    with pytest.raises(ValueError, match=r"class_weight has the key 7; expected class ids in "
                                         r"\[0, 4\)"):
        fit(class_weight={7: 1.0})
    with pytest.raises(ValueError, match=r"class_weight\[1\]=-1.0; expected a finite number >= 0"):
        fit(class_weight={1: -1.0})
    with pytest.raises(ValueError, match="class_weight and sample_weight together"):
        fit(class_weight={1: 2.0}, sample_weight=np.ones(n))
    with pytest.raises(ValueError, match=rf"sample_weight is float64\[3\]; .* shape \[{n}\]"):
        fit(sample_weight=np.ones(3))
    bad = np.ones(n)
    bad[5] = np.nan
    with pytest.raises(ValueError, match=r"not finite numbers >= 0, e.g. nan at index 5"):
        fit(sample_weight=bad)
    with pytest.raises(ValueError, match="sample_weight needs array train_data"):
        fit(train=lambda epoch: [], sample_weight=np.ones(n))
