"""Whole datasets as numpy arrays: :func:`load` reads the published IDX files with numpy
(:mod:`~flaxconv.data.idx_files`) or goes through tfds (:mod:`~flaxconv.data.tfds_source`);
:func:`names`, :func:`num_classes` and :func:`class_names` describe them.

TensorFlow and tfds are imported inside the functions that need them, never at module
import time.
"""

from __future__ import annotations

import os

import numpy as np

from flaxconv.data.idx_files import _OFFLINE_NAMES, _load_raw, _raw_files_present
from flaxconv.data.tfds_source import _load_tfds, _tfds_builder, _tfds_importable

_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10}

# tfds's label names (features["label"].names), which Keras's docs list too.
_CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}

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
