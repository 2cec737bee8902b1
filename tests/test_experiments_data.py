"""Tests for the data behind experiments/sign_language_cnn.py and fashion_mnist_cnn.py: the
Sign Language MNIST CSV reader and image-folder export, and both scripts end to end on small
inputs (the full runs are commands, see their docstrings)."""

import gzip
import importlib.util
import json
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from tiny_data import pixel_dataset

import flaxconv as fc
from flaxconv import data, experiment

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA_DIR = os.environ.get(data.DATA_DIR_ENV)
needs_real_data = pytest.mark.skipif(
    not REAL_DATA_DIR, reason=f"{data.DATA_DIR_ENV} is not set (see shared/datasets/README.md)"
)
# Examples per class (A ... Y without J) listed in shared/datasets/README.md.
README_COUNTS = {
    "train": [1126, 1010, 1144, 1196, 957, 1204, 1090, 1013, 1162, 1114, 1241, 1055, 1151, 1196,
              1088, 1279, 1294, 1199, 1186, 1161, 1082, 1225, 1164, 1118],
    "test": [331, 432, 310, 245, 498, 247, 348, 436, 288, 331, 209, 394, 291, 246, 347, 164, 144,
             246, 248, 266, 346, 206, 267, 332],
}


def _experiment(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HEADER = "label," + ",".join(f"pixel{i}" for i in range(1, 785))


def _write_csv(path: Path, labels, pixels, header=HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] + [",".join(map(str, [lab, *row])) for lab, row in zip(labels, pixels,
                                                                           strict=True)]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


@pytest.fixture
def fake_sign_language(tmp_path, monkeypatch):
    """A tiny Sign Language MNIST in the Kaggle format: every letter in both splits."""
    rng = np.random.default_rng(0)
    letters = np.array([i for i in range(25) if i != 9])  # alphabet indices, no J
    splits = {}
    for split, repeats in (("train", 3), ("test", 1)):
        labels = rng.permutation(np.repeat(letters, repeats))
        pixels = rng.integers(0, 256, (len(labels), 784))
        _write_csv(tmp_path / "data" / "sign_language_mnist" / f"sign_mnist_{split}.csv.gz",
                   labels, pixels)
        splits[split] = (labels, pixels)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "data"))
    return tmp_path, splits


def test_csv_loads_with_labels_remapped_to_24_classes(fake_sign_language):
    _, splits = fake_sign_language
    images, labels = data.load_sign_language_mnist("train")
    raw, pixels = splits["train"]
    assert images.dtype == np.uint8 and images.shape == (72, 28, 28, 1)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(images.reshape(72, -1), pixels)
    np.testing.assert_array_equal(labels, raw - (raw > 9))
    letters = [data.SIGN_LANGUAGE_CLASSES[i] for i in labels]
    assert letters == [chr(ord("A") + i) for i in raw]


def test_folder_export_round_trips_through_image_folder(fake_sign_language):
    tmp_path, splits = fake_sign_language
    root = data.sign_language_folder(tmp_path / "folder")
    for split, sub in (("train", "Train"), ("test", "Test")):
        assert sorted(os.listdir(root / sub)) == list(data.SIGN_LANGUAGE_CLASSES)
        folder = data.image_folder(root / sub, image_size=(28, 28), color_mode="grayscale",
                                   shuffle=False)
        assert folder.class_names == data.SIGN_LANGUAGE_CLASSES
        images, labels = folder.arrays()
        # File <n>.png is CSV data row n: put the CSV rows in the folder's order.
        rows = [int(Path(p).stem) - 1 for p in folder.file_paths]
        raw, pixels = splits[split]
        np.testing.assert_array_equal(images.reshape(len(rows), -1), pixels[rows])
        np.testing.assert_array_equal(labels, (raw - (raw > 9))[rows])
    mtime = (root / "Train").stat().st_mtime_ns
    data.sign_language_folder(tmp_path / "folder")  # already there: kept as it is
    assert (root / "Train").stat().st_mtime_ns == mtime


def test_malformed_or_missing_csvs_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(data.DatasetUnavailableError, match="sign_mnist_test.csv.gz"):
        data.load_sign_language_mnist("test")
    with pytest.raises(ValueError, match="split='validation'"):
        data.load_sign_language_mnist("validation")
    path = tmp_path / "sign_language_mnist" / "sign_mnist_test.csv.gz"
    _write_csv(path, [3, 9], np.zeros((2, 784), int))
    with pytest.raises(ValueError, match="data row 2 has label 9; expected 0..24 without 9"):
        data.load_sign_language_mnist("test")
    _write_csv(path, [3], np.zeros((1, 784), int), header="a,b")
    with pytest.raises(ValueError, match="header 'a,b'"):
        data.load_sign_language_mnist("test")
    _write_csv(path, [3], np.full((1, 784), 256))
    with pytest.raises(ValueError, match=r"pixel values span \[256, 256\]"):
        data.load_sign_language_mnist("test")


@needs_real_data
@pytest.mark.parametrize("split", ["train", "test"])
def test_real_sign_language_csvs_have_the_published_counts(split):
    images, labels = data.load_sign_language_mnist(split)
    assert images.shape == ({"train": 27455, "test": 7172}[split], 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(labels, minlength=24), README_COUNTS[split])


def test_sign_language_experiment_end_to_end(fake_sign_language, capsys):
    tmp_path, _ = fake_sign_language
    module = _experiment("sign_language_cnn")
    config = module.get_config()
    config.update(epochs=2, batch_size=16, verbose="silent", input="stream",
                  workdir=str(tmp_path / "run"), folder=str(tmp_path / "folder"),
                  validation_split=0.25, metrics="top_3")
    results = module.run(config)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test_accuracy"] == results["test_accuracy"]
    assert 0.0 <= saved["test_accuracy"] <= 1.0 and saved["test_examples"] == 24
    assert saved["class_names"] == list(data.SIGN_LANGUAGE_CLASSES)
    assert len(saved["history"]["val_loss"]) == 2  # validation from the Train folder
    assert os.listdir(tmp_path / "run" / "best")  # ModelCheckpoint's best-only save


def test_sign_language_experiment_rejects_a_bad_input_flag(fake_sign_language, capsys):
    module = _experiment("sign_language_cnn")
    status = module.cli(module.get_config(), "doc", ["--input", "disk"], run=module.run)
    assert status == 1
    assert "--input 'disk'; expected one of ['arrays', 'stream']" in capsys.readouterr().err


def test_fashion_schedules():
    module = _experiment("fashion_mnist_cnn")
    config = module.get_config()
    lr = module.schedule(config, 1000)
    assert abs(float(lr(250)) - config.learning_rate) < 1e-9  # the peak, after the warm-up
    assert float(lr(0)) < config.learning_rate / 10 and float(lr(1000)) < 1e-6
    config.schedule = "step"
    with pytest.raises(ValueError, match="--schedule 'step'"):
        module.schedule(config, 1000)


@needs_real_data
def test_fashion_experiment_end_to_end(tmp_path, capsys):
    module = _experiment("fashion_mnist_cnn")
    config = module.get_config()
    config.update(epochs=1, train_examples=640, verbose="silent", workdir=str(tmp_path),
                  data_source="raw", metrics="top_3")
    module.run(config)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["model"] == "fashion_cnn"
    assert results["test_examples"] == 10_000
    assert results["baseline"]["model"] == "dense"
    assert results["num_params"] != results["baseline"]["num_params"]
    # The saved model says what each class is, so `python -m flaxconv.predict` names them.
    assert results["class_names"] == list(data.class_names("fashion_mnist"))
    info = fc.saved_model.model_info(tmp_path / "fashion_cnn" / "saved_model")
    assert info["class_names"] == list(data.class_names("fashion_mnist"))
    table = capsys.readouterr().out
    assert "fashion_cnn" in table and "dense" in table and "test_accuracy" in table


# --------------------------------------------------------------- experiments as configs


EXPERIMENTS = ("mnist_convnet", "fashion_mnist_cnn", "sign_language_cnn", "finetune",
               "mnist_sweep")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_is_a_config_read_by_the_shared_flag_parser(name, tmp_path):
    module = _experiment(name)
    config = module.get_config()
    assert isinstance(config, ml_collections.ConfigDict)
    assert "argparse" not in (ROOT / "experiments" / f"{name}.py").read_text()  # one CLI
    flags = ["--workdir", str(tmp_path), "--batch-size", "32"]
    # The sweep resolves its per-member lists as it parses.
    parsed = (module.parse_flags(flags) if name == "mnist_sweep"
              else experiment.parse_flags(config, flags, module.__doc__))
    assert parsed.workdir == str(tmp_path) and parsed.batch_size == 32
    untouched = {k: v for k, v in parsed.items() if k not in ("workdir", "batch_size")}
    if name == "mnist_sweep":
        assert untouched["num_models"] == 4 and untouched["seeds"] == [0, 1, 2, 3]
        assert untouched["learning_rates"] == [1e-3] * 4
    else:
        assert untouched == {k: v for k, v in config.items() if k in untouched}


def test_train_steps_is_what_fit_takes_after_its_validation_split():
    config = experiment.default_config(epochs=2, batch_size=4, validation_split=0.1)
    datasets = experiment.Datasets(pixel_dataset(85, 3), pixel_dataset(8, 3), 3)
    # Keras's floor keeps 76 of 85 for training (19 steps); rounding the split would keep 77.
    assert experiment.train_steps(config, datasets) == 2 * 19
    model = fc.models.get("dense", num_classes=3, hidden=(8,))
    state = fc.create_train_state(jax.random.key(0), model, fc.optim.make("adam"),
                                  datasets.train[0][:1])
    state, _ = fc.fit(state, datasets.train, config.epochs, batch_size=config.batch_size,
                      validation_split=config.validation_split, verbose="silent")
    assert int(state.step) == experiment.train_steps(config, datasets)
    given = datasets._replace(validation=pixel_dataset(8, 3))  # no split is cut then
    assert experiment.train_steps(config, given) == 2 * 22


def test_a_config_adds_and_replaces_keys_and_train_examples_must_exist(monkeypatch):
    config = experiment.default_config(optimizer="adam", patience=5, train_examples=100)
    assert config.optimizer == "adam" and config.patience == 5 and config.epochs == 5
    monkeypatch.setattr(data, "load", lambda name, split, source: pixel_dataset(64, 3))
    with pytest.raises(ValueError, match=r"^train_examples=100 is more than the 64 training "
                                         r"examples of mnist$"):
        experiment.load_datasets(config)
    config.train_examples = 64
    assert len(experiment.load_datasets(config).train[1]) == 64
