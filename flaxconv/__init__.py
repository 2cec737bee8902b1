"""flaxconv: convolutional image classifiers as pure, jitted JAX functions.

>>> import jax, flaxconv as fc
>>> model = fc.models.get("dlwp_mnist")
>>> tx = fc.optim.make("rmsprop", learning_rate=1e-3)
>>> state = fc.create_train_state(jax.random.key(0), model, tx, images[:1])
>>> state, metrics = fc.train_step(state, {"image": images, "label": labels})
"""

from flaxconv import (
    augment,
    callbacks,
    checkpoint,
    data,
    epochs,
    finetune,
    metrics,
    models,
    optim,
    parallel,
    population,
    viz,
)
from flaxconv.epochs import evaluate
from flaxconv.export import export
from flaxconv.fit import fit
from flaxconv.population import (
    create_population,
    ensemble_evaluate,
    ensemble_predict,
    evaluate_population,
    per_example_grads,
    select_member,
    shard_population,
    train_population_epoch,
)
from flaxconv.saved_model import load_model, save_model
from flaxconv.state import TrainState, create_train_state, num_params
from flaxconv.steps import (
    add_metrics,
    eval_step,
    eval_step_fn,
    predict,
    predict_fn,
    summarize,
    train_step,
    train_step_fn,
)
from flaxconv.viz import summary

__version__ = "0.1.0"

__all__ = [
    "TrainState",
    "add_metrics",
    "augment",
    "callbacks",
    "checkpoint",
    "create_population",
    "create_train_state",
    "data",
    "ensemble_evaluate",
    "ensemble_predict",
    "epochs",
    "evaluate",
    "evaluate_population",
    "eval_step",
    "eval_step_fn",
    "export",
    "finetune",
    "fit",
    "load_model",
    "metrics",
    "models",
    "num_params",
    "optim",
    "parallel",
    "per_example_grads",
    "population",
    "predict",
    "predict_fn",
    "save_model",
    "select_member",
    "shard_population",
    "summarize",
    "summary",
    "train_population_epoch",
    "train_step",
    "train_step_fn",
    "viz",
]
