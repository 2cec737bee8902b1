"""Pictures of a model and its training, as PNG files: training curves, feature maps and
conv filters (and :func:`activations`, the arrays behind the feature maps).

Layers are named as in the model (``conv_0``, ``bn_0``, ``pool_0``, ...); feature maps come
from Flax's ``capture_intermediates``, so they are each layer's own output: a ``conv_i`` map
is the convolution before BatchNorm and relu, a ``pool_i`` map is after the relu. An NNX
model's layers are the submodules its ``__call__`` calls, named by attribute path
(``conv1``, ``blocks/0``; see :func:`flaxconv.nnx_model.call_layers`): its pools, being
functions (``nnx.max_pool``), have no maps of their own. The layers are found by
:func:`flaxconv.viz.model_summary.layer_table`. Plots go through matplotlib's Agg backend
(no display needed); matplotlib is imported on the first plot, not with this module.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from flaxconv.nnx_model import NNXModel
from flaxconv.state import TrainState
from flaxconv.steps import apply_model, check_images, prepare_images
from flaxconv.viz.model_summary import layer_table

_DPI = 100
_LABEL_PX = 110  # the left column of feature_maps that names each row
_TITLE_PX = 24  # the title band of filters


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colormap(name: str):
    """Matplotlib's colormap ``name``: values in [0, 1] -> RGBA."""
    _pyplot()
    import matplotlib

    return matplotlib.colormaps[name]


def _figure(width_px: int, height_px: int):
    # No tight bbox: the saved PNG is exactly width_px x height_px, as documented.
    return _pyplot().figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI)


def _nearest(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """``image`` ``[h, w, ...]`` resized to ``[rows, columns, ...]`` by repeating pixels
    (what ``imshow(interpolation="nearest")`` draws in a larger cell)."""
    h, w = image.shape[:2]
    return image[(np.arange(rows) * h) // rows][:, (np.arange(columns) * w) // columns]


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` mapped from ``[low, high]`` onto ``[0, 1]`` (clipped; 0 where the range is
    empty, as matplotlib's ``Normalize``)."""
    if high <= low:
        return np.zeros_like(values, np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _draw_cells(fig, cells: list[tuple[int, int, np.ndarray]], size: int, pad: int,
                left: int, height: int) -> None:
    """Draws RGB cells ``(row_px, col_px, image [h, w, 3] in [0, 1])`` as one image on
    ``fig``: each at ``size - 2 * pad`` pixels square, ``row_px`` from the top of a band
    ``height`` pixels high that starts ``left`` pixels from the figure's left edge.

    One ``figimage`` instead of an axes with ``imshow`` per cell: matplotlib spends about
    10 ms on each axes, 1.7 s for the 160 cells of the MNIST job's feature maps."""
    width = max(col for _, col, _ in cells) + size
    canvas = np.ones((height, width, 3), np.float32)  # white between the cells
    inner = size - 2 * pad
    for row, col, image in cells:
        canvas[row + pad : row + pad + inner, col + pad : col + pad + inner] = _nearest(
            image, inner, inner)
    fig.figimage(canvas, xo=left, yo=0, origin="upper")


def _save(fig, path: str | os.PathLike) -> str:
    fig.savefig(path, dpi=_DPI)
    _pyplot().close(fig)
    return os.fspath(path)


def plot_history(history: dict[str, list[float]], path: str | os.PathLike) -> str:
    """Loss and accuracy curves (train vs validation, per epoch) as a PNG at ``path``."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            values = history.get(key)
            if values:
                ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


# --- Feature maps and filters -------------------------------------------------------------


def _subtree(tree: Any, name: str) -> Any:
    """The part of a nested dict at the ``/``-joined path ``name`` (``{}`` if absent);
    keys match by their string form, so NNX list items (int keys) are found too."""
    for part in name.split("/"):
        if not hasattr(tree, "items"):
            return {}
        tree = next((v for k, v in tree.items() if str(k) == part), {})
    return tree


def _model_name(model: Any) -> str:
    return model.module_type.__name__ if isinstance(model, NNXModel) else type(model).__name__


def map_layers(state: TrainState, layers: str | Sequence[str] | None = None) -> list[str]:
    """The layers with ``[N, H, W, C]`` outputs (conv, BatchNorm, pool), in call order,
    optionally filtered by name patterns (``fnmatch``, e.g. ``"conv_*"``).

    Raises:
      ValueError: a pattern that matches none of them, listing them.
    """
    spatial = [
        name for name, _, shape, _, _ in layer_table(state)
        if shape is not None and len(shape) == 4
    ]
    if layers is None:
        return spatial
    patterns = (layers,) if isinstance(layers, str) else tuple(layers)
    unknown = [p for p in patterns if not fnmatch.filter(spatial, p)]
    if unknown:
        raise ValueError(
            f"layers {unknown} match no layer with [N, H, W, C] output; expected some of "
            f"{spatial}"
        )
    return [name for name in spatial if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def _capture_fn(state: TrainState, images: jax.Array, names: tuple[str, ...]):
    if isinstance(state.model, NNXModel):
        _, captured = apply_model(state, state.variables(), prepare_images(images),
                                  train=False, capture=names)
        return captured["intermediates"]
    names_set = set(names)
    _, captured = apply_model(
        state,
        state.variables(),
        prepare_images(images),
        train=False,
        capture_intermediates=lambda module, method: (
            method == "__call__" and module.name in names_set
        ),
        mutable=["intermediates"],
    )
    return {name: captured["intermediates"][name]["__call__"][0] for name in names}


_capture = jax.jit(_capture_fn, static_argnums=2)


def activations(
    state: TrainState, images: Any, layers: str | Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """The outputs of the model's spatial layers for ``images``, in inference mode.

    Args:
      state: a train state.
      images: uint8 or float ``[N, H, W, C]`` (or one ``[H, W, C]`` image), as for
        :func:`flaxconv.predict`.
      layers: name patterns (see :func:`map_layers`); all conv/BatchNorm/pool layers by
        default.

    Returns:
      ``{layer name: float32 [N, h, w, c]}`` in call order.
    """
    images = np.asarray(images) if not isinstance(images, jax.Array) else images
    if images.ndim == 3:
        images = images[None]
    check_images(state, images)
    names = tuple(map_layers(state, layers))
    out = _capture(state, images, names)
    return {name: np.asarray(out[name], np.float32) for name in names}


def feature_maps(
    state: TrainState,
    images: Any,
    path: str | os.PathLike,
    *,
    layers: str | Sequence[str] | None = None,
    channels: int | Sequence[int] = 16,
    cell: int = 64,
) -> str:
    """A PNG grid of feature maps: one row per (image, layer), one column per channel.

    Each map is drawn with its own color scale (viridis); the row label names the image,
    the layer and its output shape. This is the feature-map figure of the seed notebooks
    (*Deep Learning with Python* ch. 5; the Fashion-MNIST notebook's chosen channel of
    each conv/pool layer for a few test images is ``channels=[c]``).

    Args:
      state: a train state.
      images: uint8 or float ``[N, H, W, C]`` or one ``[H, W, C]`` image.
      path: where the PNG goes.
      layers: name patterns (see :func:`map_layers`); all conv/BatchNorm/pool layers by
        default.
      channels: the first ``channels`` channels of each layer (fewer where a layer has
        fewer), or a list of channel indices, shown for every layer.
      cell: pixels per map.

    Returns:
      ``path``. The PNG is exactly ``110 + cell * columns`` pixels wide and
      ``cell * N * len(layers)`` high, ``columns`` being the most channels shown for a layer.

    Raises:
      ValueError: bad images (shape/dtype, as :func:`flaxconv.predict`), unknown layers, a
        channel index outside a layer's channels.
    """
    maps = activations(state, images, layers)
    if not maps:
        raise ValueError(f"{_model_name(state.model)} has no layer with [N, H, W, C] output")
    if isinstance(channels, int | np.integer):
        if channels < 1:
            raise ValueError(f"channels={channels}; expected a positive count or indices")
        shown = {name: list(range(min(int(channels), m.shape[-1]))) for name, m in maps.items()}
    else:
        indices = [int(c) for c in channels]
        for name, m in maps.items():
            bad = [c for c in indices if not 0 <= c < m.shape[-1]]
            if bad or not indices:
                raise ValueError(
                    f"channels {bad or indices} are not channels of {name}; it has "
                    f"{m.shape[-1]} (0..{m.shape[-1] - 1})"
                )
        shown = {name: indices for name in maps}
    columns = max(len(c) for c in shown.values())
    count = next(iter(maps.values())).shape[0]
    rows = [(n, name) for n in range(count) for name in maps]
    width, height = _LABEL_PX + cell * columns, cell * len(rows)
    fig = _figure(width, height)
    viridis = _colormap("viridis")
    cells = []
    for r, (n, name) in enumerate(rows):
        m = maps[name][n]
        fig.text(
            (_LABEL_PX - 6) / width, (height - r * cell - cell / 2) / height,
            f"image {n}\n{name}\n{'x'.join(map(str, m.shape))}",
            ha="right", va="center", fontsize=7,
        )
        for col, channel in enumerate(shown[name]):
            one = m[:, :, channel]  # its own color scale, as imshow's default
            rgb = viridis(_scaled(one, float(one.min()), float(one.max())))[..., :3]
            cells.append((r * cell, col * cell, rgb))
    _draw_cells(fig, cells, cell, 1, _LABEL_PX, height)
    return _save(fig, path)


def filters(
    state: TrainState,
    path: str | os.PathLike,
    layer: str | None = None,
    *,
    input_channel: int = 0,
    columns: int = 8,
    cell: int = 48,
) -> str:
    """A PNG grid of a conv layer's kernels, one cell per output filter.

    A kernel ``[kh, kw, C_in, C_out]`` with ``C_in == 3`` is drawn in RGB (each filter
    min-max scaled); otherwise input channel ``input_channel`` of every filter is drawn in
    gray on one symmetric scale shared by all filters (mid-gray is 0), so their weights
    compare.

    Args:
      state: a train state.
      path: where the PNG goes.
      layer: a layer with a 4-D ``kernel`` parameter (a convolution); by default the
        first one the model calls.
      input_channel: which input channel to draw when ``C_in != 3``.
      columns: filters per row.
      cell: pixels per filter.

    Returns:
      ``path``. The PNG is exactly ``cell * min(columns, C_out)`` pixels wide and
      ``24 + cell * ceil(C_out / columns)`` high.

    Raises:
      ValueError: ``layer`` is not a convolution (naming the ones there are), or
        ``input_channel`` is out of range.
    """
    convs = [
        row[0] for row in layer_table(state)
        if np.ndim(_subtree(_subtree(state.params, row[0]), "kernel")) == 4
    ]
    layer = convs[0] if layer is None and convs else layer
    if layer not in convs:
        raise ValueError(f"layer={layer!r} is not a conv layer; expected one of {convs}")
    if columns < 1 or cell < 1:
        raise ValueError(f"columns={columns}, cell={cell}; expected positive integers")
    kernel = np.asarray(_subtree(state.params, f"{layer}/kernel"), np.float32)
    kh, kw, c_in, c_out = kernel.shape
    rgb = c_in == 3
    if not rgb and not 0 <= input_channel < c_in:
        raise ValueError(
            f"input_channel={input_channel}; {layer} has {c_in} input channels (0..{c_in - 1})"
        )
    cols = min(columns, c_out)
    rows = math.ceil(c_out / cols)
    width, height = cell * cols, _TITLE_PX + cell * rows
    fig = _figure(width, height)
    what = "RGB" if rgb else f"input channel {input_channel}"
    fig.text(
        0.5, 1 - (_TITLE_PX / 2) / height, f"{layer}: {c_out} filters {kh}x{kw} ({what})",
        ha="center", va="center", fontsize=8,
    )
    scale = float(np.max(np.abs(kernel[:, :, input_channel, :]))) if not rgb else 1.0
    scale = scale or 1.0
    gray = _colormap("gray")
    cells = []
    for o in range(c_out):
        r, c = divmod(o, cols)
        if rgb:  # each filter min-max scaled
            k = kernel[:, :, :, o]
            image = _scaled(k, float(k.min()), float(k.max()))
        else:  # one symmetric gray scale for all: mid-gray is 0
            image = gray(_scaled(kernel[:, :, input_channel, o], -scale, scale))[..., :3]
        cells.append((r * cell, c * cell, image))
    _draw_cells(fig, cells, cell, 2, 0, height - _TITLE_PX)
    return _save(fig, path)
