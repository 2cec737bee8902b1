"""Tests for flaxconv.data.image_folder and write_image_folder: Keras's folder semantics,
batches for fit's streaming path, arrays for its device-resident path, and the errors."""

import os
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import flaxconv as fc
from flaxconv import data


def _save(path: Path, pixels: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


@pytest.fixture
def gray_folder(tmp_path):
    """3 classes of 8x8 grayscale PNGs (lossless, so pixels can be compared exactly)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 8, 8, 1), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0])
    root = data.write_image_folder(tmp_path / "folder", images, labels, ["b", "c", "a"])
    return root, images, labels


def _by_file(folder: data.ImageFolder, images: np.ndarray) -> np.ndarray:
    """The fixture's images in ``folder.file_paths`` order (file ``<n>.png`` is image n-1)."""
    return images[[int(Path(p).stem) - 1 for p in folder.file_paths]]


def test_labels_follow_sorted_subfolder_names(gray_folder):
    root, images, labels = gray_folder
    folder = data.image_folder(root, image_size=(8, 8), color_mode="grayscale", shuffle=False)
    assert folder.class_names == ("a", "b", "c")
    assert folder.num_examples == 11
    # write_image_folder put label l under ["b", "c", "a"][l]; image_folder sorts names.
    want = {"b": 1, "c": 2, "a": 0}
    for path, label in zip(folder.file_paths, folder.labels, strict=True):
        assert label == want[Path(path).parent.name]
    got_images, got_labels = folder.arrays()
    assert got_images.dtype == np.uint8 and got_images.shape == (11, 8, 8, 1)
    assert got_labels.dtype == np.int32
    np.testing.assert_array_equal(got_images, _by_file(folder, images))
    np.testing.assert_array_equal(got_labels, folder.labels)


def test_batches_are_padded_masked_and_cover_every_image_once(gray_folder):
    root, images, _ = gray_folder
    folder = data.image_folder(
        root, image_size=(8, 8), color_mode="grayscale", batch_size=4, seed=3
    )
    assert folder.steps_per_epoch == 3
    epoch = list(folder(0))
    assert len(epoch) == 3
    for batch in epoch:
        assert batch["image"].shape == (4, 8, 8, 1) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        assert batch["mask"].dtype == bool
    assert [int(b["mask"].sum()) for b in epoch] == [4, 4, 3]
    assert not epoch[-1]["image"][3].any() and epoch[-1]["label"][3] == 0
    seen = np.concatenate([b["image"][b["mask"]] for b in epoch])
    order = folder.order(0)
    np.testing.assert_array_equal(seen, _by_file(folder, images)[order])
    labels = np.concatenate([b["label"][b["mask"]] for b in epoch])
    np.testing.assert_array_equal(labels, folder.labels[order])


def test_shuffle_is_reproducible_and_differs_per_epoch(gray_folder):
    root, _, _ = gray_folder
    make = lambda: data.image_folder(root, image_size=(8, 8), color_mode="grayscale", seed=5)
    a, b = make(), make()
    assert a.file_paths == b.file_paths
    np.testing.assert_array_equal(a.order(1), b.order(1))
    assert not np.array_equal(a.order(0), a.order(1))
    assert sorted(a.order(1)) == list(range(11))


def test_validation_split_partitions_the_files(gray_folder):
    root, _, _ = gray_folder
    kwargs = dict(image_size=(8, 8), color_mode="grayscale", seed=7, validation_split=0.3)
    train, val = data.image_folder(root, subset="both", **kwargs)
    assert (train.num_examples, val.num_examples) == (8, 3)  # int(0.3 * 11) = 3
    assert not set(train.file_paths) & set(val.file_paths)
    assert len(set(train.file_paths) | set(val.file_paths)) == 11
    assert data.image_folder(root, subset="validation", **kwargs).file_paths == val.file_paths
    assert data.image_folder(root, subset="training", **kwargs).file_paths == train.file_paths
    assert train.class_names == val.class_names == ("a", "b", "c")


def test_validation_split_picks_the_same_files_as_keras(gray_folder):
    keras = pytest.importorskip("keras")
    root, _, _ = gray_folder
    kwargs = dict(image_size=(8, 8), color_mode="grayscale", seed=11, validation_split=0.4)
    for subset in ("training", "validation"):
        ours = data.image_folder(root, subset=subset, **kwargs)
        theirs = keras.utils.image_dataset_from_directory(root, subset=subset, verbose=False,
                                                          **kwargs)
        rel = lambda paths: [os.path.relpath(p, root) for p in paths]
        assert rel(ours.file_paths) == rel(theirs.file_paths)
        assert ours.class_names == tuple(theirs.class_names)


def test_resize_color_modes_and_formats(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    _save(tmp_path / "x" / "png.png", rgb)
    _save(tmp_path / "x" / "bmp.bmp", rgb)
    _save(tmp_path / "y" / "gif.gif", rgb)
    _save(tmp_path / "y" / "jpg.JPG", rgb, "JPEG")
    _save(tmp_path / "y" / "gray.png", rgb[..., 0])
    _save(tmp_path / "y" / "sub" / "rgba.png", np.dstack([rgb, np.full((10, 12), 9, np.uint8)]))
    for mode, channels in (("grayscale", 1), ("rgb", 3), ("rgba", 4)):
        folder = data.image_folder(tmp_path, image_size=(5, 6), color_mode=mode, shuffle=False)
        images, labels = folder.arrays()
        assert images.shape == (6, 5, 6, channels) and images.dtype == np.uint8
        np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1, 1])
    names = [os.path.relpath(p, tmp_path) for p in folder.file_paths]
    assert names == ["x/bmp.bmp", "x/png.png", "y/gif.gif", "y/gray.png", "y/jpg.JPG",
                     "y/sub/rgba.png"]
    rgba = folder.arrays()[0]
    assert (rgba[[0, 1, 3], ..., 3] == 255).all()  # alpha added to RGB and gray images
    assert (rgba[5, ..., 3] == 9).all()  # and kept where the file has one
    # At the native size, lossless files come back byte for byte.
    same = data.image_folder(tmp_path, image_size=(10, 12), shuffle=False).arrays()[0]
    np.testing.assert_array_equal(same[0], rgb)
    np.testing.assert_array_equal(same[1], rgb)
    np.testing.assert_array_equal(same[3], np.repeat(rgb[..., :1], 3, axis=-1))


def test_non_image_files_are_skipped_with_a_warning_naming_them(gray_folder):
    root, _, _ = gray_folder
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(UserWarning, match=r"notes\.txt") as record:
        folder = data.image_folder(root, image_size=(8, 8), color_mode="grayscale")
    assert not any(".DS_Store" in str(w.message) for w in record)
    assert folder.num_examples == 11


def test_unreadable_images_are_reported_by_path(gray_folder):
    root, _, _ = gray_folder
    (root / "b" / "fake.png").write_text("this is text")
    (root / "c" / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"fake\.png.*not a JPEG") as err:
        data.image_folder(root, image_size=(8, 8))
    assert "empty.jpg (empty file)" in str(err.value)


def test_a_corrupt_image_is_named_when_its_batch_is_read(gray_folder):
    root, _, _ = gray_folder
    good = (root / "b" / "00001.png").read_bytes()
    (root / "b" / "00001.png").write_bytes(good[:40])  # valid signature, truncated data
    folder = data.image_folder(root, image_size=(8, 8), color_mode="grayscale", batch_size=4)
    with pytest.raises(ValueError, match=r"cannot decode image file\(s\) \S*00001\.png"):
        list(folder(0))
    with pytest.raises(ValueError, match=r"00001\.png"):
        folder.arrays()


def test_missing_empty_and_flat_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        data.image_folder(tmp_path / "empty")
    _save(tmp_path / "flat" / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"no class subfolders \(1 files directly in it\)"):
        data.image_folder(tmp_path / "flat")
    (tmp_path / "noimages" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images in its 1 class subfolder"):
        data.image_folder(tmp_path / "noimages")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(color_mode="cmyk"), "color_mode='cmyk'"),
        (dict(image_size=(0, 8)), "image_size="),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(label_mode="categorical"), "label_mode='categorical'"),
        (dict(interpolation="cubic"), "interpolation='cubic'"),
        (dict(validation_split=0.2, subset="train", seed=0), "subset='train'"),
        (dict(validation_split=0.2, subset="training"), "needs a seed"),
        (dict(validation_split=1.5, subset="training", seed=0), "validation_split=1.5"),
        (dict(subset="training"), "needs a validation_split"),
        (dict(validation_split=0.01, subset="training", seed=0), "leaves 0 for validation"),
    ],
)
def test_bad_arguments_name_the_value(gray_folder, kwargs, match):
    root, _, _ = gray_folder
    with pytest.raises(ValueError, match=match):
        data.image_folder(root, **kwargs)


def test_write_image_folder_refuses_bad_input(tmp_path):
    images = np.zeros((2, 4, 4, 1), np.uint8)
    with pytest.raises(ValueError, match=r"labels span \[0, 5\]"):
        data.write_image_folder(tmp_path / "a", images, np.array([0, 5]), ["x", "y"])
    with pytest.raises(ValueError, match="expected uint8"):
        data.write_image_folder(tmp_path / "a", images.astype(np.float32), [0, 1], ["x", "y"])
    data.write_image_folder(tmp_path / "a", images, np.array([0, 1]), ["x", "y"])
    with pytest.raises(FileExistsError):
        data.write_image_folder(tmp_path / "a", images, np.array([0, 1]), ["x", "y"])
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary folder left behind


def test_fit_trains_from_both_paths(gray_folder):
    root, _, _ = gray_folder
    folder = data.image_folder(root, image_size=(8, 8), color_mode="grayscale", batch_size=4,
                               seed=0)
    model = fc.models.get("dense", num_classes=len(folder.class_names), hidden=(8,))
    images, labels = folder.arrays()
    # fit donates the state it is given, so each run gets its own.
    new_state = lambda: fc.create_train_state(
        jax.random.key(0), model, fc.optim.make("adam"), images[:1]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no recompilation warnings, no skipped files
        streamed, history = fc.fit(new_state(), folder, epochs=2, verbose="silent",
                                   steps_per_epoch=folder.steps_per_epoch,
                                   validation_data=(images, labels))
    assert int(streamed.step) == 2 * folder.steps_per_epoch
    assert len(history["loss"]) == 2 and np.isfinite(history["val_loss"]).all()
    resident, history = fc.fit(new_state(), (images, labels), epochs=1, batch_size=4,
                               verbose="silent")
    assert int(resident.step) == folder.steps_per_epoch
