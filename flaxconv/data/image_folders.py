"""Image folders: Keras's ``image_dataset_from_directory`` for :func:`flaxconv.fit`, read with
Pillow and numpy (no TensorFlow), streamed through grain's read threads
(:mod:`flaxconv.data.grain_stream`) in :func:`flaxconv.epochs.epoch_order`."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from flaxconv.data import images as _images
from flaxconv.data._common import (
    Batch,
    _check_non_negative_int,
    _check_positive_int,
    _some,
    num_batches,
)
from flaxconv.data.folder_index import (
    check_class_names,
    check_encodable,
    check_labels,
    explicit_labels,
    index_classes,
    index_files,
)
from flaxconv.data.grain_stream import default_workers, grain_batches, in_order
from flaxconv.epochs.order import epoch_order

_LABEL_MODES = ("int", "categorical", "binary", None)
_SUBSETS = ("training", "validation", "both")


class ImageFolder:
    """One subset of an image folder, as returned by :func:`image_folder`.

    Two ways to train on it with :func:`flaxconv.fit`:

    * ``fit(state, folder, steps_per_epoch=folder.steps_per_epoch, ...)``, the streaming
      path: ``folder(epoch)`` reads, decodes and resizes files on grain's read threads
      (:func:`flaxconv.data.grain_batches`; Pillow and numpy release the GIL) a few batches
      ahead of the step that consumes them; only those batches are in memory. A resumed
      run's ``folder(epoch, start=k)`` skips the ``k`` batches done without reading them.
    * ``fit(state, folder.arrays(), ...)``, the device-resident path, for a folder that fits
      in memory (:attr:`nbytes`): every image decoded once into one uint8 array.

    Attributes:
      directory: the folder's root (a ``Path``).
      class_names: label ``i`` means ``class_names[i]``: the sorted class subfolder names,
        or the ``class_names`` given to :func:`image_folder`; with explicit ``labels``, the
        sorted distinct labels as strings (as Keras); None without labels.
      file_paths: this subset's image files (``str``): in Keras's order (by class, then
        path), then (with ``shuffle``) permuted by ``seed`` before a validation split.
      labels: int32 ``[num_examples]``, the class index of each file; None without labels.
      label_mode: how batches encode :attr:`labels`: "int" (int32 ``[B]``), "categorical"
        (float32 one-hot ``[B, len(class_names)]``), "binary" (float32 ``[B, 1]``), or None
        (batches without a "label").
      image_shape: ``(height, width, channels)`` of every image yielded.
      batch_size, shuffle, seed, interpolation, crop_to_aspect_ratio, pad_to_aspect_ratio:
        as given to :func:`image_folder` (``shuffle`` is False for the validation half of
        ``subset="both"``).
    """

    def __init__(
        self,
        directory: Path,
        class_names: tuple[str, ...] | None,
        file_paths: tuple[str, ...],
        labels: np.ndarray | None,
        image_shape: tuple[int, int, int],
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        interpolation: str,
        label_mode: str | None = "int",
        crop_to_aspect_ratio: bool = False,
        pad_to_aspect_ratio: bool = False,
    ):
        self.directory = directory
        self.class_names = class_names
        self.file_paths = file_paths
        self.labels = labels
        self.label_mode = label_mode if labels is not None else None
        self.image_shape = image_shape
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.interpolation = interpolation
        self.crop_to_aspect_ratio = crop_to_aspect_ratio
        self.pad_to_aspect_ratio = pad_to_aspect_ratio
        self._arrays: tuple[np.ndarray, np.ndarray | None] | None = None

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
        classes = "unlabeled" if self.labels is None else f"{len(self.class_names)} classes"
        return (
            f"ImageFolder({str(self.directory)!r}: {self.num_examples} images, {classes}, "
            f"{h}x{w}x{c} uint8, batch_size={self.batch_size})"
        )

    def order(self, epoch: int = 0) -> np.ndarray:
        """Indices into :attr:`file_paths` in the order epoch ``epoch`` visits them:
        :func:`flaxconv.epochs.epoch_order` ``(seed, epoch, N)`` with shuffle (the order of
        every path: reproducible, different per epoch), else ``arange(N)``."""
        _check_non_negative_int("epoch", epoch)
        n = self.num_examples
        if not self.shuffle:
            return np.arange(n)
        return epoch_order(self.seed, epoch, n)

    def __call__(
        self, epoch: int = 0, start: int = 0, *, workers: int | None = None
    ) -> Iterator[Batch]:
        """One epoch of numpy batches, read from disk while they are consumed, through
        :func:`flaxconv.data.grain_batches`.

        Args:
          epoch: a non-negative int, selecting :meth:`order` ``(epoch)``.
          start: batches to skip without reading them, a non-negative int at most
            :attr:`steps_per_epoch` (``fc.fit`` passes the steps a resumed epoch had done).
          workers: read threads (see :func:`flaxconv.data.grain_batches`); the batches are
            the same for any number.

        Yields:
          ``{"image": uint8 [batch_size, H, W, C], "label": [batch_size, ...], "mask": bool
          [batch_size]}``, like :func:`flaxconv.data.batches`: the last batch is padded with
          zero images and labels and ``mask == False``. ``label`` as :attr:`label_mode` says
          (no ``label`` without labels). Examples come in :meth:`order` ``(epoch)``.

        Raises:
          ValueError: at call time for a bad ``epoch``, ``start`` or ``workers``; naming the
            files, when their batch is reached, if images cannot be decoded (e.g. a
            truncated file).
        """
        _check_non_negative_int("epoch", epoch)
        return grain_batches(
            _Files(self), self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=epoch,
            start=start, workers=workers, collate=self._collate,
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The whole subset in memory, in :attr:`file_paths` order; decoded once, cached.

        Returns:
          ``(images uint8 [N, H, W, C], labels)``, read-only numpy arrays; ``labels`` is
          encoded as in batches (int32 ``[N]`` for "int"), or None without labels.
          ``images`` takes :attr:`nbytes` bytes.

        Raises:
          ValueError: naming every file that cannot be decoded.
        """
        if self._arrays is None:
            images = np.empty((self.num_examples, *self.image_shape), np.uint8)
            files = _Files(self)
            chunk = _ARRAYS_CHUNK

            def decode(c: int) -> list[str]:
                """Decodes chunk ``c`` into ``images``; the files that failed, described."""
                bad = []
                for i in range(c * chunk, min((c + 1) * chunk, self.num_examples)):
                    image, problem = files[i]
                    if problem:
                        bad.append(f"{self.file_paths[i]} ({problem})")
                    else:
                        images[i] = image
                return bad

            chunks = num_batches(self.num_examples, chunk)
            bad = [b for found in in_order(decode, chunks, workers=default_workers())
                   for b in found]
            if bad:
                raise ValueError(_undecodable(bad))
            labels = None
            if self.labels is not None:
                labels = self._encode(self.labels, self.num_examples)
                labels.flags.writeable = False
            images.flags.writeable = False
            self._arrays = (images, labels)
        return self._arrays

    def _collate(self, decoded: list, indices: np.ndarray) -> dict[str, np.ndarray]:
        """``k`` :class:`_Files` results of the files ``indices`` -> ``{"image": uint8 [k,
        H, W, C], "label": [k, ...]}`` (no ``label`` without labels); raises naming every
        one of those files that did not decode."""
        bad = [f"{self.file_paths[i]} ({problem})"
               for i, (_, problem) in zip(indices, decoded, strict=True) if problem]
        if bad:
            raise ValueError(_undecodable(bad))
        batch = {"image": np.stack([image for image, _ in decoded])}
        if self.labels is not None:
            batch["label"] = self._encode(self.labels[indices], len(indices))
        return batch

    def _read_one(self, path: str) -> tuple[np.ndarray | None, str | None]:
        height, width, channels = self.image_shape
        try:
            image = _images.decode(path, channels)
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ...
            return None, _images.decode_problem(err)
        image = _images.fit_to_size(
            image, (height, width), self.interpolation,
            self.crop_to_aspect_ratio, self.pad_to_aspect_ratio,
        )
        return image, None

    def _encode(self, labels: np.ndarray, rows: int) -> np.ndarray:
        """Class indices int ``[k]``, k <= rows -> :attr:`label_mode`'s encoding with
        ``rows`` rows, the rows after ``k`` zero (padding)."""
        k = len(labels)
        if self.label_mode == "categorical":
            out = np.zeros((rows, len(self.class_names)), np.float32)
            out[np.arange(k), labels] = 1.0
        elif self.label_mode == "binary":
            out = np.zeros((rows, 1), np.float32)
            out[:k, 0] = labels
        else:
            out = np.zeros(rows, np.int32)
            out[:k] = labels
        return out


# Files per task of arrays()'s one-off decode: enough to amortise grain's per-task cost.
_ARRAYS_CHUNK = 256


class _Files:
    """An :class:`ImageFolder`'s files as a grain source: ``files[i]`` is ``(image uint8
    [H, W, C], None)`` or ``(None, why file i does not decode)``. Thread-safe."""

    def __init__(self, folder: ImageFolder):
        self._folder = folder

    def __len__(self) -> int:
        return self._folder.num_examples

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, str | None]:
        return self._folder._read_one(self._folder.file_paths[index])


def _undecodable(bad: list[str]) -> str:
    return (f"cannot decode image file(s) {_some(bad)}; expected valid JPEG, PNG, BMP or GIF "
            "images")


def image_folder(
    directory: str | os.PathLike,
    image_size: int | tuple[int, int] = (256, 256),
    color_mode: str = "rgb",
    batch_size: int = 32,
    shuffle: bool = True,
    seed: int | None = None,
    validation_split: float | None = None,
    subset: str | None = None,
    label_mode: str | None = "int",
    interpolation: str = "bilinear",
    class_names: Sequence[str] | None = None,
    *,
    labels: str | Sequence[int] | None = "inferred",
    follow_links: bool = False,
    crop_to_aspect_ratio: bool = False,
    pad_to_aspect_ratio: bool = False,
) -> ImageFolder | tuple[ImageFolder, ImageFolder]:
    """Keras's ``image_dataset_from_directory`` for :func:`flaxconv.fit`, without TensorFlow.

    ``directory/<class name>/**/<image>``: one subfolder per class (hidden ones, starting
    with ".", are ignored), labels from the sorted subfolder names (or ``class_names``),
    every JPEG, PNG, BMP or GIF file (first frame) below them, resized to ``image_size``.
    Files, order, validation split and pixels are Keras's (see :mod:`flaxconv.data.images`
    for how the pixels compare); the images stay uint8 (Keras's float32 rounded, half to
    even, and clipped to [0, 255]): a quarter of the bytes to move, and the train step
    scales them to [0, 1] on device.

    Why this shape: the result is an :class:`ImageFolder`, which is both a callable
    ``epoch -> iterator of numpy batches`` (fit's streaming path, for data that does not
    fit in memory) and has :meth:`ImageFolder.arrays` (fit's device-resident path, for data
    that does). Pillow and numpy do the work, so it runs where TensorFlow is absent (a
    Colab TPU runtime).

    Args:
      directory: the folder.
      image_size: ``(height, width)`` of the output, or an int for a square; other sizes
        are resized with ``interpolation`` (stretched, unless cropped or padded below).
      color_mode: "grayscale" (1 channel), "rgb" (3) or "rgba" (4); images are converted
        as TensorFlow's decoders convert them (see :mod:`flaxconv.data.images`).
      batch_size: rows per batch.
      shuffle: visit the images in a new order each epoch (see :meth:`ImageFolder.order`),
        and permute the file list by ``seed`` before a validation split (as Keras).
      seed: non-negative int; ``None`` draws one (kept in ``.seed``). Required with
        ``validation_split`` and ``shuffle``, so both subsets come from the same permutation.
      validation_split: fraction in (0, 1) held out for validation: the last
        ``int(validation_split * N)`` files of the (permuted) list. For a seed, the same
        files Keras picks (``np.random.RandomState(seed)``, Keras's file order).
      subset: with ``validation_split``: "training", "validation" or "both" (a pair whose
        validation half is never reshuffled, as in Keras).
      label_mode: "int" (int32 class ids, what :func:`flaxconv.fit` and
        :func:`flaxconv.train_step` take), "categorical" (float32 one-hot ``[B, classes]``)
        or "binary" (float32 ``[B, 1]``, exactly 2 classes), for a loss of one's own; or
        None: no labels (as ``labels=None``).
      interpolation: a ``tf.image.resize`` method, e.g. "bilinear" or "nearest" (any case).
      class_names: with ``labels="inferred"``, the classes and their order, label ``i``
        meaning ``class_names[i]``; default: the sorted subfolder names. Give a test or
        validation folder the training folder's ``class_names``, so that its labels mean
        the same classes even when it lacks some of them. A subfolder not in the list is an
        error (Keras instead ignores it, and refuses a name without a subfolder).
      labels: "inferred" (from the subfolders); a list of non-negative int labels, one per
        image file below ``directory`` (subfolders included, the structure ignored) in
        sorted path order (``os.walk``), as Keras; or None: no labels, for a folder of
        images to predict (batches and :meth:`ImageFolder.arrays` then have no labels).
      follow_links: also walk into linked folders below the class subfolders (a linked
        class subfolder itself is always read, as in Keras).
      crop_to_aspect_ratio: resize the largest centred crop with ``image_size``'s aspect
        ratio instead of stretching (Keras's ``smart_resize``).
      pad_to_aspect_ratio: resize to fit inside ``image_size`` keeping the aspect ratio and
        pad with black, centred (``tf.image.resize_with_pad``).

    Returns:
      An :class:`ImageFolder`, or ``(training, validation)`` for ``subset="both"``.

    Raises:
      FileNotFoundError: ``directory`` does not exist.
      ValueError: bad arguments (naming the value and what is valid); a folder without
        class subfolders or without images; a subfolder not in ``class_names`` (named);
        explicit labels of another length than the files; files named like images that
        are not JPEG/PNG/BMP/GIF or cannot be read (all named). A file that is an image by
        its first bytes but does not decode is named when its batch is read.
      Files that are not images (by suffix) are skipped with a warning naming them.
    """
    channels = _images.check_color_mode(color_mode)
    height, width = _images.check_image_size(image_size)
    interpolation = _images.check_interpolation(interpolation)
    _images.check_aspect_ratio_flags(crop_to_aspect_ratio, pad_to_aspect_ratio)
    _check_positive_int("batch_size", batch_size)
    if not isinstance(follow_links, bool | np.bool_):
        raise ValueError(f"follow_links={follow_links!r}; expected True or False")
    if seed is not None:
        _check_non_negative_int("seed", seed)
    _check_split(validation_split, subset, shuffle, seed)
    if label_mode not in _LABEL_MODES:
        raise ValueError(f"label_mode={label_mode!r}; expected one of {list(_LABEL_MODES)}")
    explicit = check_labels(labels, class_names)
    if class_names is not None:
        class_names = check_class_names(class_names)
    if label_mode is None:
        labels = None
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))

    root = Path(directory)
    if isinstance(labels, str):  # "inferred"
        class_names, files, label_ids = index_classes(root, class_names, follow_links)
    else:
        files = index_files(root, follow_links)
        class_names, label_ids = None, None
        if labels is not None:
            class_names, label_ids = explicit_labels(explicit, files, root)
    if label_mode == "binary" and len(class_names) != 2:
        raise ValueError(
            f"label_mode='binary' with {len(class_names)} classes {_some(list(class_names))}; "
            "expected exactly 2 (use 'int' or 'categorical' for more)"
        )
    if label_ids is not None and label_mode in ("categorical", "binary"):
        check_encodable(label_ids, class_names, label_mode)
    if shuffle:
        # Keras's index_directory permutes the file list with RandomState(seed).shuffle;
        # permutation() draws the same permutation, so a seed splits like Keras.
        order = np.random.RandomState(seed).permutation(len(files))
        files = [files[i] for i in order]
        label_ids = None if label_ids is None else label_ids[order]

    def subset_of(lo: int, hi: int, reshuffle: bool) -> ImageFolder:
        return ImageFolder(
            root, class_names, tuple(files[lo:hi]),
            None if label_ids is None else label_ids[lo:hi], (height, width, channels),
            batch_size=batch_size, shuffle=reshuffle, seed=seed, interpolation=interpolation,
            label_mode=label_mode, crop_to_aspect_ratio=bool(crop_to_aspect_ratio),
            pad_to_aspect_ratio=bool(pad_to_aspect_ratio),
        )

    n = len(files)
    if not validation_split:
        return subset_of(0, n, shuffle)
    num_val = int(validation_split * n)
    if not 0 < num_val < n:
        raise ValueError(
            f"validation_split={validation_split} of {n} images leaves {num_val} for "
            "validation; expected at least one image in each subset"
        )
    training = subset_of(0, n - num_val, shuffle)
    if subset == "training":
        return training
    if subset == "validation":  # alone, Keras shuffles it like any dataset
        return subset_of(n - num_val, n, shuffle)
    return training, subset_of(n - num_val, n, False)  # Keras never shuffles this one


def _check_split(validation_split, subset, shuffle, seed) -> None:
    if validation_split:
        if not (isinstance(validation_split, numbers.Real) and 0.0 < validation_split < 1.0):
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
