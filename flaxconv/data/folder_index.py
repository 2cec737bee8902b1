"""Which files an image folder holds, and their labels, in Keras's order; and writing arrays
as an image folder."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from flaxconv.data._common import _some

#: File suffixes :func:`flaxconv.data.image_folder` reads (Keras's list), matched
#: case-insensitively.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# Leading bytes of the formats read: a cheap check, while indexing, that a file named like
# an image is one, so a stray file fails before training, by name.
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def index_classes(
    root: Path, class_names: tuple[str, ...] | None, follow_links: bool
) -> tuple[tuple[str, ...], list[str], np.ndarray]:
    """Keras's ``index_directory`` with ``labels="inferred"``: one class per subfolder.

    Returns:
      ``(class_names, files, labels)``: the sorted subfolder names (hidden ones, starting
      with ".", ignored) or the given ``class_names``; the image files of each class in
      turn, each class's folder walked in sorted order (``os.walk``, into linked folders
      only with ``follow_links``); int32 ``[len(files)]`` indices into ``class_names``.
      With ``class_names``, every subfolder must be in it (a name without a subfolder has
      no images here, e.g. a test folder that lacks a class).

    Raises:
      FileNotFoundError, ValueError: see :func:`flaxconv.data.image_folder`.
    """
    _check_root(root)
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
        if name in found:
            images, skipped = _walk(root / name, follow_links)
            files += images
            labels += [label] * len(images)
            others += skipped
    _warn_skipped(root, others)
    if not files:
        raise ValueError(
            f"image folder {root} has no images in its {len(class_names)} class subfolder(s) "
            f"{_some(list(class_names))}; expected files ending in {IMAGE_EXTENSIONS}"
        )
    _check_signatures(root, files)
    return class_names, files, np.asarray(labels, np.int32)


def index_files(root: Path, follow_links: bool) -> list[str]:
    """Keras's ``index_directory`` with explicit labels or ``labels=None``: every image file
    below ``root`` (subfolders included, the folder structure ignored), in ``os.walk``'s
    sorted order, the order Keras asks explicit labels to follow.

    Raises:
      FileNotFoundError, ValueError: see :func:`flaxconv.data.image_folder`.
    """
    _check_root(root)
    files, others = _walk(root, follow_links)
    _warn_skipped(root, others)
    if not files:
        raise ValueError(
            f"image folder {root} has no images; expected files ending in {IMAGE_EXTENSIONS} "
            "in it or its subfolders"
        )
    _check_signatures(root, files)
    return files


def check_labels(labels, class_names) -> np.ndarray | None:
    """The explicit labels as int64 ``[N]``, or None for "inferred" / None."""
    if labels is None or (isinstance(labels, str) and labels == "inferred"):
        if labels is None and class_names is not None:
            raise ValueError(
                f"class_names={list(class_names)} with labels=None; class names need "
                "labels='inferred' (an unlabeled folder has no classes)"
            )
        return None
    array = np.asarray(labels) if isinstance(labels, list | tuple | np.ndarray) else None
    if (
        array is None
        or array.ndim != 1
        or not (array.size == 0 or np.issubdtype(array.dtype, np.integer))
        or (array.size and array.min() < 0)
    ):
        raise ValueError(
            f"labels={_short(labels)}; expected 'inferred', None, or a list of non-negative "
            "int labels, one per image file in sorted path order"
        )
    if class_names is not None:
        raise ValueError(
            f"class_names={list(class_names)} with explicit labels; class names need "
            "labels='inferred' (with explicit labels they are the sorted distinct labels)"
        )
    return array.astype(np.int64)


def check_class_names(class_names) -> tuple[str, ...]:
    if isinstance(class_names, str) or not all(
        isinstance(name, str) and name for name in class_names
    ):
        raise ValueError(f"class_names={class_names!r}; expected a list of class subfolder names")
    class_names = tuple(class_names)
    repeated = sorted({name for name in class_names if class_names.count(name) > 1})
    if not class_names or repeated:
        raise ValueError(
            f"class_names={list(class_names)}; expected distinct names, at least one"
            + (f" ({repeated} repeated)" if repeated else "")
        )
    return class_names


def explicit_labels(
    labels: np.ndarray, files: list[str], root: Path
) -> tuple[tuple[str, ...], np.ndarray]:
    """Keras's explicit labels: ``(class_names, labels int32)``, the class names being the
    sorted distinct labels as strings (each label keeps its value, as in Keras)."""
    if len(labels) != len(files):
        raise ValueError(
            f"labels has {len(labels)} entries but image folder {root} has {len(files)} "
            "image files; expected one label per file, in sorted path order"
        )
    return tuple(str(label) for label in sorted(set(labels.tolist()))), labels.astype(np.int32)


def check_encodable(labels: np.ndarray, class_names: tuple[str, ...], label_mode: str) -> None:
    """One-hot and binary encodings need labels in ``[0, len(class_names))``: explicit labels
    such as ``[0, 5]`` would be all-zero rows in Keras; here they are an error."""
    high = len(class_names)
    if labels.size and labels.max() >= high:
        raise ValueError(
            f"labels span [{labels.min()}, {labels.max()}] with label_mode={label_mode!r}; "
            f"expected labels in [0, {high}) for {high} distinct labels"
        )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_root(root: Path) -> None:
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"image folder {root} is a file; expected a folder of class subfolders")


def _walk(top: Path, follow_links: bool) -> tuple[list[str], list[str]]:
    """``(image files, other files)`` below ``top``, folders in sorted order, then names
    (Keras's ``iter_valid_files``); hidden non-image files (e.g. ``.DS_Store``) are dropped."""
    images, others = [], []
    walk = os.walk(top, followlinks=follow_links)
    for dirpath, _, filenames in sorted(walk, key=lambda entry: entry[0]):
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            if filename.lower().endswith(IMAGE_EXTENSIONS):
                images.append(path)
            elif not filename.startswith("."):
                others.append(path)
    return images, others


def _warn_skipped(root: Path, others: list[str]) -> None:
    if others:
        warnings.warn(
            f"image folder {root}: skipped {len(others)} file(s) without an image suffix "
            f"{IMAGE_EXTENSIONS}: {_some(others)}",
            stacklevel=4,
        )


def _check_signatures(root: Path, files: list[str]) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # I/O bound: one small read each
        problems = list(pool.map(_image_problem, files))
    bad = [f"{path} ({problem})" for path, problem in zip(files, problems, strict=True) if problem]
    if bad:
        raise ValueError(
            f"image folder {root}: {len(bad)} file(s) named like images are not readable "
            f"JPEG, PNG, BMP or GIF images: {_some(bad)}"
        )


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
    from PIL import Image

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
