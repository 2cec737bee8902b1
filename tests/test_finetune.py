"""Fine-tuning: freezing by layer name, frozen BatchNorm, partial restore from checkpoints."""

import functools
import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxconv as fc
from flaxconv import finetune

SHAPE = (12, 12, 1)  # small images keep these tests fast; the layers are a real ConvStack's
ADAM = optax.adam(1e-2)  # one object, so that steps of equal structure compile once


@functools.lru_cache
def make_state(num_classes=3, batch_norm=True):
    """Cached: states are immutable, and every new one costs a compilation."""
    model = fc.models.get(
        "dlwp_mnist", num_classes=num_classes, features=(4, 8), batch_norm=batch_norm
    )
    return fc.create_train_state(jax.random.key(0), model, ADAM, np.zeros((1, *SHAPE)))


def batch(n=16, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8),
        "label": rng.integers(0, classes, n).astype(np.int32),
    }


def train(state, steps=2):
    for i in range(steps):
        state, _ = fc.train_step(state, batch(seed=i))
    return state


def params_only(state):
    return {"params": state.params}


def with_tx(state, tx):
    return state.replace(tx=tx, opt_state=tx.init(state.params))


def test_frozen_params_get_no_update_and_no_optimizer_state():
    state = with_tx(make_state(), fc.optim.make("adam", 1e-2, frozen=("conv_*", "bn_*")))
    trained = train(state)
    assert finetune.changed_layers(params_only(state), params_only(trained)) == ["head"]
    # The optimizer alone does not stop BatchNorm statistics (finetune.freeze does).
    assert finetune.changed_layers(state, trained) == ["bn_0", "bn_1", "head"]
    # Adam keeps two moments, for the trainable (head) leaves only.
    moments = sum(int(np.size(x)) for x in jax.tree.leaves(trained.opt_state) if np.ndim(x))
    assert moments == 2 * fc.num_params(state.params["head"])
    # The injected learning rate stays where callbacks and populations look for it.
    assert float(trained.opt_state.hyperparams["learning_rate"]) == pytest.approx(1e-2)


def test_freeze_wraps_any_optimizer_and_its_learning_rate_stays_reachable():
    tx = fc.optim.freeze(fc.optim.make("sgd", 0.1, momentum=0.9), "conv_0")
    state = with_tx(make_state(batch_norm=False), tx)
    trained = train(state)
    assert finetune.changed_layers(state, trained) == ["conv_1", "head"]
    assert float(trained.opt_state.hyperparams["learning_rate"]) == pytest.approx(0.1)
    stopped = trained.replace(opt_state=fc.optim.set_learning_rate(trained.opt_state, 0.0))
    assert float(fc.optim.learning_rate(stopped.opt_state)) == 0.0
    # A zero learning rate stops the momentum updates too: nothing changes any more.
    assert finetune.changed_layers(stopped, train(stopped)) == []

    # The learning rate is found inside other wrappers too.
    nested = optax.chain(optax.clip(1.0), fc.optim.make("adam", 0.5))
    opt_state = fc.optim.set_learning_rate(nested.init(state.params), 0.25)
    assert float(fc.optim.learning_rate(opt_state)) == 0.25


def test_a_pattern_that_matches_nothing_lists_the_layers():
    params = make_state().params
    with pytest.raises(ValueError, match=r"\['dense_\*'\] match no layer.*conv_0.*head"):
        fc.optim.make("rmsprop", frozen=("conv_*", "dense_*")).init(params)
    with pytest.raises(ValueError, match=r"conv_9.*the layers are \['bn_0'"):
        finetune.freeze_state(make_state(), ADAM, "conv_9")
    with pytest.raises(TypeError, match="layer-name patterns"):
        fc.optim.make("adam", frozen=("conv_0", 3))


def test_frozen_batch_norm_runs_in_inference_mode_then_the_top_block_unfreezes():
    state = train(make_state())  # moving statistics away from their initial values
    frozen = finetune.freeze_state(state, ADAM, ("conv_*", "bn_*"))
    assert frozen.model.frozen_batch_norm == ("bn_0", "bn_1")
    after, metrics = fc.train_step(frozen, batch(seed=5))
    assert finetune.changed_layers(frozen, after) == ["head"]
    # Inference-mode BatchNorm: the training forward pass is the evaluation one.
    evaluated = fc.eval_step(frozen, batch(seed=5))
    np.testing.assert_allclose(metrics["loss_sum"], evaluated["loss_sum"], rtol=1e-5)
    # The control: the unfrozen model normalizes by batch statistics, so the losses differ.
    _, free_metrics = fc.train_step(state, batch(seed=5))
    assert abs(float(free_metrics["loss_sum"]) - float(evaluated["loss_sum"])) > 1e-3

    # Phase two: the top conv block trains, BatchNorm statistics stay as they were.
    top = finetune.freeze_state(after, optax.adam(1e-4), ("conv_0", "bn_*"))
    assert top.model.frozen_batch_norm == ("bn_0", "bn_1")
    trained = train(top)
    assert finetune.changed_layers(top, trained) == ["conv_1", "head"]
    assert int(trained.step) == int(state.step) + 3


def test_convstack_rejects_unknown_frozen_batch_norm_names():
    model = fc.models.get("dlwp_mnist", features=(4, 8), frozen_batch_norm=("bn_0",))
    with pytest.raises(ValueError, match=r"\['bn_0'\].*expected some of \[\]"):
        model.init(jax.random.key(0), np.zeros((1, *SHAPE)), train=False)


def test_freezing_batch_norm_of_a_model_without_the_field_is_an_error():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            x = nn.BatchNorm(use_running_average=not train, name="bn")(x.reshape(len(x), -1))
            return nn.Dense(3, name="head")(x)

    state = fc.create_train_state(jax.random.key(0), Net(), ADAM, np.zeros((1, *SHAPE)))
    with pytest.raises(ValueError, match=r"\['bn'\] needs a model with a frozen_batch_norm"):
        finetune.freeze_state(state, ADAM, "bn")
    assert finetune.freeze_state(state, ADAM, "head").model is state.model


def shifted(state, by=0.5):
    """``state`` with every param and statistic moved (as training would move them)."""
    return state.replace(
        params=jax.tree.map(lambda x: x + by, state.params),
        batch_stats=jax.tree.map(lambda x: x + by, state.batch_stats),
    )


def test_restore_params_puts_a_saved_backbone_under_a_new_head(tmp_path):
    source = shifted(make_state())  # 3 classes
    fc.checkpoint.save_state(tmp_path / "run" / "checkpoints", source)
    target = make_state(num_classes=24)
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoints"):  # a workdir or its ckpts
        restored = fc.checkpoint.restore_params(where, target, include=("conv_*", "bn_*"))
        assert finetune.changed_layers(source, restored) == ["head"]
        assert finetune.changed_layers(target, restored) == ["bn_0", "bn_1", "conv_0", "conv_1"]
        assert restored.opt_state is target.opt_state


def test_restore_params_names_the_layer_and_both_shapes(tmp_path):
    fc.checkpoint.save_state(tmp_path, make_state())
    target = make_state(num_classes=24)
    with pytest.raises(ValueError, match=r"params/head/kernel has shape \(72, 3\) there but "
                                         r"\(72, 24\) in the model"):
        fc.checkpoint.restore_params(tmp_path, target)
    with pytest.raises(ValueError, match=r"conv_7.*the layers are"):
        fc.checkpoint.restore_params(tmp_path, target, include="conv_7")
    with pytest.raises(ValueError, match=r"\['params/conv_0/bias', 'params/conv_1/bias'\] are "
                                         r"not there"):
        fc.checkpoint.restore_params(tmp_path, make_state(batch_norm=False), include="conv_*")
    with pytest.raises(FileNotFoundError, match="no checkpoint 7 under"):
        fc.checkpoint.restore_params(tmp_path, target, include="conv_*", epoch=7)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fc.checkpoint.restore_params(tmp_path / "nothing", target)


def test_copy_layers_in_memory_checks_structure():
    source, target = shifted(make_state()), make_state(num_classes=24)
    copied = finetune.copy_layers(source, target, ("conv_*", "bn_*"))
    assert finetune.changed_layers(source, copied) == ["head"]
    assert finetune.changed_layers(target, copied) == ["bn_0", "bn_1", "conv_0", "conv_1"]
    no_bn = make_state(batch_norm=False)  # its convs have biases, and no BatchNorm
    with pytest.raises(ValueError, match=r"\['params/conv_0/bias', 'params/conv_1/bias'\] are "
                                         r"not there"):
        finetune.copy_layers(source, no_bn, ("conv_*", "head"))
    with pytest.raises(TypeError, match=r"expected a TrainState or .*; got \['bn_0', 'bn_1'"):
        finetune.copy_layers(source.params, target, "conv_*")


def test_changed_layers_compares_bits():
    a = {"params": {"l": {"w": np.array([0.0, 1.0], np.float32)}}}
    b = {"params": {"l": {"w": np.array([-0.0, 1.0], np.float32)}}}  # equal, not the same bits
    assert finetune.changed_layers(a, a) == []
    assert finetune.changed_layers(a, b) == ["l"]


def test_fit_checkpoints_and_resumes_a_frozen_state(tmp_path):
    frozen = finetune.freeze_state(make_state(), ADAM, ("conv_*", "bn_*"))
    fresh = lambda: jax.tree.map(jnp.copy, frozen)  # noqa: E731 - fit donates its input
    data = batch(40)
    arrays = (data["image"], data["label"])
    run = functools.partial(fc.fit, train_data=arrays, batch_size=16, verbose="silent")
    once, _ = run(fresh(), epochs=1, workdir=tmp_path)
    assert finetune.changed_layers(make_state(), once) == ["head"]
    resumed, _ = run(fresh(), epochs=2, workdir=tmp_path)
    straight, _ = run(fresh(), epochs=2)
    assert finetune.changed_layers(resumed, straight) == []
    assert finetune.changed_layers(make_state(), resumed) == ["head"]


def _finetune_experiment():
    path = Path(__file__).resolve().parents[1] / "experiments" / "finetune.py"
    spec = importlib.util.spec_from_file_location("finetune_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags, message", [
    (["--seed", "4294967296"], "error: seed=4294967296; expected an integer from 0 to 4294967295"),
    (["--train-examples", "-5"], "error: train_examples=-5; expected 0 (the whole training"),
])
def test_finetune_experiment_checks_its_flags_before_any_data_or_workdir(
    tmp_path, capsys, flags, message
):
    module = _finetune_experiment()
    workdir = tmp_path / "run"
    argv = ["--workdir", str(workdir), "--target", "no_such_target", *flags]
    assert module.cli(module.get_config(), "", argv, run=module.run) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(message)
    assert not workdir.exists()
