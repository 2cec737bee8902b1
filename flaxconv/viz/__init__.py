"""Inspection: a Keras-like model summary, training curves, feature maps and filters.

>>> print(fc.summary(state))                                  # Keras's model.summary()
>>> fc.viz.plot_history(history, "curves.png")
>>> fc.viz.feature_maps(state, test_images[:2], "maps.png")   # every conv/pool layer
>>> fc.viz.filters(state, "filters.png", layer="conv_0")      # the first layer's kernels

Two parts, both reached as ``flaxconv.viz.<name>``:

* :mod:`flaxconv.viz.model_summary`: the model table (:func:`summary`,
  :func:`layer_table`): layers in call order, output shapes, parameter counts, from a
  shape-only pass;
* :mod:`flaxconv.viz.plots`: PNG pictures through matplotlib's Agg backend (no display
  needed): :func:`plot_history`, :func:`feature_maps` (and :func:`activations`,
  :func:`map_layers`, the arrays and layers behind them) and :func:`filters`.

Layers are named as in the model (``conv_0``, ``bn_0``, ``pool_0``, ...; an NNX model's by
attribute path, ``conv1``, ``blocks/0``). matplotlib is imported on the first plot, never
by ``import flaxconv``.
"""

from flaxconv.viz.model_summary import layer_table, summary
from flaxconv.viz.plots import activations, feature_maps, filters, map_layers, plot_history

__all__ = [
    "activations",
    "feature_maps",
    "filters",
    "layer_table",
    "map_layers",
    "plot_history",
    "summary",
]
