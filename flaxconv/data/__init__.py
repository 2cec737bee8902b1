"""Datasets as numpy arrays and fixed-shape numpy batches.

One module per concept:

* :mod:`~flaxconv.data.sources`: whole datasets in memory. ``"raw"``
  (:mod:`~flaxconv.data.idx_files`) reads the published gzipped IDX files of MNIST /
  Fashion-MNIST from ``$FLAXCONV_DATA_DIR/<name>/`` with numpy only, so it works without
  TensorFlow (a GPU box, a Colab TPU runtime); ``"tfds"``
  (:mod:`~flaxconv.data.tfds_source`) goes through ``tensorflow_datasets``, which prepares
  its dataset from those files with no network when ``$FLAXCONV_DATA_DIR/<name>/`` holds
  them.
* :mod:`~flaxconv.data.batching`: fixed-shape batches of in-memory arrays.
* :mod:`~flaxconv.data.grain_stream`: the streaming pipeline, for data that does not sit
  on the device: any random-access source (``len`` + ``source[i]``) read by grain's
  threads, in :func:`flaxconv.epochs.epoch_order`, the last batch padded and masked, and
  ``start=k`` skipping ``k`` batches without reading them (how ``fc.fit`` resumes a
  streamed epoch). Image folders and :func:`stream` go through it.
* :mod:`~flaxconv.data.streaming`: :func:`stream`, a named dataset by grain (the default:
  the split read to host memory, no TensorFlow, the order of every other path) or by
  ``backend="tf"``, :mod:`~flaxconv.data.tf_stream`'s tf.data pipeline (its shuffle is a
  buffer of examples, not :func:`~flaxconv.epochs.epoch_order`).
* :mod:`~flaxconv.data.image_folders`: Keras's ``image_dataset_from_directory``, with
  :mod:`~flaxconv.data.folder_index` (which files, which labels) and
  :mod:`~flaxconv.data.images` (one file decoded and resized as Keras does, with Pillow).
* :mod:`~flaxconv.data.sign_language`: Sign Language MNIST's CSVs, and as an image folder.

TensorFlow and tfds are imported inside the functions that need them (the tfds source and
``stream(..., backend="tf")``), never at module import time; everything else, grain
included, runs without them. grain is imported when a pipeline is built.

Batches are dicts ``{"image": [B, H, W, C], "label": int32 [B], "mask": bool [B]}``
that always have exactly ``batch_size`` rows: the last partial batch is padded and
its padding rows have ``mask == False``, so a jitted step compiles once and every
example counts exactly once.
"""

from flaxconv.data._common import DATA_DIR_ENV, Batch, DatasetUnavailableError
from flaxconv.data.batching import batches
from flaxconv.data.folder_index import IMAGE_EXTENSIONS, write_image_folder
from flaxconv.data.grain_stream import ArraySource, grain_batches
from flaxconv.data.idx_files import read_idx
from flaxconv.data.image_folders import ImageFolder, image_folder
from flaxconv.data.images import COLOR_MODES, RESIZE_METHODS, read_image
from flaxconv.data.sign_language import (
    SIGN_LANGUAGE_CLASSES,
    load_sign_language_mnist,
    sign_language_folder,
)
from flaxconv.data.sources import class_names, load, names, num_classes
from flaxconv.data.streaming import BACKENDS, stream

__all__ = [
    "BACKENDS",
    "COLOR_MODES",
    "DATA_DIR_ENV",
    "IMAGE_EXTENSIONS",
    "RESIZE_METHODS",
    "SIGN_LANGUAGE_CLASSES",
    "ArraySource",
    "Batch",
    "DatasetUnavailableError",
    "ImageFolder",
    "batches",
    "class_names",
    "grain_batches",
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
