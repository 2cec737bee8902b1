"""The ``"tfds"`` source of :func:`flaxconv.data.load`: a dataset prepared by
tensorflow_datasets, offline from ``$FLAXCONV_DATA_DIR/<name>/`` when that folder holds the
published files; without TensorFlow, an array_record preparation read by
``tfds.data_source``. TensorFlow and tfds are imported inside the functions, never at module
import time.
"""

from __future__ import annotations

import importlib.util
import socket
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from flaxconv.data._common import (
    DATA_DIR_ENV,
    DatasetUnavailableError,
    _env_dir,
    _one_line,
    _unavailable,
)
from flaxconv.data.idx_files import _OFFLINE_NAMES, _SPLIT_FILES


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
