"""Transfer learning: an MNIST convnet base under a new head for the 24 Sign Language letters.

    python experiments/finetune.py [--pretrained runs/mnist_convnet] [--target fashion_mnist]

The seed notebooks' recipe, compared against training from scratch on the same budget:

1. base: the conv layers of --pretrained (a fit workdir or checkpoint directory of the same
   --model, e.g. what experiments/mnist_convnet.py writes), else of a --pretrain-epochs
   MNIST run trained here (in <workdir>/pretrain);
2. head: a new classifier for --target trained for --head-epochs with the base frozen;
3. fine-tune: the top conv block unfrozen as well, --finetune-epochs at the low
   --finetune-lr (BatchNorm layers, if the model has them, stay frozen in inference mode);
4. scratch: the same model from a random start, --head-epochs + --finetune-epochs epochs.

Writes results.json (finetuned_test_accuracy, scratch_test_accuracy, frozen_base_unchanged:
the base after step 2 compared bit for bit with the pretrained one), feature_maps.png,
filters.png and the curves into --workdir. Running the same command again resumes.

Transfer pays when the target data are few: with --train-examples 2000 the MNIST base beats
scratch by far, while with all 27,455 Sign Language images two epochs from scratch win
(digit strokes are a weak start for hand shapes, and most of the base stays frozen).
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

import flaxconv as fc
from flaxconv import data, finetune, viz
from flaxconv.experiment import check_flags, cli
from flaxconv.workdir import claim_workdir, write_json

TARGETS = ("sign_language_mnist", "fashion_mnist", "mnist")


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            target="sign_language_mnist",
            pretrained="",  # a workdir or checkpoint directory; empty: pretrain here
            model="dlwp_mnist",
            optimizer="rmsprop",
            pretrain_epochs=1,
            pretrain_lr=1e-3,
            head_epochs=1,
            head_lr=1e-3,
            finetune_epochs=1,
            finetune_lr=1e-4,
            batch_size=64,
            train_examples=0,  # > 0: the first N target training images only
            data_source="auto",  # for MNIST / Fashion-MNIST: "raw", "tfds" or "auto"
            seed=0,
            workdir="runs/finetune",
            verbose="auto",
        )
    )


def load_target(config, split):
    if config.target not in TARGETS:
        raise ValueError(f"--target {config.target!r}; expected one of {list(TARGETS)}")
    if config.target == "sign_language_mnist":
        images, labels = data.load_sign_language_mnist(split)
    else:
        images, labels = data.load(config.target, split, source=config.data_source)
    if split == "train" and config.train_examples:
        images, labels = images[: config.train_examples], labels[: config.train_examples]
    return images, labels


def base_layers(state) -> tuple[str, ...]:
    """The pretrained part: the conv layers and their BatchNorms (the classifier is new)."""
    return tuple(
        name for name in fc.optim.layer_names(state.params) if name.startswith(("conv_", "bn_"))
    )


def pretrain(config) -> str:
    """A short MNIST run of ``config.model``; returns its workdir."""
    workdir = os.path.join(config.workdir, "pretrain")
    images, labels = data.load("mnist", "train", source=config.data_source)
    model = fc.models.get(config.model, num_classes=10)
    tx = fc.optim.make(config.optimizer, config.pretrain_lr)
    state = fc.create_train_state(jax.random.key(config.seed), model, tx, images[:1])
    print(f"== pretrain: {config.model} on MNIST, {config.pretrain_epochs} epoch(s)", flush=True)
    fc.fit(state, (images, labels), config.pretrain_epochs, batch_size=config.batch_size,
           workdir=workdir, verbose=config.verbose)
    return workdir


def phase(name, state, train, epochs, config):
    print(f"== {name}: {epochs} epoch(s)", flush=True)
    settings = {k: v for k, v in config.to_dict().items() if k not in ("verbose", "workdir")}
    return fc.fit(state, train, epochs, batch_size=config.batch_size, verbose=config.verbose,
                  workdir=os.path.join(config.workdir, name), config=settings)


def test_accuracy(state, test) -> float:
    return fc.evaluate(state, *test)["accuracy"]


def variables_of(state, layers) -> dict:
    """The ``layers``' params and batch_stats as numpy copies (fit donates device buffers)."""
    flat = finetune.flat_variables(state)
    return traverse_util.unflatten_dict(
        {path: np.array(v) for path, v in flat.items() if "/".join(path[1:-1]) in layers}
    )


def unchanged(before: dict, state, layers) -> bool:
    """Whether ``layers`` of ``state`` hold, bit for bit, the arrays of ``before``."""
    return not finetune.changed_layers(before, variables_of(state, layers))


def run(config) -> dict:
    check_flags(config)  # the seed and train_examples, before the workdir or any data
    with claim_workdir(config.workdir):  # one run at a time in a workdir
        return _run(config)


def _run(config) -> dict:
    start = time.perf_counter()
    train, test = load_target(config, "train"), load_target(config, "test")
    num_classes = (
        len(data.SIGN_LANGUAGE_CLASSES) if config.target == "sign_language_mnist"
        else data.num_classes(config.target)
    )
    source = config.pretrained or pretrain(config)

    model = fc.models.get(config.model, num_classes=num_classes)
    tx = fc.optim.make(config.optimizer, config.head_lr)
    initial = fc.create_train_state(jax.random.key(config.seed), model, tx, train[0][:1])
    base = base_layers(initial)
    top = max((n for n in base if n.startswith("conv_")), key=lambda n: int(n.split("_")[1]))
    # The base from the checkpoint under a new, randomly initialized, head. The scratch run
    # gets its own copy of the initial arrays: fit donates (frees) those it is given.
    scratch = jax.tree.map(jnp.copy, initial)
    state = fc.checkpoint.restore_params(source, initial, include=base)
    pretrained = variables_of(state, base)

    # 1. The new head on the frozen base.
    state = finetune.freeze_state(state, fc.optim.make(config.optimizer, config.head_lr), base)
    print(viz.summary(state, frozen=base), flush=True)
    state, head_history = phase("head", state, train, config.head_epochs, config)
    frozen_base_unchanged = unchanged(pretrained, state, base)
    head_accuracy = test_accuracy(state, test)

    # 2. The top conv block too, at a low learning rate; BatchNorm statistics stay frozen.
    still_frozen = tuple(name for name in base if name != top)
    before = variables_of(state, still_frozen)
    state = finetune.freeze_state(
        state, fc.optim.make(config.optimizer, config.finetune_lr), still_frozen
    )
    state, tune_history = phase("finetune", state, train, config.finetune_epochs, config)
    frozen_unchanged_after_finetune = unchanged(before, state, still_frozen)
    finetuned_accuracy = test_accuracy(state, test)

    # 3. The control: the same model and budget from a random start.
    budget = config.head_epochs + config.finetune_epochs
    scratch, scratch_history = phase("scratch", scratch, train, budget, config)
    scratch_accuracy = test_accuracy(scratch, test)

    viz.feature_maps(state, test[0][:2], os.path.join(config.workdir, "feature_maps.png"),
                     layers=("conv_*", "pool_*"), channels=8)
    viz.filters(state, os.path.join(config.workdir, "filters.png"), "conv_0")
    history = {k: head_history.get(k, []) + tune_history.get(k, []) for k in head_history}
    if history:
        viz.plot_history(history, os.path.join(config.workdir, "curves_finetuned.png"))
    if scratch_history:
        viz.plot_history(scratch_history, os.path.join(config.workdir, "curves_scratch.png"))

    results = {
        "finetuned_test_accuracy": finetuned_accuracy,
        "scratch_test_accuracy": scratch_accuracy,
        "head_only_test_accuracy": head_accuracy,
        "frozen_base_unchanged": frozen_base_unchanged,
        "frozen_unchanged_after_finetune": frozen_unchanged_after_finetune,
        "base_layers": list(base),
        "unfrozen_in_finetune": top,
        "pretrained_from": os.path.abspath(source),
        "target": config.target,
        "train_examples": len(train[1]),
        "test_examples": len(test[1]),
        "seconds": time.perf_counter() - start,
        "backend": jax.default_backend(),
        "config": config.to_dict(),
        "history": {"head": head_history, "finetune": tune_history, "scratch": scratch_history},
    }
    write_json(os.path.join(config.workdir, "results.json"), results)
    print(
        f"{config.target}: finetuned {finetuned_accuracy:.4f} (head only {head_accuracy:.4f}) "
        f"vs scratch {scratch_accuracy:.4f} after {budget} epoch(s); frozen base unchanged: "
        f"{frozen_base_unchanged}",
        flush=True,
    )
    return results


if __name__ == "__main__":
    sys.exit(cli(get_config(), __doc__, run=run))
