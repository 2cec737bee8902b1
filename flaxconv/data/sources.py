"""Whole datasets as numpy arrays: the published IDX files read with numpy, or tfds.

TensorFlow and tfds are imported inside the functions that need them, never at module
import time.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import math
import os
import socket
import tempfile
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from flaxconv.data._common import (
    DATA_DIR_ENV,
    DatasetUnavailableError,
    _corrupt_gzip,
    _env_dir,
    _one_line,
    _unavailable,
)

_OFFLINE_NAMES = ("mnist", "fashion_mnist")
_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10}
# tfds's label names (features["label"].names), which Keras's docs list too.
_CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}
# Published file names (identical for MNIST and Fashion-MNIST), per split: (images, labels).
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# SHA-256 of the published files: the sums tensorflow_datasets registers for its downloads
# (url_checksums/mnist.txt, fashion_mnist.txt), so the raw source checks what tfds checks.
_PUBLISHED_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}
#: An empty file of this name in ``$FLAXCONV_DATA_DIR/<name>/`` marks the files there as
#: your own: the raw source reads them without comparing them with the published files.
CUSTOM_FILES_MARKER = "CUSTOM_FILES"
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_SOURCES = ("auto", "raw", "tfds")


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
    return int(_label_feature(name).num_classes)


def class_names(name: str) -> tuple[str, ...]:
    """What label ``i`` of dataset ``name`` means, ``class_names(name)[i]``: the digits
    ``"0"``-``"9"`` for MNIST, Fashion-MNIST's garment names, else the tfds builder's
    ``features["label"].names`` (as :func:`num_classes`; no download).

    Raises:
        ValueError: as :func:`num_classes`.
    """
    if name in _CLASS_NAMES:
        return _CLASS_NAMES[name]
    return tuple(str(label) for label in _label_feature(name).names)


def _label_feature(name: str):
    """The tfds ``ClassLabel`` feature ``"label"`` of a dataset that is not in our tables."""
    if not _tfds_importable():
        raise ValueError(
            f"unknown dataset {name!r}: without tensorflow_datasets the known names are "
            f"{list(_OFFLINE_NAMES)}"
        )
    features = _tfds_builder(name, data_dir=None).info.features
    if "label" not in features or not hasattr(features["label"], "num_classes"):
        raise ValueError(f"tfds dataset {name!r} has no 'label' class feature")
    return features["label"]


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
            ``"auto"``: ``"raw"`` when ``$FLAXCONV_DATA_DIR/<name>/`` holds the split's
            IDX files (the same data without importing TensorFlow, seconds faster), else
            ``"tfds"`` if tensorflow_datasets is importable, else ``"raw"``. Without
            TensorFlow installed, ``"tfds"`` reads a preparation in the array_record format
            (``tfds.data_source``'s) and refuses, in one line, to prepare one.
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
        source = "raw" if _raw_files_present(name, split) or not _tfds_importable() else "tfds"
    if source == "raw":
        return _load_raw(name, split)
    return _load_tfds(name, split, data_dir)


def _raw_files_present(name: str, split: str) -> bool:
    root = _env_dir()
    files = _SPLIT_FILES.get(split, ()) if name in _OFFLINE_NAMES else ()
    return bool(files) and root is not None and all((root / name / f).is_file() for f in files)


def _tfds_importable() -> bool:
    """Whether tensorflow_datasets imports (with TensorFlow, or without it: then only its
    array_record preparations can be read, see :func:`_load_data_source`)."""
    try:
        import tensorflow_datasets  # noqa: F401
    except Exception:  # tfds 4.9.10 can fail with non-ImportErrors on broken installs
        return False
    return True


def _tensorflow_importable() -> bool:
    # find_spec: whether it is installed, without importing it (seconds). A None entry in
    # sys.modules or an import hook that refuses it raises instead.
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ValueError, ImportError):
        return False


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
    for path in paths:  # after reading: a truncated file is named as such first
        _check_published(name, path)
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


def _check_published(name: str, path: Path) -> None:
    """Refuses a file of ``$FLAXCONV_DATA_DIR/<name>/`` that is not the published one
    (another dataset's file under this name, a damaged download), unless its folder holds
    :data:`CUSTOM_FILES_MARKER`.

    Raises:
        ValueError: naming the file, both SHA-256 sums (abridged), the dataset the file
            belongs to when it is another published one, and the two ways out.
    """
    if (path.parent / CUSTOM_FILES_MARKER).exists():
        return
    expected = _PUBLISHED_SHA256[name][path.name]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest == expected:
        return
    owner = next((f"it is {other}'s {file}" for other, files in _PUBLISHED_SHA256.items()
                  for file, sha in files.items() if sha == digest), "a damaged download?")
    raise ValueError(
        f"{path} is not the published {name} file (SHA-256 {digest[:16]}..., expected "
        f"{expected[:16]}...; {owner}); download it again, or, to train on files of your "
        f"own, create an empty {path.parent / CUSTOM_FILES_MARKER}"
    )


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
    if not _tensorflow_importable():
        return _load_data_source(tfds, name, split, data_dir)

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


def _load_data_source(tfds, name: str, split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    """``split`` of a dataset that tfds prepared in the array_record format (what
    ``tfds.data_source`` prepares), read with ``tfds.data_source``: no TensorFlow. Preparing
    (or reading a tfrecord preparation) needs TensorFlow, so those are errors here."""
    where = data_dir or "tfds's default data dir"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # noqa: BLE001 - tfds raises many kinds; each becomes this line
        raise DatasetUnavailableError(
            f"dataset {name!r} is unavailable: TensorFlow is not installed, and without it "
            f"only a tfds preparation in the array_record format can be read, which {where} "
            f"does not hold ({type(err).__name__}: {_one_line(err, 120)}); prepare one where "
            f"TensorFlow is installed with tfds.data_source({name!r}, data_dir=...), install "
            f"tensorflow, or put the published files in ${DATA_DIR_ENV}/{name}/"
        ) from err
    try:
        # All records in one call: array_record reads them in parallel (1.5x one by one).
        read_all = getattr(source, "__getitems__", None)
        keys = list(range(len(source)))
        examples = list(read_all(keys)) if read_all else [source[i] for i in keys]
    except Exception as err:  # noqa: BLE001 - a corrupt or truncated file, in any wording
        raise DatasetUnavailableError(
            f"dataset {name!r}: its array_record preparation of split {split!r} in {where} "
            f"could not be read ({type(err).__name__}: {_one_line(err, 160)}); it is corrupt "
            f"or truncated: delete it and prepare it again with tfds.data_source({name!r}, "
            f"data_dir=...) where TensorFlow is installed"
        ) from err
    if not examples:
        raise _unavailable(name, f"split {split!r} is empty")
    _check_features(name, examples[0])
    images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
    labels = np.asarray([e["label"] for e in examples], np.int32)
    return images, labels


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
    if manual_dir is None:
        _check_reachable(builder, name)
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


def _check_reachable(builder, name: str, timeout: float = 5.0) -> None:
    """Fails fast when none of the hosts ``builder`` downloads from can be reached: offline,
    tfds retries each download with back-off for minutes before it gives up.

    Raises:
        DatasetUnavailableError: naming the dataset, a host and why it is unreachable.
    """
    urls = getattr(builder, "url_infos", None) or {}
    if urllib.request.getproxies():
        return  # requests would go through the proxy; a direct connection proves nothing
    hosts = sorted({(u.hostname, u.port or (80 if u.scheme == "http" else 443))
                    for u in map(urllib.parse.urlsplit, urls) if u.hostname})
    if not hosts:
        return  # nothing registered to probe: leave it to tfds
    reason = ""
    for host, port in hosts[:3]:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return
        except OSError as error:
            reason = f"cannot reach {host}:{port} to download it: {error.strerror or error}"
    raise _unavailable(name, reason)
