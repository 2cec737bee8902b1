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

import gzip
import importlib.util
import math
import numbers
import os
import tempfile
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
        ValueError: naming ``path``, if the magic number is neither of the above or the
            byte count does not match the header.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic; checking content, not the suffix
        data = gzip.decompress(data)
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
            "flaxconv[tfds], or use source='raw' with FLAXCONV_DATA_DIR"
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
