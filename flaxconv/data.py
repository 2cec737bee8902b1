"""Datasets as numpy arrays and fixed-shape numpy batches.

Two sources give the same arrays:

* ``"raw"`` reads the published gzipped IDX files of MNIST / Fashion-MNIST from
  ``$FLAXCONV_DATA_DIR/<name>/`` with numpy only, so it works without TensorFlow
  (a GPU box, a Colab TPU runtime).
* ``"tfds"`` goes through ``tensorflow_datasets``. When ``$FLAXCONV_DATA_DIR/<name>/``
  holds the published files, tfds prepares its dataset from them with no network.

TensorFlow and tfds are imported inside the functions that need them, never at
module import time.

Batches are dicts ``{"image": [B, H, W, C], "label": int32 [B], "mask": bool [B]}``
that always have exactly ``batch_size`` rows: the last partial batch is padded and
its padding rows have ``mask == False``, so a jitted step compiles once and every
example counts exactly once.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import importlib.util
import itertools
import math
import numbers
import os
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

DATA_DIR_ENV = "FLAXCONV_DATA_DIR"

_OFFLINE_NAMES = ("mnist", "fashion_mnist")
_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10}
# Published file names (identical for MNIST and Fashion-MNIST), per split: (images, labels).
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_SOURCES = ("auto", "raw", "tfds")

Batch = dict[str, np.ndarray]


class DatasetUnavailableError(RuntimeError):
    """A dataset can be neither read from local files nor downloaded.

    The message is a single line naming the dataset and how to provide it.
    """


def names() -> tuple[str, ...]:
    """Names of the datasets the offline (``"raw"``) source can read.

    The ``"tfds"`` source accepts these and any other tfds image-classification name.
    """
    return _OFFLINE_NAMES


def num_classes(name: str) -> int:
    """Number of label classes of dataset ``name``.

    The offline datasets are answered from a table (no TensorFlow import); any other
    name is looked up in the tfds builder's info (``features["label"].num_classes``),
    which needs ``tensorflow_datasets`` but no download.

    Raises:
        ValueError: unknown name, or a tfds dataset without a ``"label"`` class feature.
    """
    if name in _NUM_CLASSES:
        return _NUM_CLASSES[name]
    if not _tfds_importable():
        raise ValueError(
            f"unknown dataset {name!r}: without tensorflow_datasets the known names are "
            f"{list(_OFFLINE_NAMES)}"
        )
    features = _tfds_builder(name, data_dir=None).info.features
    if "label" not in features or not hasattr(features["label"], "num_classes"):
        raise ValueError(f"tfds dataset {name!r} has no 'label' class feature")
    return int(features["label"].num_classes)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file, gzipped (detected from its content) or plain.

    Returns:
        ``uint8 [N, rows, cols]`` (``[N, 28, 28]`` for MNIST) for an image file (magic
        ``0x00000803``), or ``uint8 [N]`` for a label file (magic ``0x00000801``). The
        array is a writable copy.

    Raises:
        ValueError: naming ``path``, if the magic number is neither of the above, the
            byte count does not match the header, or the gzip stream is truncated or corrupt.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic; checking content, not the suffix
        try:
            data = gzip.decompress(data)
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise _corrupt_gzip(path, error, "a complete gzipped IDX file") from None
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, expected at least a 4-byte IDX magic")
    magic = int.from_bytes(data[:4], "big")
    if magic == _IDX_IMAGES_MAGIC:
        ndim = 3
    elif magic == _IDX_LABELS_MAGIC:
        ndim = 1
    else:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{_IDX_IMAGES_MAGIC:08x} "
            f"(images) or 0x{_IDX_LABELS_MAGIC:08x} (labels)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: {len(data)} bytes, expected an IDX header of {header} bytes")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)
    if len(data) != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: header shape {shape} means {expected} bytes, "
            f"file has {len(data)}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()


def load(
    name: str,
    split: str,
    *,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads a whole split into memory.

    Args:
        name: dataset name, e.g. ``"mnist"``; see :func:`names`.
        split: ``"train"`` or ``"test"``; the tfds source also accepts tfds split
            strings such as ``"train[:10%]"``.
        source: ``"raw"`` (IDX files in ``$FLAXCONV_DATA_DIR/<name>/``, numpy only,
            original file order), ``"tfds"`` (tensorflow_datasets, prepared offline from
            ``$FLAXCONV_DATA_DIR/<name>/`` when that folder exists, else downloaded), or
            ``"auto"``: ``"tfds"`` if tensorflow_datasets and tensorflow are importable,
            else ``"raw"``.
        data_dir: tfds data dir holding prepared datasets (tfds's default, usually
            ``~/tensorflow_datasets``, when None). Unused by ``"raw"``.

    Returns:
        ``(images, labels)``: ``images`` uint8 ``[N, H, W, C]`` (``[N, 28, 28, 1]`` for
        MNIST), ``labels`` int32 ``[N]``. Both sources give the same dtypes and shapes;
        tfds's train order differs from the IDX file order.

    Raises:
        DatasetUnavailableError: the data is neither local nor downloadable.
        ValueError: unknown name, split or source, or malformed files.
    """
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {list(_SOURCES)}, got {source!r}")
    if source == "auto":
        source = "tfds" if _tfds_importable() else "raw"
    if source == "raw":
        return _load_raw(name, split)
    return _load_tfds(name, split, data_dir)


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = False,
) -> Iterator[Batch]:
    """One epoch of fixed-shape numpy batches.

    Args:
        images: ``[N, H, W, C]`` (uint8 from :func:`load`; the dtype is kept).
        labels: integer ``[N]``.
        batch_size: rows per batch, a positive int.
        shuffle: visit the examples in the order of
            ``np.random.default_rng([seed, epoch]).permutation(N)``, which is
            reproducible and differs between epochs.
        seed, epoch: non-negative ints selecting the permutation; ignored without shuffle.
        drop_remainder: drop the last partial batch instead of padding it.

    Yields:
        ``{"image": [batch_size, H, W, C] (images' dtype), "label": int32 [batch_size],
        "mask": bool [batch_size]}``. Only the last batch may be padded: its padding rows
        are zero images with label 0 and ``mask == False``, so every example appears
        exactly once with ``mask == True`` per epoch.

    Raises:
        ValueError: immediately (not on first ``next``) for a bad ``batch_size``, seed or
            epoch, arrays of the wrong rank, different lengths, or no examples.
    """
    _check_positive_int("batch_size", batch_size)
    _check_non_negative_int("seed", seed)
    _check_non_negative_int("epoch", epoch)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, H, W, C], got shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape [N], got shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(
            f"images and labels must have the same length, got {len(images)} images "
            f"and {len(labels)} labels"
        )
    if len(labels) == 0:
        raise ValueError("images and labels are empty (N=0), expected at least one example")
    n = len(labels)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return _iter_batches(images, labels, order, batch_size, drop_remainder)


def stream(
    name: str,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    data_dir: str | os.PathLike | None = None,
    buffer_size: int = 10_000,
) -> Iterator[Batch]:
    """One epoch of batches from a tf.data pipeline over the tfds dataset.

    The dataset is prepared as in :func:`load` with ``source="tfds"`` (offline from
    ``$FLAXCONV_DATA_DIR/<name>/`` when present). Each call builds a fresh pipeline and
    makes one pass over ``split``.

    Args:
        name, split, data_dir: as in :func:`load`.
        batch_size: rows per batch, a positive int.
        shuffle: shuffle file order and examples (buffer of ``buffer_size`` examples)
            with a seed derived from ``(seed, epoch)``: reproducible, and different per
            epoch when the caller passes the epoch number.
        seed, epoch: non-negative ints; ignored without shuffle.
        buffer_size: shuffle buffer size in examples, a positive int.

    Returns:
        An iterator of numpy dicts with the same keys, shapes and dtypes as
        :func:`batches`: ``image`` uint8 ``[batch_size, H, W, C]``, ``label`` int32
        ``[batch_size]``, ``mask`` bool ``[batch_size]``; the last partial batch is
        zero-padded with ``mask == False``.

    Raises:
        DatasetUnavailableError, ValueError: as in :func:`load`, at call time.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("buffer_size", buffer_size)
    _check_non_negative_int("seed", seed)
    _check_non_negative_int("epoch", epoch)
    tfds = _import_tfds()
    import tensorflow as tf

    builder = _prepared_builder(name, data_dir)
    tf_seed = int(np.random.default_rng([seed, epoch]).integers(2**31))
    ds = builder.as_dataset(
        split=split,
        shuffle_files=shuffle,
        read_config=tfds.ReadConfig(shuffle_seed=tf_seed),
    )
    _check_features(name, ds.element_spec)
    ds = ds.map(
        lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if shuffle:
        ds = ds.shuffle(buffer_size, seed=tf_seed, reshuffle_each_iteration=False)
    ds = ds.batch(batch_size).map(lambda b: _pad_tf_batch(b, batch_size))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds))


# ----------------------------------------------------------------------------- image folders

#: File suffixes :func:`image_folder` reads (Keras's list), matched case-insensitively.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
#: ``color_mode`` -> number of channels.
COLOR_MODES = {"grayscale": 1, "rgb": 3, "rgba": 4}
#: ``interpolation`` names (those of ``tf.image.resize``, as in Keras).
RESIZE_METHODS = (
    "bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic"
)
_SUBSETS = ("training", "validation", "both")
# Leading bytes of the formats tf.io.decode_image reads: a cheap check, while indexing, that
# a file named like an image is one, so a stray file fails before training, by name.
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


class ImageFolder:
    """One subset of an image folder, as returned by :func:`image_folder`.

    Two ways to train on it with :func:`flaxconv.fit`:

    * ``fit(state, folder, steps_per_epoch=folder.steps_per_epoch, ...)``, the streaming
      path: ``folder(epoch)`` runs a fresh tf.data pipeline that reads, decodes and resizes
      files in parallel (``AUTOTUNE``) and prefetches batches while the accelerator runs
      the previous step; only a few batches are in memory at a time.
    * ``fit(state, folder.arrays(), ...)``, the device-resident path, for a folder that fits
      in memory (:attr:`nbytes`): every image decoded once into one uint8 array.

    Attributes:
      directory: the folder's root (a ``Path``).
      class_names: the class names, label ``i`` meaning ``class_names[i]``: the sorted class
        subfolder names, or the ``class_names`` given to :func:`image_folder`.
      file_paths: this subset's image files (``str``): sorted by class, then path, then
        (with ``shuffle``) permuted by ``seed`` before a validation split, as Keras does.
      labels: int32 ``[num_examples]``, the class of each file.
      image_shape: ``(height, width, channels)`` of every image yielded.
      batch_size, shuffle, seed, interpolation: as given to :func:`image_folder`.
    """

    def __init__(
        self,
        directory: Path,
        class_names: tuple[str, ...],
        file_paths: tuple[str, ...],
        labels: np.ndarray,
        image_shape: tuple[int, int, int],
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        interpolation: str,
    ):
        self.directory = directory
        self.class_names = class_names
        self.file_paths = file_paths
        self.labels = labels
        self.image_shape = image_shape
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.interpolation = interpolation
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_examples(self) -> int:
        """Number of images in this subset."""
        return len(self.file_paths)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, the last one padded."""
        return -(-self.num_examples // self.batch_size)

    @property
    def nbytes(self) -> int:
        """Bytes of :meth:`arrays`'s images: ``num_examples * height * width * channels``."""
        return self.num_examples * math.prod(self.image_shape)

    def __repr__(self) -> str:
        h, w, c = self.image_shape
        return (
            f"ImageFolder({str(self.directory)!r}: {self.num_examples} images, "
            f"{len(self.class_names)} classes, {h}x{w}x{c} uint8, batch_size={self.batch_size})"
        )

    def order(self, epoch: int = 0) -> np.ndarray:
        """Indices into :attr:`file_paths` in the order epoch ``epoch`` visits them:
        ``np.random.default_rng([seed, epoch]).permutation(N)`` with shuffle (reproducible,
        different per epoch), else ``arange(N)``."""
        _check_non_negative_int("epoch", epoch)
        n = self.num_examples
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def tf_dataset(self, epoch: int = 0):
        """Epoch ``epoch`` as a ``tf.data.Dataset`` of the batch dicts of :meth:`__call__`
        (tensors): parallel read, decode and resize (``num_parallel_calls=AUTOTUNE``, in
        order), fixed-size padded batches, ``prefetch(AUTOTUNE)``."""
        return self._dataset(self.order(epoch), self.batch_size)

    def __call__(self, epoch: int = 0) -> Iterator[Batch]:
        """One epoch of numpy batches, read from disk while they are consumed.

        Yields:
          ``{"image": uint8 [batch_size, H, W, C], "label": int32 [batch_size],
          "mask": bool [batch_size]}``, like :func:`batches`: the last batch is padded with
          zero images and ``mask == False``. Examples come in :meth:`order` ``(epoch)``.

        Raises:
          ValueError: naming the file, when its batch is reached, if an image cannot be
            decoded (e.g. a truncated file).
        """
        order = self.order(epoch)
        return self._iterate(self._dataset(order, self.batch_size), order, self.batch_size)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole subset in memory, in :attr:`file_paths` order; decoded once, cached.

        Returns:
          ``(images uint8 [N, H, W, C], labels int32 [N])``, read-only numpy arrays;
          ``images`` takes :attr:`nbytes` bytes.

        Raises:
          ValueError: naming the file, if an image cannot be decoded.
        """
        if self._arrays is None:
            order, chunk = np.arange(self.num_examples), 256
            batches = self._iterate(self._dataset(order, chunk), order, chunk)
            parts = [b["image"][b["mask"]] for b in batches]
            images = np.concatenate(parts)
            labels = self.labels.copy()
            images.flags.writeable = labels.flags.writeable = False
            self._arrays = (images, labels)
        return self._arrays

    def _dataset(self, order: np.ndarray, batch_size: int):
        tf = _import_tf()

        paths = np.asarray(self.file_paths, dtype=str)[order]
        ds = tf.data.Dataset.from_tensor_slices({"path": paths, "label": self.labels[order]})
        shape, interpolation = self.image_shape, self.interpolation

        def load(example):
            return {"image": _load_image(example["path"], shape, interpolation),
                    "label": example["label"]}

        ds = ds.map(
            load,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,  # keeps the epoch's order, and lets an error name its batch
        )
        ds = ds.batch(batch_size).map(lambda b: _pad_tf_batch(b, batch_size))
        return ds.prefetch(tf.data.AUTOTUNE)

    def _iterate(self, ds, order: np.ndarray, batch_size: int) -> Iterator[Batch]:
        import tensorflow as tf

        iterator = ds.as_numpy_iterator()
        for step in itertools.count():
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except tf.errors.OpError as err:
                batch_files = [self.file_paths[i] for i in order[step * batch_size :][:batch_size]]
                raise _decode_error(batch_files, err) from None
            yield batch


def image_folder(
    directory: str | os.PathLike,
    image_size: tuple[int, int] = (256, 256),
    color_mode: str = "rgb",
    batch_size: int = 32,
    shuffle: bool = True,
    seed: int | None = None,
    validation_split: float | None = None,
    subset: str | None = None,
    label_mode: str = "int",
    interpolation: str = "bilinear",
    class_names: tuple[str, ...] | list[str] | None = None,
) -> ImageFolder | tuple[ImageFolder, ImageFolder]:
    """Keras's ``image_dataset_from_directory`` for :func:`flaxconv.fit`.

    ``directory/<class name>/**/<image>``: one subfolder per class (hidden ones, starting
    with ".", are ignored), labels from the sorted subfolder names (or ``class_names``),
    every JPEG, PNG, BMP or GIF file (first frame) below them, resized to ``image_size``.

    Why this shape: the result is an :class:`ImageFolder`, which is both a callable
    ``epoch -> iterator of numpy batches`` (fit's streaming path, for data that does not
    fit in memory) and has :meth:`ImageFolder.arrays` (fit's device-resident path, for data
    that does). The pipeline is plain tf.data rather than tfds's ``ImageFolder`` builder,
    which needs a split level (``root/<split>/<class>/``), neither resizes nor splits off a
    validation subset, and whose decode errors do not name the file. Images stay uint8
    (resized ones are rounded back to uint8, at most 0.5/255 off Keras's float32 output):
    a quarter of the bytes to move, and the train step scales them to [0, 1] on device.

    Args:
      directory: the folder.
      image_size: ``(height, width)`` of the output; other sizes are resized with
        ``interpolation`` (no crop, so the aspect ratio may change, as in Keras).
      color_mode: "grayscale" (1 channel), "rgb" (3) or "rgba" (4); images are converted
        (RGB to gray by luminance, gray replicated, alpha 255 added or dropped).
      batch_size: rows per batch.
      shuffle: visit the images in a new order each epoch (see :meth:`ImageFolder.order`),
        and permute the file list by ``seed`` before a validation split (as Keras).
      seed: non-negative int; ``None`` draws one (kept in ``.seed``). Required with
        ``validation_split`` and ``shuffle``, so both subsets come from the same permutation.
      validation_split: fraction in (0, 1) held out for validation: the last
        ``int(validation_split * N)`` files of the (permuted) list. For a seed, the same
        files Keras picks (``np.random.RandomState(seed)``, Keras's file order).
      subset: with ``validation_split``: "training", "validation" or "both" (a pair).
      label_mode: "int" (int32 class ids; the only one: the loss takes integer labels).
      interpolation: a ``tf.image.resize`` method, e.g. "bilinear" or "nearest".
      class_names: the classes and their order, label ``i`` meaning ``class_names[i]``;
        default: the sorted subfolder names. Give a test or validation folder the training
        folder's ``class_names``, so that its labels mean the same classes even when it
        lacks some of them. A subfolder not in the list is an error.

    Returns:
      An :class:`ImageFolder`, or ``(training, validation)`` for ``subset="both"``.

    Raises:
      FileNotFoundError: ``directory`` does not exist.
      ValueError: bad arguments; a folder without class subfolders or without images; a
        subfolder not in ``class_names`` (named); files named like images that are not
        JPEG/PNG/BMP/GIF or cannot be read (all named).
      Files that are not images (by suffix) are skipped with a warning naming them.
    """
    if label_mode != "int":
        raise ValueError(
            f"label_mode={label_mode!r}; expected 'int' (the loss takes integer class ids, "
            "so one-hot 'categorical' or 'binary' labels are not needed)"
        )
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode={color_mode!r}; expected one of {list(COLOR_MODES)}")
    if not (
        isinstance(image_size, tuple | list)
        and len(image_size) == 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
                for s in image_size)
    ):
        raise ValueError(f"image_size={image_size!r}; expected (height, width), positive ints")
    if interpolation not in RESIZE_METHODS:
        raise ValueError(f"interpolation={interpolation!r}; expected one of {list(RESIZE_METHODS)}")
    _check_positive_int("batch_size", batch_size)
    if seed is not None:
        _check_non_negative_int("seed", seed)
    if validation_split:
        if not 0.0 < validation_split < 1.0:
            raise ValueError(
                f"validation_split={validation_split!r}; expected a fraction in (0, 1)"
            )
        if subset not in _SUBSETS:
            raise ValueError(
                f"subset={subset!r}; with a validation_split expected one of {list(_SUBSETS)}"
            )
        if shuffle and seed is None:
            raise ValueError(
                "validation_split with shuffle=True needs a seed, so that the training and "
                "validation subsets come from the same permutation and do not overlap"
            )
    elif subset is not None:
        raise ValueError(f"subset={subset!r} needs a validation_split in (0, 1)")
    if class_names is not None:
        if isinstance(class_names, str) or not all(
            isinstance(name, str) and name for name in class_names
        ):
            raise ValueError(
                f"class_names={class_names!r}; expected a list of class subfolder names"
            )
        class_names = tuple(class_names)
        repeated = sorted({name for name in class_names if class_names.count(name) > 1})
        if not class_names or repeated:
            raise ValueError(
                f"class_names={list(class_names)}; expected distinct names, at least one"
                + (f" ({repeated} repeated)" if repeated else "")
            )
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))

    root = Path(directory)
    class_names, files, labels = _index_folder(root, class_names)
    if shuffle:
        # Keras's index_directory permutes the file list with RandomState(seed).shuffle;
        # permutation() draws the same permutation, so a seed splits like Keras.
        order = np.random.RandomState(seed).permutation(len(files))
        files, labels = [files[i] for i in order], labels[order]

    def subset_of(lo: int, hi: int) -> ImageFolder:
        return ImageFolder(
            root, class_names, tuple(files[lo:hi]), labels[lo:hi],
            (int(image_size[0]), int(image_size[1]), COLOR_MODES[color_mode]),
            batch_size=batch_size, shuffle=shuffle, seed=seed, interpolation=interpolation,
        )

    n = len(files)
    if not validation_split:
        return subset_of(0, n)
    num_val = int(validation_split * n)
    if not 0 < num_val < n:
        raise ValueError(
            f"validation_split={validation_split} of {n} images leaves {num_val} for "
            "validation; expected at least one image in each subset"
        )
    training, validation = subset_of(0, n - num_val), subset_of(n - num_val, n)
    return {"training": training, "validation": validation, "both": (training, validation)}[
        subset
    ]


def write_image_folder(
    directory: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...] | list[str],
) -> Path:
    """Writes ``images`` as ``directory/<class_names[label]>/<n>.png`` (lossless PNG).

    ``<n>`` is the 1-based position in ``images``, zero-padded (at least 5 digits) so the
    sorted file names keep the input order. Every class gets its subfolder, even an empty
    one. The folder is written under a temporary name and renamed at the end, so an
    interrupted call leaves no partial folder behind.

    Args:
      directory: the folder to create; it must not exist.
      images: uint8 ``[N, H, W, C]`` with C in (1, 3, 4).
      labels: int ``[N]`` in ``[0, len(class_names))``.
      class_names: the subfolder name of each label.

    Returns:
      ``Path(directory)``.

    Raises:
      FileExistsError: ``directory`` exists. ValueError: bad shapes, dtypes or labels.
    """
    from PIL import Image  # Pillow comes with matplotlib

    directory = Path(directory)
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"images are {images.dtype}{list(images.shape)}; expected uint8 [N, H, W, C], "
            "C in (1, 3, 4)"
        )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels are {labels.dtype}{list(labels.shape)}; expected int [{len(images)}]"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(
            f"labels span [{labels.min()}, {labels.max()}]; expected [0, {len(class_names)}) "
            f"for {len(class_names)} class names"
        )
    if directory.exists():
        raise FileExistsError(f"{directory} exists; expected a new folder to write images into")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name in class_names:
            (tmp / name).mkdir(parents=True)
        width = max(5, len(str(len(images))))
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            pixels = image[..., 0] if image.shape[-1] == 1 else image
            Image.fromarray(pixels).save(tmp / class_names[label] / f"{i + 1:0{width}d}.png")
        os.replace(tmp, directory)
    except BaseException:  # a full disk, Ctrl-C: no partial folder, hidden or not
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ----------------------------------------------------------------------------- Sign Language MNIST

#: The 24 letters of Sign Language MNIST (J and Z need motion and have no images); label
#: ``i`` of :func:`load_sign_language_mnist` is ``SIGN_LANGUAGE_CLASSES[i]``.
SIGN_LANGUAGE_CLASSES = tuple("ABCDEFGHIKLMNOPQRSTUVWXY")
_SIGN_LANGUAGE_DIR = "sign_language_mnist"
_SIGN_LANGUAGE_SPLITS = {  # split: (CSV file stem, image-folder subfolder)
    "train": ("sign_mnist_train", "Train"),
    "test": ("sign_mnist_test", "Test"),
}


def load_sign_language_mnist(
    split: str, root: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sign Language MNIST from its Kaggle CSV, with numpy only.

    Reads ``<root>/sign_language_mnist/sign_mnist_<split>.csv.gz`` (or ``.csv``); ``root``
    defaults to ``$FLAXCONV_DATA_DIR``. Each row is a label (the letter's alphabet index,
    A=0 ... Y=24, never 9=J or 25=Z) and 784 pixels.

    Args:
      split: "train" (27,455 images) or "test" (7,172).
      root: folder holding ``sign_language_mnist/``.

    Returns:
      ``(images uint8 [N, 28, 28, 1], labels int32 [N])`` in file order; labels are
      remapped to 0..23 by ``l - (l > 9)``, so label ``i`` is ``SIGN_LANGUAGE_CLASSES[i]``.

    Raises:
      DatasetUnavailableError: the file is not there. ValueError: a bad split or a
      malformed file (naming it and the bad value).
    """
    if split not in _SIGN_LANGUAGE_SPLITS:
        raise ValueError(f"split={split!r}; expected one of {list(_SIGN_LANGUAGE_SPLITS)}")
    base = Path(root).expanduser() if root is not None else _env_dir()
    if base is None:
        raise _unavailable(_SIGN_LANGUAGE_DIR, f"{DATA_DIR_ENV} is not set")
    stem = _SIGN_LANGUAGE_SPLITS[split][0]
    candidates = [base / _SIGN_LANGUAGE_DIR / f"{stem}.csv{suffix}" for suffix in (".gz", "")]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise _unavailable(
            _SIGN_LANGUAGE_DIR, f"neither {candidates[0]} nor {candidates[1]} exists"
        )
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    expected = "the complete Kaggle CSV"
    try:
        with (gzip.open if gzipped else open)(path, "rt") as f:
            header = f.readline().strip()
            if not header.startswith("label,pixel1,"):
                raise ValueError(
                    f"{path}: header {header[:40]!r}...; expected 'label,pixel1,...'"
                )
            try:
                rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
            except ValueError as error:  # e.g. a last row cut short
                raise ValueError(
                    f"{path} is truncated or corrupt ({_one_line(error)}); expected {expected} "
                    "(a label and 784 pixels per row): download it again"
                ) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise _corrupt_gzip(path, error, expected) from None
    if rows.shape[1] != 1 + 28 * 28:
        raise ValueError(f"{path}: rows of {rows.shape[1]} values; expected a label and 784 pixels")
    raw, pixels = rows[:, 0], rows[:, 1:]
    bad = (raw < 0) | (raw > 24) | (raw == 9)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{path}: data row {row + 1} has label {raw[row]}; expected 0..24 without 9 (J)"
        )
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(
            f"{path}: pixel values span [{pixels.min()}, {pixels.max()}]; expected 0..255"
        )
    images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, (raw - (raw > 9)).astype(np.int32)


def sign_language_folder(
    directory: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    complete_existing: bool = False,
) -> Path:
    """Sign Language MNIST as an image folder, the layout the seed notebook reads.

    ``<directory>/Train/<letter>/<n>.png`` and ``<directory>/Test/<letter>/<n>.png`` from
    :func:`load_sign_language_mnist`, where ``<n>`` is the zero-padded 1-based CSV row and
    ``<letter>`` one of :data:`SIGN_LANGUAGE_CLASSES`:

    * ``directory`` holds both ``Train/`` and ``Test/``: it is used as it is (nothing is
      read or written), so calling this again is cheap.
    * ``directory`` does not exist (or is an empty folder): both CSVs are read and checked
      first, then written into a temporary folder beside it that is renamed to
      ``directory`` at the end, so a failure (a bad CSV, a full disk, Ctrl-C) leaves
      nothing behind.
    * ``directory`` holds something else: an error, since it is not a folder this function
      wrote, and nothing is written into it; with ``complete_existing=True`` (the caller
      asked for the folder to be written there) the missing splits are written into it,
      each under a temporary name renamed at the end, after every CSV they need has been
      read.

    Returns:
      ``Path(directory)``; read it with ``image_folder(directory / "Train",
      image_size=(28, 28), color_mode="grayscale", ...)``.

    Raises:
      ValueError: ``directory`` is a file, or exists without a split (without
      ``complete_existing``); a malformed, truncated or corrupt CSV (naming it).
      DatasetUnavailableError: a CSV is not there.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file; expected a folder for Train/ and Test/")
    missing = {
        split: folder
        for split, (_, folder) in _SIGN_LANGUAGE_SPLITS.items()
        if not (directory / folder).is_dir()
    }
    if not missing:
        return directory
    fresh = not directory.exists() or not any(directory.iterdir())
    if not fresh and not complete_existing:
        raise ValueError(
            f"{directory} exists but has no {' or '.join(f'{f}/' for f in missing.values())}; "
            f"expected a Sign Language folder with Train/ and Test/ (e.g. from "
            f"experiments/make_sign_language_folder.py --out {directory}), or a new or "
            f"empty folder to write it in"
        )
    # Every input is read and checked before anything is written.
    splits = {split: load_sign_language_mnist(split, root) for split in missing}
    if not fresh:  # complete_existing
        for split, folder in missing.items():
            write_image_folder(directory / folder, *splits[split], SIGN_LANGUAGE_CLASSES)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for split, folder in missing.items():
            write_image_folder(tmp / folder, *splits[split], SIGN_LANGUAGE_CLASSES)
        os.replace(tmp, directory)  # also over an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ----------------------------------------------------------------------------- helpers


def _iter_batches(
    images: np.ndarray,
    labels: np.ndarray,
    order: np.ndarray,
    batch_size: int,
    drop_remainder: bool,
) -> Iterator[Batch]:
    n = len(order)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield _pad_batch(images[idx], labels[idx].astype(np.int32), batch_size)


def _pad_batch(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Batch:
    """Pads ``k <= batch_size`` rows to ``batch_size`` with zeros, masking the pads."""
    k = len(labels)
    mask = np.arange(batch_size) < k
    if k < batch_size:
        pad = batch_size - k
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    return {"image": images, "label": labels, "mask": mask}


def _pad_tf_batch(batch, batch_size: int):
    """tf.data counterpart of :func:`_pad_batch`; keeps the batch dimension static."""
    import tensorflow as tf

    image, label = batch["image"], batch["label"]
    k = tf.shape(label)[0]
    pad = batch_size - k
    image = tf.pad(image, [[0, pad]] + [[0, 0]] * (image.shape.rank - 1))
    label = tf.pad(label, [[0, pad]])
    return {
        "image": tf.ensure_shape(image, [batch_size, *image.shape[1:]]),
        "label": tf.ensure_shape(label, [batch_size]),
        "mask": tf.sequence_mask(k, batch_size),
    }


def _index_folder(
    root: Path, class_names: tuple[str, ...] | None = None
) -> tuple[tuple[str, ...], list[str], np.ndarray]:
    """Class names, image files and labels of an image folder, in Keras's order; with
    ``class_names``, labels are indices into it and every subfolder must be in it."""
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"image folder {root} is a file; expected a folder of class subfolders")
    found = tuple(
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    )
    if not found:
        loose = sum(1 for p in root.iterdir() if p.is_file())
        raise ValueError(
            f"image folder {root} has no class subfolders ({loose} files directly in it); "
            f"expected {root}/<class name>/<image files>, one subfolder per class"
        )
    if class_names is None:
        class_names = found
    unknown = [name for name in found if name not in class_names]
    if unknown:
        raise ValueError(
            f"image folder {root} has class subfolder(s) {unknown} that are not in "
            f"class_names {list(class_names)}; expected only those classes (e.g. the "
            f"training folder's)"
        )
    files, labels, others = [], [], []
    for label, name in enumerate(class_names):
        if name not in found:
            continue  # a class without images here (e.g. a test folder that lacks one)
        for dirpath, _, filenames in sorted(os.walk(root / name), key=lambda walk: walk[0]):
            for filename in sorted(filenames):
                path = os.path.join(dirpath, filename)
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(path)
                    labels.append(label)
                elif not filename.startswith("."):
                    others.append(path)
    if others:
        warnings.warn(
            f"image folder {root}: skipped {len(others)} file(s) without an image suffix "
            f"{IMAGE_EXTENSIONS}: {_some(others)}",
            stacklevel=3,
        )
    if not files:
        raise ValueError(
            f"image folder {root} has no images in its {len(class_names)} class subfolder(s) "
            f"{_some(list(class_names))}; expected files ending in {IMAGE_EXTENSIONS}"
        )
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # I/O bound: one small read each
        problems = list(pool.map(_image_problem, files))
    bad = [f"{path} ({problem})" for path, problem in zip(files, problems, strict=True) if problem]
    if bad:
        raise ValueError(
            f"image folder {root}: {len(bad)} file(s) named like images are not readable "
            f"JPEG, PNG, BMP or GIF images: {_some(bad)}"
        )
    return class_names, files, np.asarray(labels, np.int32)


def _image_problem(path: str) -> str | None:
    """Why ``path`` is not a readable image (by its first bytes), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        return f"cannot be read: {err.strerror}"
    if not head:
        return "empty file"
    if not head.startswith(_IMAGE_SIGNATURES):
        return f"starts with {head!r}, not a JPEG, PNG, BMP or GIF signature"
    return None


def _some(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _import_tf():
    """TensorFlow for input pipelines only: accelerators hidden from it (as in Flax's
    examples), so it never takes memory that JAX needs."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialized its devices; leave them
        pass
    return tf


def _load_image(path, shape: tuple[int, int, int], interpolation: str):
    """tf: read and decode one image file to uint8 ``shape`` (channels converted, resized)."""
    import tensorflow as tf

    height, width, channels = shape
    image = tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False)
    image = _to_channels(image, channels)
    same_size = tf.logical_and(tf.shape(image)[0] == height, tf.shape(image)[1] == width)

    def resize():
        resized = tf.image.resize(image, (height, width), method=interpolation)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

    image = tf.cond(same_size, lambda: image, resize)
    return tf.ensure_shape(image, shape)


def _to_channels(image, channels: int):
    """tf: uint8 ``[H, W, c]`` with c in 1..4 (gray, gray+alpha, RGB, RGBA) -> ``channels``.

    tf.io.decode_image cannot convert GIF or BMP to grayscale itself, so decode at the
    native channel count and convert here.
    """
    import tensorflow as tf

    c = tf.shape(image)[-1]
    if channels == 1:
        return tf.cond(
            c >= 3, lambda: tf.image.rgb_to_grayscale(image[..., :3]), lambda: image[..., :1]
        )
    rgb = tf.cond(c >= 3, lambda: image[..., :3], lambda: tf.repeat(image[..., :1], 3, axis=-1))
    if channels == 3:
        return rgb
    alpha = tf.cond(
        c % 2 == 0,  # gray+alpha or RGBA
        lambda: image[..., -1:],
        lambda: tf.fill(tf.shape(image[..., :1]), tf.constant(255, tf.uint8)),
    )
    return tf.concat([rgb, alpha], axis=-1)


def _decode_error(files: list[str], err: Exception) -> ValueError:
    """The error for a batch that failed to load: names the files that fail on their own."""
    import tensorflow as tf

    bad = []
    for path in files:
        try:
            tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False)
        except tf.errors.OpError as file_err:
            bad.append(f"{path} ({_one_line(file_err.message, 120)})")
    if bad:
        return ValueError(f"cannot decode image file(s) {_some(bad)}; expected valid JPEG, PNG, "
                          "BMP or GIF images")
    return ValueError(
        f"reading the batch of {files[0]} ... {files[-1]} failed: {_one_line(str(err))}"
    )

def _check_positive_int(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


def _check_non_negative_int(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")


def _one_line(text: str, limit: int = 200) -> str:
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _corrupt_gzip(path: Path, error: Exception, expected: str) -> ValueError:
    """The error for a gzip file that does not decompress (cut short, garbled)."""
    return ValueError(
        f"{path} is truncated or corrupt (gzip: {type(error).__name__}: {_one_line(error)}); "
        f"expected {expected}: download it again"
    )


def _unavailable(name: str, reason: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"dataset {name!r} is unavailable ({_one_line(reason)}); provide network access for "
        f"tensorflow_datasets, or set {DATA_DIR_ENV} to a folder laid out like "
        f"shared/datasets/, i.e. <dir>/{name}/<published file names>"
    )


def _env_dir() -> Path | None:
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def _tfds_importable() -> bool:
    # The tfds source needs TensorFlow too (as_dataset); find_spec avoids importing it here.
    if importlib.util.find_spec("tensorflow") is None:
        return False
    try:
        import tensorflow_datasets  # noqa: F401
    except Exception:  # tfds 4.9.10 can fail with non-ImportErrors on broken installs
        return False
    return True


def _load_raw(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in _OFFLINE_NAMES:
        raise ValueError(
            f"unknown dataset {name!r} for source='raw', expected one of {list(_OFFLINE_NAMES)} "
            "(any tensorflow_datasets name works with source='tfds')"
        )
    if split not in _SPLIT_FILES:
        raise ValueError(
            f"split {split!r} is not supported by source='raw', expected one of "
            f"{list(_SPLIT_FILES)} (slices such as 'train[:10%]' need source='tfds')"
        )
    root = _env_dir()
    if root is None:
        raise _unavailable(name, f"{DATA_DIR_ENV} is not set")
    paths = [root / name / filename for filename in _SPLIT_FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise _unavailable(name, f"{DATA_DIR_ENV}={root} but {', '.join(missing)} not found")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(
            f"{paths[0]} and {paths[1]}: expected an image file and a label file, got "
            f"arrays of shapes {images.shape} and {labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels"
        )
    return images[..., np.newaxis], labels.astype(np.int32)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            f"the tfds source needs tensorflow_datasets and tensorflow ({err}); install "
            "flaxconv[tfds] (flaxconv[tfds,tf] where no TensorFlow is installed), or use "
            "source='raw' with FLAXCONV_DATA_DIR"
        ) from err
    return tfds


def _load_tfds(name: str, split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    tfds = _import_tfds()

    builder = _prepared_builder(name, data_dir)
    # Same as tfds.load(name, split=split, batch_size=-1, as_supervised=False,
    # data_dir=data_dir) once prepared; calling the builder directly reuses the one
    # _prepared_builder already prepared (and whose download errors it already translated).
    # batch_size=-1 gives the whole split as one dict of eager tensors, not a tf.data pipeline.
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=False))
    _check_features(name, data)
    images = np.asarray(data["image"])
    if images.ndim != 4:
        raise ValueError(f"tfds dataset {name!r}: expected images [N, H, W, C], got {images.shape}")
    return images, np.asarray(data["label"]).astype(np.int32)


def _check_features(name: str, example) -> None:
    """``example``: a dict of features (arrays or tf.data element specs)."""
    if not isinstance(example, dict) or not {"image", "label"} <= example.keys():
        keys = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise ValueError(f"tfds dataset {name!r} has features {keys}, expected 'image' and 'label'")


def _offline_dir(name: str) -> Path | None:
    """``$FLAXCONV_DATA_DIR/<name>`` if it exists, for tfds to use as its manual_dir."""
    root = _env_dir()
    if root is None or not (root / name).is_dir():
        return None
    folder = root / name
    if name in _OFFLINE_NAMES:
        # Fail fast: tfds would try to download missing files, which without network takes
        # minutes of retries before failing.
        expected = [f for pair in _SPLIT_FILES.values() for f in pair]
        missing = [f for f in expected if not (folder / f).is_file()]
        if missing:
            raise _unavailable(name, f"{folder} lacks {', '.join(missing)}")
    return folder


def _tfds_builder(name: str, data_dir):
    """The tfds builder for ``name`` in ``data_dir``; not necessarily prepared."""
    tfds = _import_tfds()

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        # tfds's own message lists every registered dataset over hundreds of lines.
        raise ValueError(
            f"unknown dataset {name!r}: expected one of {list(_OFFLINE_NAMES)} or any other "
            "tensorflow_datasets name (see tfds.list_builders())"
        ) from None
    return builder


def _prepared_builder(name: str, data_dir):
    """The tfds builder for ``name``, prepared in ``data_dir`` (offline when possible)."""
    builder = _tfds_builder(name, data_dir)
    if not builder.is_prepared():
        _prepare(builder, name)
    return builder


def _prepare(builder, name: str) -> None:
    """Runs tfds's own download_and_prepare, from local files when we have them.

    tfds 4.9.10's DownloadManager uses ``manual_dir/<file name>`` in place of a
    download whenever the dataset's registered checksums record a file name, which they
    do for mnist and fashion_mnist (url_checksums/*.txt lists the published names). It
    still verifies size and sha256 against the registered values (NonMatchingChecksumError
    on mismatch) and needs no network. The downloads folder would then only hold
    extracted copies of the IDX files, so it goes to a temporary folder; the prepared
    dataset itself is cached in the tfds data dir.
    """
    tfds = _import_tfds()

    manual_dir = _offline_dir(name)
    try:
        if manual_dir is None:
            builder.download_and_prepare()
        else:
            config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
            with tempfile.TemporaryDirectory(prefix="flaxconv-tfds-downloads-") as tmp:
                builder.download_and_prepare(download_dir=tmp, download_config=config)
    except Exception as err:
        where = f"from {manual_dir}" if manual_dir else "by downloading"
        raise _unavailable(
            name, f"tensorflow_datasets could not prepare it {where}: {type(err).__name__}: {err}"
        ) from err
