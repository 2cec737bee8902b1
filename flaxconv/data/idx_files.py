"""The published IDX files of MNIST and Fashion-MNIST, read with numpy alone (the ``"raw"``
source of :func:`flaxconv.data.load`): which files a split has, their published SHA-256
sums, and the IDX format.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path

import numpy as np

from flaxconv.data._common import DATA_DIR_ENV, _corrupt_gzip, _env_dir, _unavailable

_OFFLINE_NAMES = ("mnist", "fashion_mnist")
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


def _raw_files_present(name: str, split: str) -> bool:
    root = _env_dir()
    files = _SPLIT_FILES.get(split, ()) if name in _OFFLINE_NAMES else ()
    return bool(files) and root is not None and all((root / name / f).is_file() for f in files)


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
