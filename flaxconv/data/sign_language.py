"""Sign Language MNIST: its Kaggle CSVs read with numpy, and written as an image folder."""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from flaxconv.data._common import DATA_DIR_ENV, _corrupt_gzip, _env_dir, _one_line, _unavailable
from flaxconv.data.folder_index import write_image_folder

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
