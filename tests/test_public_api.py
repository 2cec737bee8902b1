"""The public surface: every exported name resolves, each renamed name warns once and
stands for its replacement, no name means two things, and each ``*_fn`` has its jitted form."""

import functools
import importlib
import warnings

import jax
import numpy as np
import pytest

import flaxconv as fc
from flaxconv import population as pop

# Every public module with an __all__ (the subpackages' own modules are reached through them).
MODULES = ("flaxconv", "flaxconv.augment", "flaxconv.callbacks", "flaxconv.data",
           "flaxconv.epochs", "flaxconv.evaluation", "flaxconv.export", "flaxconv.finetune",
           "flaxconv.kernels", "flaxconv.metrics", "flaxconv.models", "flaxconv.parallel",
           "flaxconv.population", "flaxconv.saved_model")
# The names that used to mean two things (issue 19), and where each lived.
COLLIDED = ("summary", "summarize", "evaluate", "epoch_plan", "replicate", "freeze",
            "num_classes", "evaluate_fn", "evaluate_arrays")
HOMES = ("flaxconv", "flaxconv.metrics", "flaxconv.epochs", "flaxconv.population",
         "flaxconv.evaluation", "flaxconv.finetune", "flaxconv.parallel", "flaxconv.optim",
         "flaxconv.data", "flaxconv.viz", "flaxconv.steps")


def public(module: str, name: str):
    """``module.name`` unless it is missing or deprecated (None then)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            return getattr(importlib.import_module(module), name)
        except (AttributeError, DeprecationWarning):
            return None


@pytest.mark.parametrize("module", MODULES)
def test_every_exported_name_resolves_without_a_deprecation(module):
    names = importlib.import_module(module).__all__
    assert len(names) == len(set(names)), f"{module}.__all__ lists a name twice"
    missing = [name for name in names if public(module, name) is None]
    assert not missing, f"{module}.__all__ names {missing}, which do not resolve (or warn)"


def test_the_top_level_is_curated():
    # The few names a script, notebook or researcher needs; the rest stay in submodules.
    assert {"fit", "evaluate", "predict", "create_train_state", "train_step", "eval_step",
            "summary", "save_model", "load_model", "export"} <= set(fc.__all__)
    assert not {"summarize", "evaluate_population", "ensemble_evaluate"} & set(fc.__all__)
    assert len(fc.__all__) <= 32


def test_no_public_name_means_two_things():
    for name in COLLIDED:
        found = {module: public(module, name) for module in HOMES}
        found = {module: obj for module, obj in found.items() if obj is not None}
        assert len({id(obj) for obj in found.values()}) <= 1, (
            f"{name!r} is public in {sorted(found)} with different meanings")
    assert fc.evaluate is fc.metrics.evaluate is fc.evaluation.evaluate
    assert public("flaxconv", "summary") is fc.viz.summary
    assert public("flaxconv", "summarize") is None
    # A name exported by two of the central modules is one object.
    central = ("flaxconv", "flaxconv.metrics", "flaxconv.epochs", "flaxconv.population",
               "flaxconv.evaluation")
    owners: dict[str, set[int]] = {}
    for module in central:
        for name in importlib.import_module(module).__all__:
            owners.setdefault(name, set()).add(id(public(module, name)))
    assert not [name for name, ids in owners.items() if len(ids) > 1]


def test_each_fn_has_one_jitted_form():
    for module in ("flaxconv", "flaxconv.epochs", "flaxconv.evaluation", "flaxconv.population"):
        names = set(importlib.import_module(module).__all__)
        for name in names:
            obj = public(module, name)
            if name.endswith("_fn"):
                assert name[:-3] in names and callable(public(module, name[:-3])), (
                    f"{module}.{name} has no public {name[:-3]}")
            elif hasattr(obj, "lower") and hasattr(obj, "trace"):  # a jax.jit function
                assert f"{name}_fn" in names, f"{module}.{name} is jitted but has no {name}_fn"


# (module, old name, the object it stands for now, text the warning names)
RENAMED = [
    ("flaxconv.metrics", "num_classes", lambda: fc.metrics.model_classes, "model_classes"),
    ("flaxconv.population", "replicate", lambda: pop.replicate_data, "replicate_data"),
    ("flaxconv.finetune", "freeze", lambda: fc.finetune.freeze_state, "freeze_state"),
]
# Old entry points whose results keep their old form (raw sums) through the engine.
LEGACY = [
    ("flaxconv", "summarize", "flaxconv.metrics.compute"),
    ("flaxconv.steps", "summarize", "flaxconv.metrics.compute"),
    ("flaxconv.epochs", "evaluate", "fc.evaluate"),
    ("flaxconv.epochs", "evaluate_fn", "evaluate_sums_fn"),
    ("flaxconv.epochs", "evaluate_arrays", "evaluate_sums"),
    ("flaxconv", "evaluate_population", "fc.evaluate"),
    ("flaxconv.population", "evaluate_population", "fc.evaluate"),
    ("flaxconv", "ensemble_evaluate", "ensemble=True"),
    ("flaxconv.population", "ensemble_evaluate", "ensemble=True"),
    ("flaxconv.population", "ensemble_evaluate_fn", "ensemble=True"),
]


def old(module: str, name: str, names: str):
    with pytest.warns(DeprecationWarning, match=f"{module}.{name} is deprecated.*{names}"):
        return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("module, name, new, names", RENAMED)
def test_renamed_names_warn_and_are_the_new_object(module, name, new, names):
    assert old(module, name, names) is new()


@pytest.mark.parametrize("module, name, names", LEGACY)
def test_old_entry_points_warn_naming_the_new_one(module, name, names):
    assert callable(old(module, name, names))
    with pytest.raises(AttributeError, match="has no attribute 'evaluate_everything'"):
        importlib.import_module(module).evaluate_everything  # noqa: B018


@functools.cache
def _data():
    model = fc.models.get("dense", num_classes=5, hidden=(8,))
    tx = fc.optim.make("adam")
    x = np.zeros((1, 6, 6, 1), np.uint8)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 6, 6, 1), dtype=np.uint8)
    labels = rng.integers(0, 5, 37).astype(np.int32)
    states = pop.create_population(pop.keys_from_seeds([0, 1]), model, tx, x)
    return states, images, labels


def test_old_entry_points_give_the_engine_numbers():
    states, images, labels = _data()
    state = pop.select_member(states, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sums = fc.epochs.evaluate(state, images, labels, batch_size=16)
        members = fc.evaluate_population(states, images, labels, batch_size=16)
        finished = fc.summarize(members)
    new = fc.evaluate(state, images, labels, ("loss", "accuracy", "confusion"), batch_size=16)
    assert float(sums["count"]) == 37 and float(sums["invalid_labels"]) == 0
    assert float(sums["correct"]) / 37 == new["accuracy"]
    assert float(sums["loss_sum"]) / 37 == pytest.approx(new["loss"], rel=1e-6)
    np.testing.assert_array_equal(sums["confusion"], new["confusion"])
    assert finished["accuracy"][1] == new["accuracy"]
    assert finished.keys() == {"loss", "accuracy"}
    per_member = fc.evaluate(states, images, labels, batch_size=16)
    np.testing.assert_allclose(finished["loss"], per_member["loss"], rtol=1e-6)
    # The population's classes come from one member's logits.
    assert fc.metrics.model_classes(states) == fc.metrics.model_classes(state) == 5
    assert jax.tree.leaves(states)[0].shape[0] == 2
    # Old callers that finished fc.evaluate's sums keep working on its numbers.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert fc.summarize(new) == {"loss": new["loss"], "accuracy": new["accuracy"]}
