"""A tiny learnable dataset shared by the fit and callback tests."""

import numpy as np


def pixel_dataset(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[n, 8, 8, 1]`` noise images whose class shows as one bright pixel, and int32
    labels in ``[0, classes)``: learnable in a few steps by a tiny dense model."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    images = rng.integers(0, 100, (n, 8, 8, 1)).astype(np.uint8)
    images[np.arange(n), 2 * labels, 2 * labels, 0] = 255
    return images, labels
