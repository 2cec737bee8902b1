"""Tests for flaxconv.data.image_folder and write_image_folder: Keras's folder semantics
(files, order, split, pixels, options, each compared with Keras itself where Keras is
installed), batches for fit's streaming path, arrays for its device-resident path, errors."""

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


# ----------------------------------------------------------------------------- Keras parity
# Each test below runs Keras's own image_dataset_from_directory on the same files.


def _keras(root, **kwargs):
    """Keras's dataset as numpy: ``(images float32, labels or None, file_paths)``, in the
    order Keras yields them (its file order with ``shuffle=False``, the default here)."""
    keras = pytest.importorskip("keras")
    kwargs = {"shuffle": False, "batch_size": 1000, "verbose": False} | kwargs
    dataset = keras.utils.image_dataset_from_directory(root, **kwargs)
    return _keras_numpy(dataset) + (dataset.file_paths,)


def _keras_numpy(dataset):
    parts = list(dataset.as_numpy_iterator())
    if isinstance(parts[0], tuple):
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return np.concatenate(parts), None


def _rel(root, paths):
    return [os.path.relpath(p, root) for p in paths]


# What each Keras color_mode can decode at all: TensorFlow's decoders refuse GIF and BMP in
# grayscale and GIF and JPEG in rgba (flaxconv converts those; see test_resize_color_modes...).
_KERAS_FORMATS = {
    "grayscale": ("png", "jpeg"),
    "rgb": ("png", "jpeg", "bmp", "gif"),
    "rgba": ("png", "bmp"),
}


def _write_formats(root: Path, formats) -> None:
    """10x12 noise images in each format, a class subfolder per format: every conversion
    TensorFlow's decoders make (palette with transparency, 16-bit, chroma subsampling...)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (10, 12, 1), dtype=np.uint8)
    files = {
        "png": [("rgb.png", Image.fromarray(rgb), {}),
                ("rgba.png", Image.fromarray(np.concatenate([rgb, alpha], -1)), {}),
                ("gray.png", Image.fromarray(rgb[..., 0]), {}),
                ("palette.png", Image.fromarray(rgb).quantize(16), {"transparency": 3}),
                ("gray16.png", Image.fromarray(rng.integers(0, 2**16, (10, 12), np.uint16)), {})],
        "jpeg": [("444.jpg", Image.fromarray(rgb), {"subsampling": 0, "quality": 90}),
                 ("420.jpg", Image.fromarray(rgb), {"subsampling": 2, "quality": 90}),
                 ("gray.jpg", Image.fromarray(rgb[..., 1]), {})],
        "bmp": [("rgb.bmp", Image.fromarray(rgb), {})],
        "gif": [("palette.gif", Image.fromarray(rgb).quantize(16), {"transparency": 2})],
    }
    for fmt in formats:
        (root / fmt).mkdir(parents=True)
        for name, image, options in files[fmt]:
            image.save(root / fmt / name, **options)


@pytest.mark.parametrize("color_mode", ["grayscale", "rgb", "rgba"])
def test_pixels_match_keras_for_every_format(tmp_path, color_mode):
    root = tmp_path / color_mode
    _write_formats(root, _KERAS_FORMATS[color_mode])
    for size, interpolation in (((10, 12), "bilinear"), ((7, 5), "bilinear"),
                                ((16, 20), "nearest")):
        kwargs = dict(image_size=size, color_mode=color_mode, interpolation=interpolation)
        ours = data.image_folder(root, shuffle=False, **kwargs)
        theirs, labels, paths = _keras(root, **kwargs)
        assert _rel(root, ours.file_paths) == _rel(root, paths)
        images, our_labels = ours.arrays()
        np.testing.assert_array_equal(our_labels, labels)
        for path, mine, keras_image in zip(paths, images, theirs, strict=True):
            diff = np.abs(mine.astype(np.float32) - keras_image)
            if path.endswith("420.jpg") and color_mode != "grayscale":
                # TensorFlow decodes colour JPEGs with libjpeg's fast integer DCT together
                # with its smooth chroma upsampling; Pillow offers that DCT only without the
                # upsampling, so flaxconv keeps Pillow's accurate DCT there: a few levels
                # apart (4 on this noise). Exact (below) for gray output and for JPEGs
                # without chroma subsampling, which get the fast DCT.
                assert diff.max() <= 8 and diff.mean() < 1.5, (path, size)
            else:  # Keras's float32 rounded to uint8, so within half a level
                assert diff.max() <= 0.5 + 1e-3, (path, size, interpolation, diff.max())


def test_every_interpolation_matches_keras(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("x.png", "y.png"):
        _save(tmp_path / "a" / name, rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    for method in data.RESIZE_METHODS:
        kwargs = dict(image_size=(7, 17), interpolation=method)  # down one axis, up the other
        ours = data.image_folder(tmp_path, shuffle=False, **kwargs).arrays()[0]
        theirs = _keras(tmp_path, **kwargs)[0]
        # Keras keeps bicubic/lanczos overshoot beyond [0, 255]; uint8 clips it.
        diff = np.abs(ours - np.clip(theirs, 0, 255))
        assert diff.max() <= 0.5 + 1e-3, (method, diff.max())
    # "nearest" used to fail in every case (TensorFlow returns uint8 for it); any case works.
    upper = data.image_folder(tmp_path, image_size=(10, 12), interpolation="NEAREST",
                              shuffle=False).arrays()[0]
    np.testing.assert_array_equal(upper, _keras(tmp_path, image_size=(10, 12),
                                                interpolation="nearest")[0])


def test_crop_and_pad_to_aspect_ratio_match_keras(tmp_path):
    rng = np.random.default_rng(3)
    for name, shape in (("wide.png", (6, 15, 3)), ("tall.png", (14, 5, 3)),
                        ("square.png", (9, 9, 3))):
        _save(tmp_path / "a" / name, rng.integers(0, 256, shape, dtype=np.uint8))
    for option in ("crop_to_aspect_ratio", "pad_to_aspect_ratio"):
        for interpolation in ("bilinear", "nearest"):
            kwargs = {"image_size": (8, 11), "interpolation": interpolation, option: True}
            ours = data.image_folder(tmp_path, shuffle=False, **kwargs).arrays()[0]
            theirs = _keras(tmp_path, **kwargs)[0]
            assert ours.shape == theirs.shape == (3, 8, 11, 3)
            assert np.abs(ours - theirs).max() <= 0.5 + 1e-3, (option, interpolation)
    stretched = data.image_folder(tmp_path, image_size=(8, 11), shuffle=False).arrays()[0]
    assert not np.array_equal(stretched, ours)  # the options change the result


def test_label_modes_and_class_names_match_keras(gray_folder):
    root, _, _ = gray_folder
    base = dict(image_size=(8, 8), color_mode="grayscale")
    for kwargs in (dict(label_mode="int"), dict(label_mode="categorical"),
                   dict(class_names=["c", "a", "b"], label_mode="categorical")):
        ours = data.image_folder(root, shuffle=False, **base, **kwargs)
        _, labels, paths = _keras(root, **base, **kwargs)
        assert _rel(root, ours.file_paths) == _rel(root, paths)
        np.testing.assert_array_equal(ours.arrays()[1], labels)
        assert ours.arrays()[1].dtype == labels.dtype
        batch = next(ours(0))
        assert batch["label"].shape == (32, *labels.shape[1:])  # padded rows are zero
        assert not batch["label"][len(labels):].any()
    # binary: Keras wants exactly two classes
    two = data.write_image_folder(root.parent / "two", np.zeros((3, 4, 4, 1), np.uint8),
                                  np.array([1, 0, 1]), ["no", "yes"])
    ours = data.image_folder(two, image_size=(4, 4), label_mode="binary", shuffle=False)
    labels = _keras(two, image_size=(4, 4), label_mode="binary")[1]
    np.testing.assert_array_equal(ours.arrays()[1], labels)
    assert labels.shape == (3, 1) and labels.dtype == np.float32


def test_explicit_and_no_labels_match_keras(gray_folder):
    root, _, _ = gray_folder
    base = dict(image_size=(8, 8), color_mode="grayscale")
    # Keras: one label per file below the folder, in sorted path order, structure ignored.
    given = [3, 0, 1, 3, 1, 0, 0, 3, 1, 1, 0]
    ours = data.image_folder(root, labels=given, shuffle=False, **base)
    images, labels, paths = _keras(root, labels=list(given), **base)
    assert _rel(root, ours.file_paths) == _rel(root, paths)
    np.testing.assert_array_equal(ours.arrays()[1], labels)
    np.testing.assert_array_equal(ours.arrays()[0], images)
    assert ours.class_names == ("0", "1", "3")  # Keras: the sorted distinct labels
    # The same with Keras's shuffle and split: same files, same labels.
    split = dict(seed=4, validation_split=0.3, subset="both", **base)
    keras = pytest.importorskip("keras")
    # Keras shuffles the list it is given in place, so it gets a copy.
    theirs = keras.utils.image_dataset_from_directory(root, labels=list(given), verbose=False,
                                                      **split)
    mine = data.image_folder(root, labels=given, **split)
    assert given == [3, 0, 1, 3, 1, 0, 0, 3, 1, 1, 0]  # flaxconv leaves it alone
    for ours_subset, keras_subset in zip(mine, theirs, strict=True):
        assert _rel(root, ours_subset.file_paths) == _rel(root, keras_subset.file_paths)
    # Keras yields its validation half in file order: the labels must follow the files.
    np.testing.assert_array_equal(mine[1].labels, _keras_numpy(theirs[1])[1])
    # labels=None: a folder of images to predict, no labels anywhere.
    ours = data.image_folder(root, labels=None, shuffle=False, **base)
    images, labels, paths = _keras(root, labels=None, **base)
    assert labels is None and ours.labels is None and ours.class_names is None
    got, no_labels = ours.arrays()
    assert no_labels is None
    np.testing.assert_array_equal(got, images)
    assert sorted(next(ours(0))) == ["image", "mask"]
    assert "unlabeled" in repr(ours)
    # label_mode=None means the same (as in Keras)
    assert data.image_folder(root, label_mode=None, **base).labels is None


def test_subset_both_never_reshuffles_validation_like_keras(gray_folder):
    root, _, _ = gray_folder
    kwargs = dict(image_size=(8, 8), color_mode="grayscale", seed=7, validation_split=0.5,
                  subset="both", batch_size=2)
    train, val = data.image_folder(root, **kwargs)
    keras = pytest.importorskip("keras")
    _, keras_val = keras.utils.image_dataset_from_directory(root, verbose=False, **kwargs)
    labels = lambda epoch: np.concatenate([b["label"][b["mask"]] for b in val(epoch)])
    for epoch in (0, 1, 2):
        np.testing.assert_array_equal(labels(epoch), _keras_numpy(keras_val)[1])
    assert not val.shuffle and train.shuffle
    assert not np.array_equal(train.order(0), train.order(1))


def test_follow_links_matches_keras(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    _save(root / "a" / "1.png", np.zeros((4, 4), np.uint8))
    _save(root / "b" / "2.png", np.zeros((4, 4), np.uint8))
    _save(outside / "3.png", np.zeros((4, 4), np.uint8))
    (root / "b" / "linked").symlink_to(outside, target_is_directory=True)
    for follow in (False, True):
        ours = data.image_folder(root, image_size=(4, 4), follow_links=follow, shuffle=False)
        _, labels, paths = _keras(root, image_size=(4, 4), follow_links=follow)
        assert _rel(root, ours.file_paths) == _rel(root, paths)
        np.testing.assert_array_equal(ours.labels, labels)
        assert ours.num_examples == (3 if follow else 2)


def test_read_image_is_one_file_of_image_folder(gray_folder):
    root, _, _ = gray_folder
    folder = data.image_folder(root, image_size=(5, 7), color_mode="rgb", shuffle=False,
                               interpolation="area", crop_to_aspect_ratio=True)
    image = data.read_image(folder.file_paths[3], (5, 7), "rgb", "area",
                            crop_to_aspect_ratio=True)
    np.testing.assert_array_equal(image, folder.arrays()[0][3])
    with pytest.raises(ValueError, match=r"cannot decode image file \S*nope\.png"):
        data.read_image(root / "nope.png", 4)


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
        (dict(label_mode="sparse"),
         r"label_mode='sparse'; expected one of \['int', 'categorical', 'binary', None\]"),
        (dict(label_mode="binary"), r"label_mode='binary' with 3 classes .*expected exactly 2"),
        (dict(labels="folders"), r"labels='folders'; expected 'inferred', None, or a list"),
        (dict(labels=[0, -1] + [0] * 9), r"labels=\[0, -1, .*non-negative int"),
        (dict(labels=[0.5] * 11), r"labels=\[0\.5, .*non-negative int"),
        (dict(labels=[0, 1]), "labels has 2 entries but .* has 11 image files"),
        (dict(labels=[0, 1, 7] * 3 + [0, 1], label_mode="categorical"),
         r"labels span \[0, 7\] with label_mode='categorical'; expected labels in \[0, 3\)"),
        (dict(labels=[0] * 11, class_names=["a"]), "class_names=.* with explicit labels"),
        (dict(labels=None, class_names=["a"]), "class_names=.* with labels=None"),
        (dict(crop_to_aspect_ratio=True, pad_to_aspect_ratio=True), "expected at most one"),
        (dict(pad_to_aspect_ratio="yes"), "pad_to_aspect_ratio='yes'; expected True or False"),
        (dict(follow_links=1), "follow_links=1; expected True or False"),
        (dict(image_size=-3), "image_size=-3"),
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
