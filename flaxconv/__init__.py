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
    evaluation,
    finetune,
    metrics,
    models,
    optim,
    parallel,
    population,
    viz,
)
from flaxconv.evaluation import evaluate
from flaxconv.export import export
from flaxconv.fit import fit

# The population entry points stay reachable here; their home (and __all__) is fc.population.
from flaxconv.population import (  # noqa: F401
    create_population,
    ensemble_predict,
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
    train_step,
    train_step_fn,
)
from flaxconv.viz import summary

__version__ = "0.1.0"

# What each kind of user needs; everything else lives in its submodule.
__all__ = [
    # the script user: build, train, evaluate, save
    "create_train_state",
    "evaluate",
    "export",
    "fit",
    "load_model",
    "predict",
    "save_model",
    "summary",
    "models",
    "optim",
    "data",
    "callbacks",
    # the notebook user: pictures, augmentation, checkpoints, fine-tuning
    "augment",
    "checkpoint",
    "finetune",
    "viz",
    # the researcher: the pure steps (jitted; *_fn un-jitted) and the layers under fit
    "TrainState",
    "add_metrics",
    "eval_step",
    "eval_step_fn",
    "num_params",
    "predict_fn",
    "train_step",
    "train_step_fn",
    "epochs",
    "evaluation",
    "metrics",
    "parallel",
    "population",
]

# Last: the previous release's names, as deprecated aliases (see flaxconv._compat).
from flaxconv import _compat  # noqa: E402

_compat.install()
