"""Predict from the command line: the top classes of image files under a saved model.

    python -m flaxconv.predict --model runs/mnist_convnet/saved_model digit.png photo.jpg

prints one line per file, its top-3 classes (``--top``) with their softmax probabilities,
named by the class names the run recorded (else by their index)::

    digit.png: 7 99.1%, 1 0.5%, 9 0.2%

Each file is read as :func:`flaxconv.data.image_folder` reads images (the data package's
own :func:`flaxconv.data.read_image`): converted to the model's channels (grayscale, rgb
or rgba) and resized to its input size with ``--interpolation``, or cropped or padded to
the aspect ratio first. A file that cannot be read gets one line on stderr naming it and
the others are still predicted; every error is one line, never a traceback
(``FLAXCONV_DEBUG=1`` shows one). The exit status is 0 when every file was predicted, else 1.

This module is the command; ``fc.predict`` is the jitted step
(:data:`flaxconv.steps.predict`), which importing ``flaxconv.predict`` leaves in place.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from flaxconv import data, saved_model, steps

#: Model channels -> the ``color_mode`` files are read with.
COLOR_MODE = {channels: mode for mode, channels in data.COLOR_MODES.items()}


def read_images(
    paths: Sequence[str],
    input_shape: tuple[int, int, int],
    interpolation: str = "bilinear",
    *,
    crop_to_aspect_ratio: bool = False,
    pad_to_aspect_ratio: bool = False,
) -> tuple[np.ndarray, list[str], list[str]]:
    """The files at ``paths`` as the model's input, and which could not be read.

    Returns:
      ``(images, read, errors)``: uint8 ``[len(read), H, W, C]`` of the files in ``read``
      (in the order given), and one line per file that could not be read, naming it.

    Raises:
      ValueError: ``input_shape``'s channels are not 1, 3 or 4 (image files have no other
        form), naming both shapes; an unknown ``interpolation``.
    """
    if interpolation not in data.RESIZE_METHODS:
        raise ValueError(f"interpolation={interpolation!r}; expected one of "
                         f"{list(data.RESIZE_METHODS)}")
    height, width, channels = input_shape
    if channels not in COLOR_MODE:
        raise ValueError(
            f"the model takes images of shape {tuple(input_shape)}; image files are read as "
            f"({height}, {width}, 1), ({height}, {width}, 3) or ({height}, {width}, 4) "
            "(grayscale, rgb or rgba), so its channels cannot come from a file"
        )
    images, read, errors = [], [], []
    for path in paths:
        try:
            images.append(data.read_image(
                path, (height, width), COLOR_MODE[channels], interpolation,
                crop_to_aspect_ratio=crop_to_aspect_ratio,
                pad_to_aspect_ratio=pad_to_aspect_ratio,
            ))
            read.append(path)
        except ValueError as error:  # read_image's one line, naming the file
            errors.append(str(error) if os.path.exists(path)
                          else f"image file {path} does not exist")
    stacked = np.stack(images) if images else np.zeros((0, *input_shape), np.uint8)
    return stacked, read, errors


def top_classes(logits: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, probabilities)``, both ``[N, min(k, num_classes)]``: the ``k`` most
    probable classes of each row of float ``[N, num_classes]`` logits, most probable first,
    and their softmax probabilities (float64, from float32 logits)."""
    logits = np.asarray(logits, np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    k = min(k, logits.shape[-1])
    classes = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return classes, np.take_along_axis(probabilities, classes, -1)


def predict_batched(state: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """``fc.predict`` over ``images`` in batches of ``min(batch_size, N)`` (the last one
    padded), so every batch has one shape and compiles once. Float32 ``[N, classes]``."""
    n = len(images)
    size = max(1, min(batch_size, n))
    out = []
    for start in range(0, n, size):
        chunk = images[start:start + size]
        padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]),
                                                 chunk.dtype)])
        out.append(np.asarray(steps.predict(state, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def format_line(path: str, classes: np.ndarray, probabilities: np.ndarray,
                class_names: Sequence[str] | None) -> str:
    """``"path: name 97.3%, name 1.2%, ..."`` for one file (class indices without names)."""
    names = [class_names[c] if class_names else str(c) for c in classes]
    return f"{path}: " + ", ".join(
        f"{name} {100 * p:.1f}%" for name, p in zip(names, probabilities, strict=True))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flaxconv.predict",
        description="Top classes of image files under a saved model (fc.save_model).",
    )
    parser.add_argument("--model", required=True,
                        help="a saved model directory, e.g. runs/mnist_convnet/saved_model")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="JPEG, PNG, BMP or GIF files")
    parser.add_argument("--top", type=int, default=3, help="classes per file (default: 3)")
    parser.add_argument("--interpolation", default="bilinear", type=str.lower,
                        choices=data.RESIZE_METHODS, metavar="METHOD",
                        help=f"resize method, one of {', '.join(data.RESIZE_METHODS)} "
                             "(default: bilinear)")
    aspect = parser.add_mutually_exclusive_group()
    aspect.add_argument("--crop-to-aspect-ratio", action="store_true",
                        help="resize the largest centred crop of the model's aspect ratio")
    aspect.add_argument("--pad-to-aspect-ratio", action="store_true",
                        help="resize to fit, keeping the aspect ratio, and pad with black")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per predict call (default: 64)")
    args = parser.parse_args(argv)
    for name in ("top", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}; expected >= 1")
    return args


def run(args: argparse.Namespace) -> int:
    """Predicts ``args.images`` with ``args.model``; prints a line per file. Returns the
    exit status: 1 when some file could not be read, else 0."""
    info = saved_model.model_info(args.model)
    state = saved_model.load_model(args.model)
    images, read, errors = read_images(
        args.images, tuple(state.input_shape), args.interpolation,
        crop_to_aspect_ratio=args.crop_to_aspect_ratio,
        pad_to_aspect_ratio=args.pad_to_aspect_ratio,
    )
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    logits = predict_batched(state, images, args.batch_size)
    classes, probabilities = top_classes(logits, args.top) if read else ((), ())
    for path, c, p in zip(read, classes, probabilities, strict=True):
        print(format_line(path, c, p, info["class_names"]), flush=True)
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command: parses ``argv`` (default ``sys.argv[1:]``) and :func:`run` s it. Any
    error is one line on stderr and exit status 1 (``FLAXCONV_DEBUG=1``: the traceback)."""
    args = parse_args(argv)
    try:
        return run(args)
    except Exception as error:  # noqa: BLE001 - the command's contract: one line, no trace
        if os.environ.get("FLAXCONV_DEBUG"):
            raise
        known = isinstance(error, ValueError | TypeError | OSError)
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        kind = "" if known and message else f"{type(error).__name__}: "
        print(f"error: {kind}{message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "flaxconv.predict":
    # Importing a submodule sets it as an attribute of its package, which would replace
    # fc.predict (the jitted step) by this module; standing in for it in sys.modules makes
    # the import set the step itself. The command runs as __main__ and is unaffected.
    sys.modules[__name__] = steps.predict
