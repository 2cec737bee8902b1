"""Keras's callbacks on fit's protocol: stopping, best weights, checkpoints, learning-rate
plateaus, TensorBoard scalars, and their state carried across a resume; ModelCheckpoint's
Keras options against Keras itself."""

import functools
import glob
import logging
import os
import struct

import chex
import jax
import numpy as np
import optax
import pytest
from tiny_data import pixel_dataset

import flaxconv as fc
from flaxconv.callbacks import (
    Callback,
    EarlyStopping,
    ModelCheckpoint,
    ReduceLROnPlateau,
    StopAtThreshold,
    TensorBoard,
)
from flaxconv.checkpoint import Checkpoints, load_state

CLASSES = 4
MODEL = fc.models.get("dense", num_classes=CLASSES, hidden=(16,))
TX = fc.optim.make("adam", learning_rate=1e-2)  # one object: jitted epochs compile once


def dataset(n=64, seed=0):
    return pixel_dataset(n, CLASSES, seed)


@functools.cache
def _initial(tx=TX):
    return fc.create_train_state(jax.random.key(0), MODEL, tx, np.zeros((1, 8, 8, 1)))


def new_state(tx=TX):
    """A fresh copy of the initial state (fit donates the buffers of the state it gets)."""
    return jax.tree.map(lambda x: x.copy(), _initial(tx))


def fit(callbacks, epochs, state=None, **kwargs):
    kwargs.setdefault("verbose", "silent")
    return fc.fit(
        new_state() if state is None else state, dataset(), epochs, batch_size=16,
        callbacks=callbacks, **kwargs,
    )


class Script(Callback):
    """Puts ``logs["score"] = scores[epoch]`` for the callbacks after it to monitor."""

    def __init__(self, scores):
        self.scores = scores

    def on_epoch_end(self, epoch, logs, state):
        logs["score"] = self.scores[epoch]


@functools.cache
def params_after(epochs):
    return fit([], epochs)[0].params


def test_early_stopping_stops_after_patience_and_restores_the_best_weights():
    stopper = EarlyStopping("score", mode="min", patience=2, restore_best_weights=True)
    state, history = fit([Script([3, 1, 2, 2, 2, 2]), stopper], 6)
    assert history["score"] == [3, 1, 2, 2]  # epochs 3 and 4 did not improve on epoch 2
    assert stopper.stopped_epoch == 3 and stopper.best_epoch == 1
    chex.assert_trees_all_equal(state.params, params_after(2))


def test_early_stopping_resumes_with_its_patience_and_best_weights(tmp_path):
    scores = [3, 1, 2, 2, 2, 2]

    def callbacks():
        stopper = EarlyStopping("score", mode="min", patience=2, restore_best_weights=True)
        return [Script(scores), stopper]

    fit(callbacks(), 3, workdir=tmp_path)  # epoch 3 ends with one epoch of patience spent
    state, history = fit(callbacks(), 6, workdir=tmp_path)
    # Restarted afresh it would have counted from epoch 4 and run to the end.
    assert history["score"] == [3, 1, 2, 2]
    chex.assert_trees_all_equal(state.params, params_after(2))  # kept in the checkpoint
    # The stopped run, run again, trains no more.
    _, again = fit(callbacks(), 6, workdir=tmp_path)
    assert again["score"] == [3, 1, 2, 2]


def test_early_stopping_min_delta_and_baseline():
    stopper = EarlyStopping("score", mode="max", patience=1, min_delta=0.1)
    _, history = fit([Script([0.5, 0.55, 0.58, 0.9]), stopper], 4)
    assert len(history["score"]) == 2  # +0.05 is no improvement with min_delta=0.1
    scores = [0.5, 0.5, 0.8, 0.9]
    _, history = fit([Script(scores), EarlyStopping("score", mode="max", patience=2)], 4)
    assert len(history["score"]) == 4
    stopper = EarlyStopping("score", mode="max", patience=2, baseline=0.7)
    _, history = fit([Script(scores), stopper], 4)
    assert len(history["score"]) == 2  # epoch 1 did not reset the wait: below the baseline


def test_stop_at_threshold():
    _, history = fit([StopAtThreshold("loss", value=10.0, verbose=0)], 5)
    assert len(history["loss"]) == 1  # the loss starts below 10
    _, history = fit([StopAtThreshold("accuracy", value=1.01, verbose=0)], 3)
    assert len(history["loss"]) == 3  # never reached
    with pytest.raises(ValueError, match="value=nan"):
        StopAtThreshold("loss", value=float("nan"))


def test_reduce_lr_on_plateau_lowers_the_injected_learning_rate(tmp_path):
    scores = [1.0] * 7

    def callbacks():
        plateau = ReduceLROnPlateau("score", factor=0.5, patience=2, mode="min", min_lr=2e-3)
        return [Script(scores), plateau]

    state, history = fit(callbacks(), 7)
    # logs["lr"] is the rate an epoch trained with; reductions after epochs 3, 5 and 7.
    expected = np.float32([1e-2, 1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3]).tolist()
    assert np.float32(history["lr"]).tolist() == expected
    assert float(fc.optim.learning_rate(state.opt_state)) == np.float32(2e-3)  # min_lr
    # Killed after epoch 2 and resumed: its wait counter carries over.
    fit(callbacks(), 2, workdir=tmp_path)
    resumed, resumed_history = fit(callbacks(), 7, workdir=tmp_path)
    assert resumed_history["lr"] == history["lr"]
    chex.assert_trees_all_equal(resumed.params, state.params)


def test_reduce_lr_on_plateau_refuses_a_schedule_and_bad_settings():
    schedule = fc.optim.make("adam", learning_rate=optax.linear_schedule(1e-2, 1e-3, 100))
    with pytest.raises(ValueError, match="needs a constant learning rate"):
        fit([ReduceLROnPlateau("loss")], 1, state=new_state(schedule))
    with pytest.raises(ValueError, match="factor=1.0"):
        ReduceLROnPlateau(factor=1.0)


def test_model_checkpoint_keeps_the_best_epochs(tmp_path):
    directory = tmp_path / "best"
    saver = ModelCheckpoint(directory, monitor="score", mode="max", save_best_only=True,
                            max_to_keep=2)
    fit([Script([0.1, 0.5, 0.3, 0.7, 0.6]), saver], 5)
    checkpoints = Checkpoints(directory, max_to_keep=None)
    assert checkpoints.epochs() == [1, 3]  # saved 0, 1 and 3; kept the best two
    checkpoints.close()
    state, meta = load_state(directory, new_state())
    assert meta["epoch"] == 3 and meta["logs"]["score"] == 0.7
    assert int(state.step) == 4 * 4


def test_model_checkpoint_every_epoch_into_the_workdir(tmp_path):
    fit([ModelCheckpoint(max_to_keep=None)], 3, workdir=tmp_path)
    assert sorted(p.split("/")[-1] for p in glob.glob(f"{tmp_path}/model_checkpoint/*")) == [
        "0", "1", "2"
    ]
    state, _ = load_state(tmp_path / "model_checkpoint", new_state())
    chex.assert_trees_all_equal(state.params, params_after(3))
    with pytest.raises(ValueError, match="needs a directory"):
        fit([ModelCheckpoint()], 1)


def keras_fit(keras, tmp_path, callbacks, epochs, n=10, batch_size=2):
    """A tiny Keras model fitted with ``callbacks``."""
    images, labels = dataset(n)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(CLASSES)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images / 255.0, labels, batch_size=batch_size, epochs=epochs, verbose=0,
              callbacks=callbacks)


def saved_metas(directory, weights_only=True):
    """{checkpoint number: its metadata} of a ModelCheckpoint directory."""
    checkpoints = Checkpoints(directory, max_to_keep=None)
    try:
        template = new_state().replace(opt_state=None) if weights_only else new_state()
        return {n: checkpoints.restore(n, template)[1] for n in checkpoints.epochs()}
    finally:
        checkpoints.close()


def test_model_checkpoint_initial_value_threshold_saves_the_epochs_keras_saves(tmp_path):
    keras = pytest.importorskip("keras")
    scores = [0.3, 0.5, 0.45, 0.6, 0.2]

    class KerasScript(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["score"] = scores[epoch]

    options = dict(monitor="score", mode="max", save_best_only=True, save_weights_only=True,
                   initial_value_threshold=0.4)
    keras_saver = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "keras" / "epoch{epoch}.weights.h5"), **options)
    keras_fit(keras, tmp_path, [KerasScript(), keras_saver], len(scores))
    keras_epochs = sorted(int(name[5:-11]) for name in os.listdir(tmp_path / "keras"))
    fit([Script(scores), ModelCheckpoint(tmp_path / "ours", max_to_keep=None, **options)],
        len(scores))
    ours = sorted(meta["epoch"] + 1 for meta in saved_metas(tmp_path / "ours").values())
    assert ours == keras_epochs == [2, 4]  # 0.3 is below the threshold, 0.45 below 0.5


def test_model_checkpoint_save_freq_saves_the_steps_keras_saves(tmp_path):
    keras = pytest.importorskip("keras")
    # 10 examples in batches of 2: 5 steps an epoch; a save every 3 steps, across epochs.
    keras_saver = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "keras" / "e{epoch}-b{batch}.weights.h5"), save_freq=3,
        save_weights_only=True)
    keras_fit(keras, tmp_path, [keras_saver], 3)
    saver = ModelCheckpoint(tmp_path / "ours", save_freq=3, max_to_keep=None)
    state, _ = fc.fit(new_state(), dataset(10), 3, batch_size=2, callbacks=[saver],
                      verbose="silent")
    metas = saved_metas(tmp_path / "ours", weights_only=False)
    ours = {f"e{m['epoch'] + 1}-b{m['batch'] + 1}.weights.h5" for m in metas.values()}
    assert ours == set(os.listdir(tmp_path / "keras"))
    assert sorted(metas) == [3, 6, 9, 12, 15]  # named by the global step
    # The cut epochs train exactly as whole ones; step 15 is the end of training.
    plain, _ = fc.fit(new_state(), dataset(10), 3, batch_size=2, verbose="silent")
    chex.assert_trees_all_close(state.params, plain.params, rtol=1e-6, atol=1e-7)
    last, _ = load_state(tmp_path / "ours", new_state())
    chex.assert_trees_all_equal(last.params, state.params)


def test_step_saves_of_the_best_loss_and_no_recompilation(tmp_path, caplog):
    fc.fit(new_state(), dataset(10), 2, batch_size=2, verbose="silent",
           callbacks=[ModelCheckpoint(tmp_path / "warm", save_freq=3)])
    # Other cuts of the same epochs (here a first piece of 4 steps, unseen before) reuse
    # the compiled loop: the cut steps are traced, not static.
    saver = ModelCheckpoint(tmp_path / "best", monitor="loss", save_best_only=True,
                            save_weights_only=True, save_freq=4, max_to_keep=None)
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        jax.jit(lambda probe: probe + 1)(1.0)  # a new function: the log shows compilations
        fc.fit(new_state(), dataset(10), 4, batch_size=2, verbose="silent", callbacks=[saver])
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert any("<lambda>" in m for m in compiled), compiled
    assert not [m for m in compiled if "train" in m], compiled
    losses = [meta["logs"]["loss"] for _, meta in sorted(saved_metas(tmp_path / "best").items())]
    assert len(losses) >= 2 and all(b < a for a, b in zip(losses, losses[1:], strict=False))


def test_model_checkpoint_save_weights_only_leaves_out_the_optimizer_state(tmp_path):
    state, _ = fit([ModelCheckpoint(tmp_path / "full", monitor="loss"),
                    ModelCheckpoint(tmp_path / "weights", save_weights_only=True)], 2)
    full, meta = load_state(tmp_path / "full", new_state())
    chex.assert_trees_all_equal(full.opt_state, state.opt_state)
    assert meta["weights_only"] is False
    # Restoring with a template without optimizer state only works if none was saved.
    weights, meta = load_state(tmp_path / "weights", new_state().replace(opt_state=None))
    assert weights.opt_state is None and meta["weights_only"] is True
    chex.assert_trees_all_equal(weights.params, state.params)
    # Keras's load_weights: the variables into a state that keeps its own optimizer.
    loaded = fc.checkpoint.restore_params(tmp_path / "weights", new_state())
    chex.assert_trees_all_equal(loaded.params, state.params)
    chex.assert_trees_all_equal(loaded.opt_state, new_state().opt_state)
    # Into a full template: one clear error, and the checkpoint stays where it is.
    with pytest.raises(fc.checkpoint.WeightsOnlyCheckpointError, match="holds weights only"):
        load_state(tmp_path / "weights", new_state())
    assert not os.path.exists(f"{tmp_path / 'weights'}.corrupt")
    assert load_state(tmp_path / "weights", new_state().replace(opt_state=None))[0] is not None


def test_model_checkpoint_refuses_bad_options():
    for bad in ("batch", 0, -3, True, 2.5):
        with pytest.raises(ValueError, match=rf"save_freq={bad!r}; expected 'epoch' or a "
                                             r"positive integer"):
            ModelCheckpoint("d", save_freq=bad)
    with pytest.raises(ValueError, match=r"initial_value_threshold=nan; expected a finite"):
        ModelCheckpoint("d", save_best_only=True, initial_value_threshold=float("nan"))
    with pytest.raises(ValueError, match="only applies with save_best_only=True"):
        ModelCheckpoint("d", initial_value_threshold=0.5)
    with pytest.raises(ValueError, match="validation metrics exist only at epoch ends"):
        ModelCheckpoint("d", monitor="val_loss", save_best_only=True, save_freq=10)

    class EveryZeroSteps(Callback):
        batch_interval = 0

    with pytest.raises(ValueError, match=r"EveryZeroSteps.batch_interval=0; expected a positive"):
        fit([EveryZeroSteps()], 1)


def _scalars(directory):
    """{tag: {step: value}} from the TensorBoard event files in ``directory``."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in glob.glob(f"{directory}/events.out.tfevents.*"):
        raw = open(path, "rb").read()
        at = 0
        while at < len(raw):
            (length,) = struct.unpack("<Q", raw[at : at + 8])
            event = event_pb2.Event.FromString(raw[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_tensorboard_writes_train_and_validation_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    _, history = fit([TensorBoard()], 2, workdir=tmp_path, validation_data=dataset(32, 1))
    train = _scalars(tmp_path / "tensorboard" / "train")
    validation = _scalars(tmp_path / "tensorboard" / "validation")
    assert train["epoch_loss"] == {0: pytest.approx(history["loss"][0]),
                                   1: pytest.approx(history["loss"][1])}
    assert validation["epoch_accuracy"] == {0: pytest.approx(history["val_accuracy"][0]),
                                            1: pytest.approx(history["val_accuracy"][1])}
    assert set(train) >= {"epoch_accuracy", "epoch_lr"} and "epoch_val_loss" not in train


def test_monitor_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"monitors 'val_loss'.*\['accuracy', .*validation"):
        fit([EarlyStopping("val_loss")], 1)
    with pytest.raises(ValueError, match="cannot tell whether 'score'"):
        EarlyStopping("score")
    with pytest.raises(ValueError, match="mode='up'"):
        EarlyStopping("loss", mode="up")
    with pytest.raises(ValueError, match="patience=-1"):
        EarlyStopping("loss", patience=-1)


def test_a_user_callback_needs_only_the_methods_it_uses():
    class Recorder:  # no base class: the protocol is duck-typed
        def __init__(self):
            self.seen = []

        def on_epoch_end(self, epoch, logs, state):
            self.seen.append((epoch, int(state.step), round(logs["loss"], 6)))

    class StopAfterTwo(Callback):
        def on_epoch_end(self, epoch, logs, state):
            self.stop_training = epoch == 1

    recorder = Recorder()
    _, history = fit([recorder, StopAfterTwo()], 5)
    assert recorder.seen == [(0, 4, round(history["loss"][0], 6)),
                             (1, 8, round(history["loss"][1], 6))]
