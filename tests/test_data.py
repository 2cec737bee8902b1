"""Tests for flaxconv.data: IDX reading, batching, errors, and the offline tfds path."""

import collections
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxconv import data
from flaxconv.data import idx_files, tfds_source

REAL_DATA_DIR = os.environ.get(data.DATA_DIR_ENV)
needs_real_data = pytest.mark.skipif(
    not REAL_DATA_DIR, reason=f"{data.DATA_DIR_ENV} is not set (see shared/datasets/README.md)"
)


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fixture(root: Path, n_train: int = 20, n_test: int = 7) -> dict:
    """Writes a tiny gzipped IDX dataset as <root>/mnist/<published names>."""
    rng = np.random.default_rng(0)
    folder = root / "mnist"
    folder.mkdir(parents=True)
    (folder / idx_files.CUSTOM_FILES_MARKER).touch()  # not the published files: read unchecked
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        image_file, label_file = idx_files._SPLIT_FILES[split]
        (folder / image_file).write_bytes(gzip.compress(_idx_bytes(images, 0x803)))
        (folder / label_file).write_bytes(gzip.compress(_idx_bytes(labels, 0x801)))
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def fixture_dir(tmp_path, monkeypatch):
    arrays = _write_fixture(tmp_path)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    return tmp_path, arrays


# ------------------------------------------------------------------------------ raw IDX


def test_load_raw_returns_exact_bytes(fixture_dir):
    _, arrays = fixture_dir
    for split in ("train", "test"):
        images, labels = data.load("mnist", split, source="raw")
        want_images, want_labels = arrays[split]
        assert images.dtype == np.uint8 and images.shape == (len(want_labels), 28, 28, 1)
        assert labels.dtype == np.int32 and labels.shape == (len(want_labels),)
        np.testing.assert_array_equal(images[..., 0], want_images)
        np.testing.assert_array_equal(labels, want_labels)


def test_read_idx_plain_and_gzipped(tmp_path):
    labels = np.arange(5, dtype=np.uint8)
    (tmp_path / "plain").write_bytes(_idx_bytes(labels, 0x801))
    (tmp_path / "gz").write_bytes(gzip.compress(_idx_bytes(labels, 0x801)))
    for name in ("plain", "gz"):
        out = data.read_idx(tmp_path / name)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, labels)


def test_read_idx_bad_magic_names_value_and_path(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros(3), 0x0000BEEF)))
    with pytest.raises(ValueError, match="0x0000beef") as info:
        data.read_idx(path)
    assert str(path) in str(info.value) and "0x00000803" in str(info.value)


def test_read_idx_size_mismatch(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(_idx_bytes(np.zeros((2, 28, 28)), 0x803)[:-1])
    with pytest.raises(ValueError, match="size mismatch") as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_load_raw_corrupt_magic(fixture_dir):
    root, _ = fixture_dir
    path = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros(7), 0x00000802)))
    with pytest.raises(ValueError, match="0x00000802"):
        data.load("mnist", "test", source="raw")


def test_load_raw_rejects_unknown_name_split_and_source(fixture_dir):
    with pytest.raises(ValueError, match="fashion_mnist"):
        data.load("cifar10", "train", source="raw")
    with pytest.raises(ValueError, match="source='tfds'"):
        data.load("mnist", "train[:10%]", source="raw")
    with pytest.raises(ValueError, match="'auto', 'raw', 'tfds'"):
        data.load("mnist", "train", source="numpy")


# ----------------------------------------------------------------------------- missing


def test_missing_dataset_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load("fashion_mnist", "train", source="raw")
    message = str(info.value)
    assert "\n" not in message
    assert "fashion_mnist" in message and data.DATA_DIR_ENV in message


def test_unset_env_raw_is_unavailable(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(data.DatasetUnavailableError, match=data.DATA_DIR_ENV):
        data.load("mnist", "test", source="raw")


def test_in_memory_and_image_folder_paths_work_without_tensorflow(fixture_dir):
    """With TensorFlow and tfds unimportable, as on a Colab TPU runtime: raw MNIST
    (``source="auto"`` falls back to it), batches and image folders (PNG and JPEG, streamed
    and in memory) all work, and nothing imports TensorFlow."""
    from PIL import Image

    root, arrays = fixture_dir
    rng = np.random.default_rng(0)
    for i, (cls, fmt) in enumerate([("a", "PNG"), ("a", "JPEG"), ("b", "PNG"), ("b", "JPEG")]):
        (root / "images" / cls).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / cls / f"{i}.{fmt.lower()}", format=fmt)
    code = (
        "import os, sys\n"
        "sys.modules['tensorflow'] = None  # importing it now fails, as if not installed\n"
        "sys.modules['tensorflow_datasets'] = None\n"
        "from flaxconv import data\n"
        "images, labels = data.load('mnist', 'test')\n"
        "batch = next(data.batches(images, labels, 4, shuffle=True))\n"
        "print(images.shape, labels.sum(), batch['image'].shape)\n"
        "train, val = data.image_folder(sys.argv[1], image_size=(6, 5), seed=0,\n"
        "    color_mode='grayscale', batch_size=2, validation_split=0.5, subset='both')\n"
        "steps = [b['image'].shape for b in train(0)]\n"
        "print(len(steps), steps[0], val.arrays()[0].shape, len(val.arrays()[1]))\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
        "print(sys.modules['tensorflow'] is None and not [m for m in loaded if sys.modules[m]])\n"
        "del os.environ[data.DATA_DIR_ENV]\n"
        "try:\n"
        "    data.load('mnist', 'test')\n"
        "except data.DatasetUnavailableError as err:\n"
        "    print(type(err).__name__)\n"
    )
    env = {**os.environ, data.DATA_DIR_ENV: str(root)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(root / "images")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    want = ["(7,", "28,", "28,", "1)", str(arrays["test"][1].sum()), "(4,", "28,", "28,", "1)",
            "1", "(2,", "6,", "5,", "1)", "(2,", "6,", "5,", "1)", "2", "True",
            "DatasetUnavailableError"]
    assert out.stdout.split() == want


def test_import_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "import flaxconv.data\n"
        "print([m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- batches


def _toy(n=10):
    images = np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2, 1)
    labels = np.arange(n, dtype=np.int64) % 10
    return images, labels


def test_batches_pad_and_mask():
    images, labels = _toy(10)
    out = list(data.batches(images, labels, 4))
    assert len(out) == 3
    for batch in out:
        assert batch["image"].shape == (4, 2, 2, 1) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        assert batch["mask"].shape == (4,) and batch["mask"].dtype == np.bool_
    last = out[-1]
    np.testing.assert_array_equal(last["mask"], [True, True, False, False])
    np.testing.assert_array_equal(last["image"][:2], images[8:])
    assert not last["image"][2:].any() and not last["label"][2:].any()
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in out[:2]]), labels[:8])


def test_batches_drop_remainder():
    images, labels = _toy(10)
    out = list(data.batches(images, labels, 4, drop_remainder=True))
    assert len(out) == 2 and all(b["mask"].all() for b in out)


def _seen(batches):
    """Each real example once: the flattened first pixel identifies the row."""
    return np.concatenate([b["image"][b["mask"], 0, 0, 0] for b in batches])


def test_batches_every_example_once_per_epoch():
    images, labels = _toy(10)
    for shuffle in (False, True):
        seen = _seen(data.batches(images, labels, 3, shuffle=shuffle, seed=1, epoch=2))
        assert sorted(seen.tolist()) == images[:, 0, 0, 0].tolist()


def test_batches_shuffle_deterministic_and_per_epoch():
    images, labels = _toy(50)

    def order(seed, epoch):
        return _seen(data.batches(images, labels, 8, shuffle=True, seed=seed, epoch=epoch))

    np.testing.assert_array_equal(order(0, 0), order(0, 0))
    assert not np.array_equal(order(0, 0), order(0, 1))
    assert not np.array_equal(order(0, 0), order(1, 0))
    want = images[np.random.default_rng([0, 3]).permutation(50), 0, 0, 0]
    np.testing.assert_array_equal(order(0, 3), want)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(batch_size=0), "batch_size must be a positive int, got 0"),
        (dict(batch_size=2.0), "batch_size must be a positive int, got 2.0"),
        (dict(batch_size=True), "batch_size must be a positive int, got True"),
        (dict(labels=np.zeros(9)), "9 labels"),
        (dict(images=np.zeros((0, 2, 2, 1)), labels=np.zeros(0)), "empty"),
        (dict(images=np.zeros((10, 2, 2))), r"\[N, H, W, C\], got shape \(10, 2, 2\)"),
        (dict(seed=-1), "seed must be a non-negative int, got -1"),
    ],
)
def test_batches_errors(kwargs, pattern):
    images, labels = _toy(10)
    args = dict(images=images, labels=labels, batch_size=4) | kwargs
    with pytest.raises(ValueError, match=pattern):
        data.batches(**args)  # raises at call time, before iterating


def test_names_and_num_classes():
    assert data.names() == ("mnist", "fashion_mnist")
    assert data.num_classes("mnist") == 10 and data.num_classes("fashion_mnist") == 10


# ------------------------------------------------------------------------------- tfds


def test_tfds_offline_errors_are_one_line(tmp_path, monkeypatch):
    """Incomplete or wrong local files give DatasetUnavailableError, not a tfds traceback."""
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "files"))
    _write_fixture(tmp_path / "files")
    # the fixture files have the published names but not the published bytes
    with pytest.raises(data.DatasetUnavailableError, match="NonMatchingChecksumError") as info:
        data.load("mnist", "test", source="tfds", data_dir=tmp_path / "tfds")
    assert "\n" not in str(info.value) and data.DATA_DIR_ENV in str(info.value)

    (tmp_path / "files" / "mnist" / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DatasetUnavailableError, match="lacks train-images") as info:
        data.load("mnist", "test", source="tfds", data_dir=tmp_path / "tfds")
    assert "\n" not in str(info.value)


class _FailingBuilder:
    def is_prepared(self):
        return False

    def download_and_prepare(self, **kwargs):
        raise ConnectionError("Max retries exceeded\nwith a long traceback")


def test_tfds_download_failure_is_one_line(tmp_path, monkeypatch):
    """No local files and no network: tfds's error becomes DatasetUnavailableError."""
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(tfds_source, "_tfds_builder", lambda name, data_dir: _FailingBuilder())
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load("kmnist", "train", source="tfds", data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and "'kmnist'" in message and data.DATA_DIR_ENV in message
    assert "ConnectionError: Max retries exceeded" in message
    assert isinstance(info.value.__cause__, ConnectionError)


def test_tfds_unknown_name(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="mnist.*fashion_mnist.*tensorflow_datasets name"):
        data.load("no_such_dataset", "train", source="tfds", data_dir=tmp_path)


@pytest.fixture(scope="session")
def real_mnist_tfds(tmp_path_factory):
    """mnist prepared offline through tfds once per session, from the real IDX files."""
    pytest.importorskip("tensorflow_datasets")
    tfds_dir = tmp_path_factory.mktemp("tfds")
    mp = pytest.MonkeyPatch()
    mp.setenv(data.DATA_DIR_ENV, REAL_DATA_DIR)
    try:
        splits = {
            split: data.load("mnist", split, source="tfds", data_dir=tfds_dir)
            for split in ("train", "test")
        }
    finally:
        mp.undo()
    return tfds_dir, splits


@needs_real_data
def test_real_raw_mnist_test_split(monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, REAL_DATA_DIR)
    images, labels = data.load("mnist", "test", source="raw")
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels[0] == 7


@needs_real_data
def test_real_tfds_matches_raw(real_mnist_tfds, monkeypatch):
    _, splits = real_mnist_tfds
    monkeypatch.setenv(data.DATA_DIR_ENV, REAL_DATA_DIR)
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = splits[split]
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int32
        assert labels.min() == 0 and labels.max() == 9
        raw_images, raw_labels = data.load("mnist", split, source="raw")
        assert raw_images.shape == images.shape and raw_labels.dtype == labels.dtype
        assert collections.Counter(labels.tolist()) == collections.Counter(raw_labels.tolist())
        # same pixels, whatever the order: compare per-image sums as multisets
        np.testing.assert_array_equal(
            np.sort(images.sum(axis=(1, 2, 3))), np.sort(raw_images.sum(axis=(1, 2, 3)))
        )


@needs_real_data
def test_real_tfds_slice_and_stream(real_mnist_tfds, monkeypatch):
    tfds_dir, splits = real_mnist_tfds
    monkeypatch.setenv(data.DATA_DIR_ENV, REAL_DATA_DIR)
    images, labels = data.load("mnist", "test[:10%]", source="tfds", data_dir=tfds_dir)
    assert images.shape == (1000, 28, 28, 1) and labels.dtype == np.int32

    out = list(data.stream("mnist", "test", 3000, data_dir=tfds_dir))
    assert [int(b["mask"].sum()) for b in out] == [3000, 3000, 3000, 1000]
    for batch in out:
        assert batch["image"].shape == (3000, 28, 28, 1) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.bool_
    assert not out[-1]["image"][1000:].any()
    streamed = np.concatenate([b["label"][b["mask"]] for b in out])
    np.testing.assert_array_equal(streamed, splits["test"][1])

    def shuffled(seed, epoch):
        batches = data.stream(
            "mnist", "test", 4096, shuffle=True, seed=seed, epoch=epoch, data_dir=tfds_dir
        )
        return np.concatenate([b["label"][b["mask"]] for b in batches])

    first = shuffled(0, 0)
    np.testing.assert_array_equal(first, shuffled(0, 0))
    assert not np.array_equal(first, shuffled(0, 1))
    assert collections.Counter(first.tolist()) == collections.Counter(splits["test"][1].tolist())


@needs_real_data
def test_array_record_preparations_read_without_tensorflow(real_mnist_tfds, tmp_path):
    """A dataset tfds prepared as array_record (``tfds.data_source``'s format) loads with
    TensorFlow not importable, as on a Colab TPU runtime; a tfrecord preparation is refused
    in one line that says what to do, and a corrupt array_record file in one that says so."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")  # preparing needs it
    tfrecord_dir, splits = real_mnist_tfds
    builder = tfds.builder("mnist", data_dir=tmp_path, file_format="array_record")
    builder.download_and_prepare(
        download_dir=tmp_path / "downloads",
        download_config=tfds.download.DownloadConfig(manual_dir=Path(REAL_DATA_DIR) / "mnist"),
    )
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tmp_path / "mnist", corrupt / "mnist")
    (test_file,) = (corrupt / "mnist").glob("*/mnist-test.array_record-*")
    contents = bytearray(test_file.read_bytes())
    middle = len(contents) // 2
    contents[middle : middle + 4096] = b"\xab" * 4096
    test_file.write_bytes(bytes(contents))
    code = (
        "import sys\n"
        "import importlib.machinery as m\n"
        "class NoTensorFlow(m.PathFinder):  # as if not installed: found nowhere (tfds\n"
        "    @classmethod  # reads a None in sys.modules as 'loaded')\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        if name.split('.')[0] != 'tensorflow':\n"
        "            return super().find_spec(name, path, target)\n"
        "sys.meta_path[sys.meta_path.index(m.PathFinder)] = NoTensorFlow\n"
        "import numpy as np\n"
        "from flaxconv import data\n"
        "images, labels = data.load('mnist', 'test', source='tfds', data_dir=sys.argv[1])\n"
        "np.save(sys.argv[3], images); np.save(sys.argv[4], labels)\n"
        "try:\n"
        "    data.load('mnist', 'test', source='tfds', data_dir=sys.argv[2])\n"
        "except data.DatasetUnavailableError as err:\n"
        "    print(err)\n"
        "try:\n"
        "    data.load('mnist', 'test', source='tfds', data_dir=sys.argv[5])\n"
        "except data.DatasetUnavailableError as err:\n"
        "    print(err)\n"
        "print([m for m in sys.modules if m.startswith('tensorflow.')])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(tfrecord_dir),
         str(tmp_path / "images.npy"), str(tmp_path / "labels.npy"), str(corrupt)],
        env={**os.environ}, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    # The same examples in the same order as the TensorFlow path reads from its tfrecords.
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), splits["test"][0])
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), splits["test"][1])
    refusal, corrupted, modules = out.stdout.strip().splitlines()
    assert "dataset 'mnist' is unavailable" in refusal and "array_record" in refusal
    assert "tfds.data_source('mnist'" in refusal and modules == "[]"
    assert "split 'test'" in corrupted and "could not be read" in corrupted, corrupted
    assert "corrupt or truncated: delete it and prepare it again" in corrupted


def test_class_names_of_the_offline_datasets_are_tfds_label_names():
    assert data.class_names("mnist") == tuple("0123456789")
    assert data.class_names("fashion_mnist")[0] == "T-shirt/top"
    for name in data.names():
        assert len(data.class_names(name)) == data.num_classes(name)
    tfds = pytest.importorskip("tensorflow_datasets")
    for name in ("mnist", "fashion_mnist"):
        names = tfds.builder(name, data_dir=None).info.features["label"].names
        assert data.class_names(name) == tuple(names)
