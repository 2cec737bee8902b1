"""What the data modules share: the data-folder variable, the unavailable-dataset error,
argument checks and one-line messages."""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import numpy as np

DATA_DIR_ENV = "FLAXCONV_DATA_DIR"

Batch = dict[str, np.ndarray]


class DatasetUnavailableError(RuntimeError):
    """A dataset can be neither read from local files nor downloaded.

    The message is a single line naming the dataset and how to provide it.
    """


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


def _corrupt_gzip(path: Path, error: Exception, expected: str) -> ValueError:
    """The error for a gzip file that does not decompress (cut short, garbled)."""
    return ValueError(
        f"{path} is truncated or corrupt (gzip: {type(error).__name__}: {_one_line(error)}); "
        f"expected {expected}: download it again"
    )


def _unavailable(name: str, reason: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"dataset {name!r} is unavailable ({_one_line(reason)}); provide network access for "
        f"tensorflow_datasets, or set {DATA_DIR_ENV} to a folder laid out like "
        f"shared/datasets/, i.e. <dir>/{name}/<published file names>"
    )


def _env_dir() -> Path | None:
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None



def _some(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def num_batches(num_examples: int, batch_size: int) -> int:
    """Batches in one epoch of ``num_examples``, the last one padded: ``ceil(N / B)``."""
    return -(-num_examples // batch_size)


def check_start(start: int, num_examples: int, batch_size: int) -> int:
    """``start`` as an int: a number of batches to skip, at most the epoch's batches.

    Raises:
      ValueError: naming ``start`` and the epoch's number of batches.
    """
    _check_non_negative_int("start", start)
    total = num_batches(num_examples, batch_size)
    if start > total:
        raise ValueError(
            f"start={start}; expected at most {total}, the batches of one epoch "
            f"({num_examples} examples, batch_size={batch_size})"
        )
    return int(start)
