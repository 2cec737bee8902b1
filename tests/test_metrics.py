"""flaxconv.metrics against plain numpy reference computations, and exact over batch splits;
averages and sample weights against Keras itself."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxconv as fc
from flaxconv import metrics

ALL = ("loss", "accuracy", "top_1", "top_3", "precision", "recall", "f1", "roc_auc", "confusion")
stats = jax.jit(metrics.stats_fn, static_argnames="spec")


def random_logits(n=301, classes=7, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) * scale
    logits[np.arange(n), labels] += scale  # better than chance, not perfect
    return logits.astype(np.float32), labels.astype(np.int32)


# ----------------------------------------------------------------- straightforward references


def reference(logits, labels):
    logits = logits.astype(np.float64)
    n, classes = logits.shape
    pred = logits.argmax(1)
    confusion = np.zeros((classes, classes), np.int64)
    for t, p in zip(labels, pred, strict=True):
        confusion[t, p] += 1
    order = np.argsort(-logits, axis=1)
    top = {k: np.mean([labels[i] in order[i, :k] for i in range(n)]) for k in (1, 3)}
    per_class = {"precision": [], "recall": [], "f1": []}
    present = []
    for c in range(classes):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        per_class["precision"].append(p)
        per_class["recall"].append(r)
        per_class["f1"].append(2 * p * r / (p + r) if p + r else 0.0)
        present.append(np.any(pred == c) or np.any(labels == c))
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    probs = np.exp(log_p)
    aucs = []
    for c in range(classes):  # Mann-Whitney: P(positive scores above negative), ties 1/2
        pos, neg = probs[labels == c, c], probs[labels != c, c]
        if len(pos) and len(neg):
            wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
            aucs.append(wins / (len(pos) * len(neg)))
        else:
            aucs.append(np.nan)
    return {
        "loss": -np.mean(log_p[np.arange(n), labels]),
        "accuracy": np.mean(pred == labels),
        "top_1": top[1],
        "top_3": top[3],
        "confusion": confusion,
        "per_class": {k: np.array(v) for k, v in per_class.items()},
        "macro": {k: np.mean(np.array(v)[present]) for k, v in per_class.items()},
        "roc_auc_per_class": np.array(aucs),
    }


def test_every_metric_matches_the_reference():
    logits, labels = random_logits()
    spec = metrics.spec(ALL)
    sums = jax.device_get(stats(logits, labels, spec=spec))
    got = metrics.compute(sums, spec)
    ref = reference(logits, labels)
    assert got["count"] == len(labels)
    np.testing.assert_array_equal(got["confusion"], ref["confusion"])
    for key in ("accuracy", "top_1", "top_3"):
        assert got[key] == pytest.approx(ref[key], abs=1e-15)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for key in ("precision", "recall", "f1"):
        np.testing.assert_allclose(got[f"{key}_per_class"], ref["per_class"][key], atol=1e-15)
        assert got[key] == pytest.approx(ref["macro"][key], abs=1e-15)
    # ROC AUC from histograms: within its own stated bound of the exact value, and tight.
    _, bounds = metrics.roc_auc_from_histograms(sums["roc_pos"], sums["roc_neg"])
    error = np.abs(got["roc_auc_per_class"] - ref["roc_auc_per_class"])
    assert np.all(error <= bounds + 1e-12)
    assert got["roc_auc_max_error"] < 2e-3
    assert abs(got["roc_auc"] - np.mean(ref["roc_auc_per_class"])) <= got["roc_auc_max_error"]


def test_roc_auc_error_stays_within_the_per_class_bound():
    logits, labels = random_logits(seed=1, classes=5, scale=6.0)
    spec = metrics.spec(["roc_auc"], roc_bins=64)  # coarse bins: a visible error
    sums = jax.device_get(stats(logits, labels, spec=spec))
    auc, bound = metrics.roc_auc_from_histograms(sums["roc_pos"], sums["roc_neg"])
    exact = reference(logits, labels)["roc_auc_per_class"]
    assert np.all(np.abs(auc - exact) <= bound + 1e-12)
    assert np.any(np.abs(auc - exact) > 0)  # the bound is not vacuous here...
    fine = metrics.spec(["roc_auc"], roc_bins=16384)
    fine_auc = metrics.compute(stats(logits, labels, spec=fine), fine)["roc_auc_per_class"]
    assert np.max(np.abs(fine_auc - exact)) < np.max(np.abs(auc - exact))  # ...and shrinks


def test_sums_over_uneven_padded_batches_give_the_same_numbers():
    logits, labels = random_logits(n=250)
    spec = metrics.spec(ALL)
    whole = metrics.compute(stats(logits, labels, spec=spec), spec)
    total = None
    for lo, hi in [(0, 1), (1, 38), (38, 200), (200, 250)]:
        # Each piece padded to 192 rows with garbage that the mask must drop.
        pad = 192 - (hi - lo)
        chunk_logits = np.concatenate([logits[lo:hi], np.full((pad, 7), 9.0, np.float32)])
        chunk_labels = np.concatenate([labels[lo:hi], np.zeros(pad, np.int32)])
        mask = np.arange(192) < hi - lo
        sums = stats(chunk_logits, chunk_labels, mask, spec=spec)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    split = metrics.compute(total, spec)
    for key, value in whole.items():
        if key == "loss":
            assert split[key] == pytest.approx(value, rel=1e-6)  # a float sum
        else:
            np.testing.assert_array_equal(split[key], value)  # integer counts: exact


def test_edge_cases_of_the_definitions():
    # Class 2 never occurs and is never predicted: left out of the macro averages and
    # undefined (NaN) for ROC AUC; ties with the label count inside the top k.
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]], np.float32)
    labels = np.array([0, 1, 1], np.int32)
    spec = metrics.spec(("precision", "recall", "roc_auc", "top_1"))
    got = metrics.compute(stats(logits, labels, spec=spec), spec)
    np.testing.assert_array_equal(got["recall_per_class"], [1.0, 0.5, 0.0])
    assert got["recall"] == pytest.approx(0.75)  # mean over classes 0 and 1
    assert np.isnan(got["roc_auc_per_class"][2])
    assert got["top_1"] == 1.0  # row 3: the label ties with the largest logit
    # Log-odds of very confident predictions keep their order (no 1 - p cancellation).
    confident = jnp.array([[40.0, 0.0, 0.0], [30.0, 0.0, 0.0]])
    odds = metrics.log_odds(confident)[:, 0]
    np.testing.assert_allclose(odds, [40.0 - np.log(2.0), 30.0 - np.log(2.0)], rtol=1e-6)


@functools.cache
def _state():
    model = fc.models.get("dense", num_classes=5, hidden=(8,))
    tx = fc.optim.make("adam")
    return fc.create_train_state(jax.random.key(1), model, tx, np.zeros((1, 6, 6, 1)))


def test_evaluate_on_a_model_equals_the_metrics_of_its_logits():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (53, 6, 6, 1), dtype=np.uint8)
    labels = rng.integers(0, 5, 53).astype(np.int32)
    got = metrics.evaluate(_state(), images, labels, ALL, batch_size=16)  # 4 batches, padded
    ref = reference(np.asarray(fc.predict(_state(), images)), labels)
    assert got["count"] == 53
    np.testing.assert_array_equal(got["confusion"], ref["confusion"])
    assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-15)
    assert got["top_3"] == pytest.approx(ref["top_3"], abs=1e-15)
    assert got["f1"] == pytest.approx(ref["macro"]["f1"], abs=1e-15)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert set(got) == {
        "count", "loss", "accuracy", "top_1", "top_3", "precision", "precision_per_class",
        "recall", "recall_per_class", "f1", "f1_per_class", "roc_auc", "roc_auc_per_class",
        "roc_auc_max_error", "confusion",
    }
    assert all(isinstance(got[k], float) for k in ("loss", "accuracy", "f1", "roc_auc"))


def test_bad_names_and_labels_are_rejected():
    with pytest.raises(ValueError, match="unknown metric 'top_0'"):
        metrics.spec(["top_0"])
    # "auc" is Keras's name now (roc_auc its alias); a misspelling lists both vocabularies.
    with pytest.raises(ValueError, match="unknown metric 'roc'.*'auc'.*'roc_auc'"):
        metrics.spec("accuracy,roc")
    with pytest.raises(ValueError, match=r"outside \[0, 5\), e.g. 9"):
        metrics.evaluate(_state(), np.zeros((3, 6, 6, 1), np.uint8), np.array([0, 9, 1]))
    assert metrics.spec("accuracy, top_5,top_5").names == ("accuracy", "top_5")


AVERAGED = ("precision", "recall", "f1", "precision_micro", "recall_micro", "f1_micro",
            "precision_weighted", "recall_weighted", "f1_weighted", "f1_macro")


@pytest.mark.parametrize("weighted", [False, True])
def test_averages_match_keras(weighted):
    keras = pytest.importorskip("keras")
    logits, labels = random_logits()
    weight = np.random.default_rng(5).uniform(0, 2, len(labels)).astype(np.float32)
    weight = weight if weighted else None
    spec = metrics.spec(AVERAGED, average=None)
    got = metrics.compute(stats(logits, labels, None, weight, spec=spec), spec)
    y_true = np.eye(7, dtype=np.float32)[labels]
    y_pred = np.eye(7, dtype=np.float32)[logits.argmax(1)]  # the argmax prediction

    def keras_metric(metric, predictions=y_pred):
        metric.update_state(y_true, predictions, sample_weight=weight)
        return np.asarray(metric.result(), np.float64)

    # F1: Keras's F1Score on the probabilities (threshold=None takes each row's argmax).
    probs = np.asarray(jax.nn.softmax(logits))
    for average in (None, "macro", "micro", "weighted"):
        expected = keras_metric(keras.metrics.F1Score(average=average), probs)
        name = "f1" if average is None else f"f1_{average}"
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-7)
    # Precision and recall: Keras has them per class (class_id=) and pooled over all
    # (class, example) pairs, which for one label per example is the micro average; the
    # support-weighted mean is the textbook one (scikit-learn's average="weighted").
    support = y_true.T @ (np.ones(len(labels)) if weight is None else weight)
    for name, metric in (("precision", keras.metrics.Precision),
                         ("recall", keras.metrics.Recall)):
        per_class = np.array([keras_metric(metric(class_id=c)) for c in range(7)])
        np.testing.assert_allclose(got[name], per_class, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got[f"{name}_micro"], keras_metric(metric()), rtol=1e-5)
        np.testing.assert_allclose(got[f"{name}_weighted"],
                                   np.sum(per_class * support) / np.sum(support), rtol=1e-5)
    # Every class occurs here, so the macro mean (over occurring classes) is Keras's too.
    assert got["f1_macro"] == pytest.approx(np.mean(got["f1"]), rel=1e-12)


def test_evaluate_with_sample_weight_matches_keras():
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (53, 6, 6, 1), dtype=np.uint8)
    labels = rng.integers(0, 5, 53).astype(np.int32)
    weight = rng.uniform(0, 2, 53).astype(np.float32)
    weight[:5] = 0.0
    names = ("loss", "accuracy", "top_3", "confusion")
    got = metrics.evaluate(_state(), images, labels, names, sample_weight=weight, batch_size=16)
    logits = np.asarray(fc.predict(_state(), images))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert got["loss"] == pytest.approx(float(loss(labels, logits, sample_weight=weight)),
                                        rel=1e-5)
    for name, metric in (("accuracy", keras.metrics.SparseCategoricalAccuracy()),
                         ("top_3", keras.metrics.SparseTopKCategoricalAccuracy(k=3))):
        metric.update_state(labels, logits, sample_weight=weight)
        assert got[name] == pytest.approx(float(metric.result()), rel=1e-5)
    assert got["count"] == 53 and got["confusion"].sum() == pytest.approx(weight.sum(), rel=1e-6)
    # weighted_metrics=False: Keras's metrics=, where only the loss is weighted.
    loss_only = metrics.evaluate(_state(), images, labels, names, sample_weight=weight,
                                 weighted_metrics=False, batch_size=16)
    assert loss_only["loss"] == pytest.approx(got["loss"], rel=1e-6)
    assert loss_only["accuracy"] == np.mean(logits.argmax(1) == labels)
    np.testing.assert_array_equal(loss_only["confusion"], reference(logits, labels)["confusion"])


def test_average_and_weight_errors_name_the_value():
    with pytest.raises(ValueError, match=r"average='samples'; expected one of \['macro', "):
        metrics.spec("f1", average="samples")
    with pytest.raises(ValueError, match="unknown metric 'f1_samples'"):
        metrics.spec("f1_samples")
    images, labels = np.zeros((3, 6, 6, 1), np.uint8), np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"not finite numbers >= 0, e.g. -1.0 at index 1"):
        metrics.evaluate(_state(), images, labels, sample_weight=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match=r"sample_weight is float64\[2\]; .* shape \[3\]"):
        metrics.evaluate(_state(), images, labels, sample_weight=np.ones(2))


# ----------------------------------------------------------------- Keras's names, the finisher


def test_keras_names_and_their_aliases_report_the_same_numbers():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (41, 6, 6, 1), dtype=np.uint8)
    labels = rng.integers(0, 5, 41).astype(np.int32)
    names = ("f1_score", "f1", "f1_score_micro", "f1_micro", "auc", "roc_auc",
             "sparse_top_k_categorical_accuracy", "top_5", "top_2", "precision", "recall")
    got = fc.evaluate(_state(), images, labels, names, batch_size=16)
    assert fc.evaluate is metrics.evaluate  # one engine, one object
    ref = reference(np.asarray(fc.predict(_state(), images)), labels)
    assert got["f1_score"] == got["f1"] == pytest.approx(ref["macro"]["f1"], abs=1e-12)
    np.testing.assert_array_equal(got["f1_score_per_class"], got["f1_per_class"])
    assert got["f1_score_micro"] == got["f1_micro"] == pytest.approx(ref["accuracy"])
    assert got["auc"] == got["roc_auc"] and got["auc_max_error"] == got["roc_auc_max_error"]
    np.testing.assert_array_equal(got["auc_per_class"], got["roc_auc_per_class"])
    # Keras's SparseTopKCategoricalAccuracy defaults to k=5: with 5 classes, every label.
    assert got["sparse_top_k_categorical_accuracy"] == got["top_5"] == 1.0
    assert got["top_2"] < 1.0
    assert set(metrics.ALIASES) == {"f1", "roc_auc"}


def test_compute_finishes_step_sums_and_refuses_what_they_cannot_give():
    rng = np.random.default_rng(4)
    batch = {"image": rng.integers(0, 256, (20, 6, 6, 1), dtype=np.uint8),
             "label": rng.integers(0, 5, 20).astype(np.int32)}
    eval_sums = fc.eval_step(_state(), batch)
    engine = fc.evaluate(_state(), batch["image"], batch["label"], ("loss", "accuracy", "f1_score"))
    finished = metrics.compute(eval_sums, metrics.spec(("loss", "accuracy", "f1_score")))
    for name in ("loss", "accuracy", "f1_score"):
        assert finished[name] == pytest.approx(engine[name], rel=1e-6)
    assert metrics.compute(eval_sums).keys() == {"count", "loss", "accuracy"}
    # train_step's sums hold no confusion matrix: loss and accuracy only.
    train_sums = fc.train_step(_state(), batch)[1]
    assert metrics.compute(train_sums)["accuracy"] == float(train_sums["correct"]) / 20
    with pytest.raises(ValueError, match=r"no confusion matrix for \['f1_score'\]"):
        metrics.compute(train_sums, metrics.spec("f1_score"))
    # A member axis: each value per member; a second axis is refused.
    stacked = jax.tree.map(lambda x: np.stack([x, x]), eval_sums)
    np.testing.assert_array_equal(metrics.compute(stacked)["loss"], [finished["loss"]] * 2)
    with pytest.raises(ValueError, match=r"sums\['count'\] has shape \(2, 2\)"):
        metrics.compute(jax.tree.map(lambda x: np.stack([x, x]), stacked))
