"""Datasets as numpy arrays and fixed-shape numpy batches.

One module per concept:

* :mod:`~flaxconv.data.sources`: whole datasets in memory. ``"raw"`` reads the published
  gzipped IDX files of MNIST / Fashion-MNIST from ``$FLAXCONV_DATA_DIR/<name>/`` with numpy
  only, so it works without TensorFlow (a GPU box, a Colab TPU runtime); ``"tfds"`` goes
  through ``tensorflow_datasets``, which prepares its dataset from those files with no
  network when ``$FLAXCONV_DATA_DIR/<name>/`` holds them.
* :mod:`~flaxconv.data.batching`: fixed-shape batches of in-memory arrays.
* :mod:`~flaxconv.data.tf_stream`: batches from a tf.data pipeline over a tfds dataset.
* :mod:`~flaxconv.data.image_folders`: Keras's ``image_dataset_from_directory``, with
  :mod:`~flaxconv.data.folder_index` (which files, which labels) and
  :mod:`~flaxconv.data.images` (one file decoded and resized as Keras does, with Pillow).
* :mod:`~flaxconv.data.sign_language`: Sign Language MNIST's CSVs, and as an image folder.

TensorFlow and tfds are imported inside the functions that need them (the tfds source and
:func:`stream`), never at module import time; everything else runs without them.

Batches are dicts ``{"image": [B, H, W, C], "label": int32 [B], "mask": bool [B]}``
that always have exactly ``batch_size`` rows: the last partial batch is padded and
its padding rows have ``mask == False``, so a jitted step compiles once and every
example counts exactly once.
"""

from flaxconv.data._common import DATA_DIR_ENV, Batch, DatasetUnavailableError
from flaxconv.data.batching import batches
from flaxconv.data.folder_index import IMAGE_EXTENSIONS, write_image_folder
from flaxconv.data.image_folders import ImageFolder, image_folder
from flaxconv.data.images import COLOR_MODES, RESIZE_METHODS, read_image
from flaxconv.data.sign_language import (
    SIGN_LANGUAGE_CLASSES,
    load_sign_language_mnist,
    sign_language_folder,
)
from flaxconv.data.sources import load, names, num_classes, read_idx
from flaxconv.data.tf_stream import stream

__all__ = [
    "COLOR_MODES",
    "DATA_DIR_ENV",
    "IMAGE_EXTENSIONS",
    "RESIZE_METHODS",
    "SIGN_LANGUAGE_CLASSES",
    "Batch",
    "DatasetUnavailableError",
    "ImageFolder",
    "batches",
    "image_folder",
    "load",
    "load_sign_language_mnist",
    "names",
    "num_classes",
    "read_idx",
    "read_image",
    "sign_language_folder",
    "stream",
    "write_image_folder",
]
