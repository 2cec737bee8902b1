"""Streaming through grain: the order of every other path, the padded last batch, skipping
without reading, any number of workers, the tf.data backend's examples, no TensorFlow, and a
streamed ``fc.fit`` resumed mid-epoch."""

import collections
import gzip
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxconv as fc
from flaxconv import data, preemption
from flaxconv.data import idx_files

sys.path.insert(0, os.path.dirname(__file__))
from tiny_data import pixel_dataset  # noqa: E402

REAL_DATA_DIR = os.environ.get(data.DATA_DIR_ENV)


class Counting(data.ArraySource):
    """An :class:`ArraySource` that records every index it is asked for (from any thread)."""

    def __init__(self, images, labels):
        super().__init__(images, labels)
        self.read = []
        self._lock = threading.Lock()

    def __getitem__(self, index):
        with self._lock:
            self.read.append(index)
        return super().__getitem__(index)


def arrays(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 4, 3, 1), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32))


def as_list(batches):
    return [{k: np.array(v) for k, v in batch.items()} for batch in batches]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _idx(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def raw_dir(tmp_path, monkeypatch):
    """A tiny MNIST in the published layout (own files, so unchecked) as $FLAXCONV_DATA_DIR."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / idx_files.CUSTOM_FILES_MARKER).touch()
    rng = np.random.default_rng(1)
    for split, n in (("train", 30), ("test", 11)):
        image_file, label_file = idx_files._SPLIT_FILES[split]
        (folder / image_file).write_bytes(_idx(rng.integers(0, 256, (n, 28, 28)), 0x803))
        (folder / label_file).write_bytes(_idx(rng.integers(0, 10, n), 0x801))
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    return tmp_path


# ------------------------------------------------------------------------- order, padding


@pytest.mark.parametrize("seed, epoch", [(0, 0), (7, 3)])
def test_the_order_is_fc_data_batches_order(seed, epoch):
    images, labels = arrays()
    want = as_list(data.batches(images, labels, 5, shuffle=True, seed=seed, epoch=epoch))
    got = as_list(data.grain_batches(data.ArraySource(images, labels), 5, shuffle=True,
                                     seed=seed, epoch=epoch, workers=2))
    assert_same_batches(got, want)
    order = fc.epochs.epoch_order(seed, epoch, len(labels))
    np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in got]),
                                  labels[order])


def test_epochs_differ_and_no_shuffle_is_index_order():
    images, labels = arrays()
    source = data.ArraySource(images, labels)
    first, second = (np.concatenate([b["label"][b["mask"]] for b in
                                     data.grain_batches(source, 5, shuffle=True, epoch=e)])
                     for e in (0, 1))
    assert not np.array_equal(first, second)
    assert sorted(first) == sorted(second) == sorted(labels)
    plain = as_list(data.grain_batches(source, 5))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in plain])[:23], images)


def test_the_last_batch_is_padded_and_masked():
    images, labels = arrays(23)
    batches = as_list(data.grain_batches(data.ArraySource(images, labels), 5, shuffle=True))
    assert len(batches) == 5
    for batch in batches:
        assert batch["image"].shape == (5, 4, 3, 1) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
        assert batch["mask"].dtype == np.bool_
    assert [int(b["mask"].sum()) for b in batches] == [5, 5, 5, 5, 3]
    last = batches[-1]
    np.testing.assert_array_equal(last["mask"], [True, True, True, False, False])
    assert not last["image"][3:].any() and not last["label"][3:].any()


# ------------------------------------------------------------------- start, workers


@pytest.mark.parametrize("start", [0, 1, 3, 5])
def test_start_drops_the_first_batches_without_reading_them(start):
    images, labels = arrays(23)
    everything = as_list(data.grain_batches(data.ArraySource(images, labels), 5,
                                            shuffle=True, seed=2, epoch=1))
    source = Counting(images, labels)
    rest = as_list(data.grain_batches(source, 5, shuffle=True, seed=2, epoch=1,
                                      start=start, workers=3))
    assert_same_batches(rest, everything[start:])
    order = fc.epochs.epoch_order(2, 1, 23)
    assert sorted(source.read) == sorted(order[5 * start:].tolist())  # no skipped one read


def test_workers_give_the_same_batches():
    images, labels = arrays(101, seed=4)
    source = data.ArraySource(images, labels)
    results = [as_list(data.grain_batches(source, 8, shuffle=True, seed=1, epoch=2,
                                          workers=w)) for w in (0, 1, 4, None)]
    for other in results[1:]:
        assert_same_batches(other, results[0])


def test_closing_early_stops_reading():
    images, labels = arrays(200)
    source = Counting(images, labels)
    batches = data.grain_batches(source, 4, workers=2)
    next(batches)
    batches.close()
    time.sleep(0.5)  # for a read already running to end
    # the batch taken, and the 2 * workers batches grain had queued when it was taken
    assert len(source.read) <= 4 * (1 + 2 * 2)


def test_a_collate_error_reaches_the_consumer_at_its_batch():
    images, labels = arrays(20)

    def collate(examples, indices):
        if 13 in indices:
            raise ValueError(f"example 13 is bad (batch of {indices.tolist()})")
        return data.grain_stream.stack(examples, indices)

    batches = data.grain_batches(data.ArraySource(images, labels), 5, collate=collate,
                                 workers=2)
    assert [int(b["mask"].sum()) for b in (next(batches), next(batches))] == [5, 5]
    with pytest.raises(ValueError, match=r"example 13 is bad \(batch of \[10, 11, 12, 13"):
        next(batches)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(start=-1), "start must be a non-negative int, got -1"),
        (dict(start=6), r"start=6; expected at most 5, the batches of one epoch \(23 examples"),
        (dict(start=1.5), "start must be a non-negative int, got 1.5"),
        (dict(workers=-2), r"workers=-2; expected None .*, 0 .* or a positive int"),
        (dict(workers="4"), r"workers='4'; expected None"),
        (dict(batch_size=0), "batch_size must be a positive int, got 0"),
        (dict(epoch=-1), "epoch must be a non-negative int, got -1"),
    ],
)
def test_bad_arguments_are_refused_at_call_time_naming_the_value(kwargs, match):
    images, labels = arrays(23)
    kwargs = {"batch_size": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        data.grain_batches(data.ArraySource(images, labels), **kwargs)


# ----------------------------------------------------------------------- fc.data.stream


def test_stream_is_grain_by_default_in_the_order_of_batches(raw_dir):
    images, labels = data.load("mnist", "train")
    for seed, epoch in ((0, 0), (3, 2)):
        want = as_list(data.batches(images, labels, 7, shuffle=True, seed=seed, epoch=epoch))
        got = as_list(data.stream("mnist", "train", 7, shuffle=True, seed=seed, epoch=epoch))
        assert_same_batches(got, want)
    assert_same_batches(as_list(data.stream("mnist", "test", 4, start=2)),
                        as_list(data.batches(*data.load("mnist", "test"), 4))[2:])


def test_stream_reads_changed_files_again(raw_dir):
    first = np.concatenate([b["label"] for b in data.stream("mnist", "test", 11)])
    label_file = raw_dir / "mnist" / idx_files._SPLIT_FILES["test"][1]
    label_file.write_bytes(_idx((first + 1) % 10, 0x801))
    os.utime(label_file, ns=(0, 10**18))  # a different mtime, however coarse the clock
    again = np.concatenate([b["label"] for b in data.stream("mnist", "test", 11)])
    np.testing.assert_array_equal(again, (first + 1) % 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backend="torch"), r"backend='torch'; expected one of \['grain', 'tf'\]"),
        (dict(backend=None), r"backend=None; expected one of \['grain', 'tf'\]"),
        (dict(start=-3), "start must be a non-negative int, got -3"),
        (dict(start=5), r"start=5; expected at most 3, the batches of one epoch \(11 examples"),
        (dict(workers=-1), "workers=-1; expected None"),
        (dict(workers=2, backend="tf"), r"workers=2 with backend='tf'"),
    ],
)
def test_stream_refuses_bad_arguments_naming_the_value(raw_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.stream("mnist", "test", 4, **kwargs)


@pytest.mark.skipif(
    not (REAL_DATA_DIR and (Path(REAL_DATA_DIR) / "mnist").is_dir()),
    reason=f"{data.DATA_DIR_ENV} does not hold mnist/ (the tf backend prepares it through tfds)",
)
def test_grain_and_tf_backends_stream_the_same_examples(monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv(data.DATA_DIR_ENV, REAL_DATA_DIR)

    def examples(**kwargs):
        batches = list(data.stream("mnist", "test", 1024, shuffle=True, seed=1, **kwargs))
        assert [b["image"].shape for b in batches] == [(1024, 28, 28, 1)] * 10
        rows = [image.tobytes() + bytes([label]) for b in batches
                for image, label in zip(b["image"][b["mask"]], b["label"][b["mask"]],
                                        strict=True)]
        return collections.Counter(rows)

    grain_examples, tf_examples = examples(), examples(backend="tf")
    assert sum(grain_examples.values()) == 10_000
    assert grain_examples == tf_examples


def test_grain_stream_and_image_folders_run_without_tensorflow(raw_dir):
    from PIL import Image

    for i, cls in enumerate("aabbb"):
        (raw_dir / "images" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6), 40 * i, np.uint8)).save(raw_dir / "images" / cls /
                                                                 f"{i}.png")
    code = (
        "import sys\n"
        "sys.modules['tensorflow'] = None  # importing it now fails, as if not installed\n"
        "sys.modules['tensorflow_datasets'] = None\n"
        "from flaxconv import data\n"
        "batches = list(data.stream('mnist', 'train', 8, shuffle=True, seed=1, epoch=2,\n"
        "                           start=1, workers=2))\n"
        "print(len(batches), int(sum(b['mask'].sum() for b in batches)))\n"
        "folder = data.image_folder(sys.argv[1], image_size=(4, 4), color_mode='grayscale',\n"
        "                           batch_size=2, seed=0)\n"
        "print([int(b['mask'].sum()) for b in folder(1, start=1)])\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
        "print(not [m for m in loaded if sys.modules[m]])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(raw_dir / "images")],
                         capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "22", "[2,", "1]", "True"]


# ------------------------------------------------------------------------- image folders


def test_an_image_folder_skips_unread_and_a_corrupt_file_in_a_skipped_batch_is_not_read(
        tmp_path):
    from PIL import Image

    for i in range(7):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(np.full((5, 5), 30 * i, np.uint8)).save(tmp_path / f"c{i % 2}" /
                                                                 f"{i}.png")
    folder = data.image_folder(tmp_path, image_size=(5, 5), color_mode="grayscale",
                               batch_size=3, seed=4)
    everything = as_list(folder(2))
    assert_same_batches(as_list(folder(2, start=1, workers=0)), everything[1:])
    assert_same_batches(as_list(folder(2, workers=3)), everything)
    first = folder.file_paths[folder.order(2)[0]]  # in batch 0 of epoch 2
    Path(first).write_bytes(Path(first).read_bytes()[:30])  # truncated
    assert_same_batches(as_list(folder(2, start=1)), everything[1:])
    bad_file = r"cannot decode image file\(s\) \S*" + Path(first).name
    with pytest.raises(ValueError, match=bad_file) as err:
        list(folder(2))
    assert "Grain" not in str(err.value) and not getattr(err.value, "__notes__", None)
    with pytest.raises(ValueError, match=r"start=4; expected at most 3"):
        folder(2, start=4)


# ------------------------------------------------------------------- fit: resume by start


def test_a_streamed_fit_resumed_mid_epoch_skips_by_start_and_ends_the_same(tmp_path):
    images, labels = pixel_dataset(80, 4)  # 5 batches of 16 an epoch
    model = fc.models.get("dense", num_classes=4, hidden=(16,))
    state0 = fc.create_train_state(jax.random.key(0), model, fc.optim.make("adam"), images[:1])
    calls, stop_at = [], {"at": None}

    def train_data(epoch, start=0):
        source = Counting(images, labels)
        calls.append((epoch, start, source))
        batches = data.grain_batches(source, 16, shuffle=True, seed=9, epoch=epoch,
                                     start=start, workers=2)
        for i, batch in enumerate(batches, start):
            if (epoch, i) == stop_at["at"]:
                preemption.request_stop("test request")
            yield batch

    def run(workdir):
        state = jax.tree.map(jnp.copy, state0)  # fit donates the state it is given
        return fc.fit(state, train_data, 3, workdir=workdir, verbose="silent")

    reference, reference_history = run(None)
    assert [(e, s) for e, s, _ in calls] == [(0, 0), (1, 0), (2, 0)]

    calls.clear()
    stop_at["at"] = (1, 2)  # batch 2 of epoch 2
    workdir = tmp_path / "run"
    with pytest.raises(preemption.Preempted, match=r"in epoch 2/3 after (\d) of its steps"):
        run(workdir)
    done = int(preemption.load_partial(str(workdir), state0, 1).steps)
    assert 2 <= done < 5

    calls.clear()
    stop_at["at"] = None
    state, history = run(workdir)
    assert [(e, s) for e, s, _ in calls] == [(1, done), (2, 0)]
    order = fc.epochs.epoch_order(9, 1, 80)
    assert sorted(calls[0][2].read) == sorted(order[16 * done:].tolist())  # skipped unread
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for key in ("loss", "accuracy"):
        assert history[key] == reference_history[key]
