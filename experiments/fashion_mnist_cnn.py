"""Fashion-MNIST: the notebook's small convnet (fashion_cnn) for 5 epochs, >= 91% test
accuracy, beside the dense baseline trained with the same recipe.

    python experiments/fashion_mnist_cnn.py [--schedule cosine] [--baseline ""] [--workdir runs/x]

The notebook's recipe (Adam at 1e-3, batch 32, 5 epochs) gives 89.2% with Keras (90.5% here,
--schedule constant --learning-rate 1e-3 --batch-size 32 --weight-decay 0). Same model, same
5 epochs; the recipe changes: a one-cycle learning-rate schedule (a quarter of the steps up
to --learning-rate 5e-3, then cosine down to ~0), batch 64, and AdamW's decoupled weight
decay 1e-4: 91.2-91.3% over two seeds on an H200, 91.4% on CPU.

Writes <workdir>/fashion_cnn/ and <workdir>/dense/ (each a full run: checkpoints, history,
curves) and <workdir>/results.json: test_accuracy is the CNN's, with the baseline's beside it.
"""

import os
import sys

import optax

from flaxconv import optim
from flaxconv.experiment import (
    cli,
    default_config,
    load_datasets,
    train_and_evaluate,
    train_steps,
)
from flaxconv.workdir import write_json

SCHEDULES = ("onecycle", "cosine", "constant")


def get_config():
    return default_config(
        dataset="fashion_mnist", model="fashion_cnn", workdir="runs/fashion_mnist_cnn",
        optimizer="adam", learning_rate=5e-3,  # the peak of the one-cycle schedule
        schedule="onecycle", weight_decay=1e-4,
        baseline="dense",  # "" skips it
    )


def schedule(config, steps: int):
    """The learning rate per step for ``steps`` optimizer steps in all."""
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(steps, config.learning_rate, pct_start=0.25)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, warmup_steps=steps // 10, decay_steps=steps
        )
    if config.schedule == "constant":
        return config.learning_rate
    raise ValueError(f"--schedule {config.schedule!r}; expected one of {list(SCHEDULES)}")


def run(config):
    datasets = load_datasets(config)
    steps = train_steps(config, datasets)
    options = {"weight_decay": config.weight_decay} if config.weight_decay else {}
    runs = {}
    for name, model in (("cnn", config.model), ("baseline", config.baseline)):
        if not model:
            continue
        sub = config.copy_and_resolve_references()
        sub.model, sub.workdir = model, os.path.join(config.workdir, model)
        tx = optim.make(config.optimizer, learning_rate=schedule(config, steps), **options)
        runs[name] = train_and_evaluate(sub, datasets=datasets, tx=tx)

    print(f"\n{'model':<12} {'params':>8} {'test_accuracy':>14} {'test_loss':>10} {'train_s':>8}")
    for result in runs.values():
        print(f"{result['config']['model']:<12} {result['num_params']:>8,} "
              f"{result['test_accuracy']:>14.4f} {result['test_loss']:>10.4f} "
              f"{result['train_seconds']:>8.1f}")
    results = {**runs["cnn"], "config": config.to_dict()}
    if "baseline" in runs:
        results["baseline"] = {
            k: runs["baseline"][k]
            for k in ("test_accuracy", "test_loss", "num_params", "train_seconds", "history")
        }
        results["baseline"]["model"] = config.baseline
    write_json(os.path.join(config.workdir, "results.json"), results)
    return results


if __name__ == "__main__":
    sys.exit(cli(get_config(), __doc__, run=run))
