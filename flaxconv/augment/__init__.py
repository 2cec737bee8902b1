"""Keras-style image augmentation, on the device, inside the jitted train step.

Two levels, both jittable and per example:

* pure functions on a batch ``[B, H, W, C]`` (:mod:`flaxconv.augment.ops`):
  :func:`random_rotation`, :func:`random_translation`, :func:`random_zoom`,
  :func:`random_flip`, :func:`random_crop` draw one transform per example from a
  ``jax.random`` key, and :func:`transform` resamples with
  ``jax.scipy.ndimage.map_coordinates``. With the "reflect" (Keras's default), "nearest"
  and "constant" fill modes the outputs match Keras's layers to float32 rounding.
* linen modules with Keras's names and arguments (:mod:`flaxconv.augment.layers`) —
  :class:`RandomRotation`, :class:`RandomTranslation`, :class:`RandomZoom`,
  :class:`RandomFlip`, :class:`RandomCrop`, :class:`Rescaling`, :class:`Resizing` — called
  as ``layer(x, train=bool)``. The random ones draw from the ``"augment"`` rng stream
  (``self.make_rng("augment")``) only when ``train=True`` and are the identity otherwise
  (:class:`RandomCrop` center-crops), so evaluation and prediction are never augmented.

They go at the front of a model, where Keras puts its preprocessing layers::

    model = flaxconv.models.get(
        "sign_language_cnn", num_classes=24,
        augment=(RandomRotation(0.05), RandomTranslation(0.1, 0.1), RandomZoom(0.1)),
    )  # the same as augment=keras_like(rotation=0.05, translation=0.1, zoom=0.1)

``flaxconv.train_step`` already passes ``rngs=state.step_rngs()`` (an ``"augment"`` key
folded from the state's rng and step) in training, so a step stays a pure function of
``(state, batch)`` and needs no change. The step scales uint8 images to [0, 1] first, so
the layers see float32 images in [0, 1].

This package imports nothing else from flaxconv, so the model layer can use it.
"""

from flaxconv.augment.layers import (
    RandomCrop,
    RandomFlip,
    RandomRotation,
    RandomTranslation,
    RandomZoom,
    Rescaling,
    Resizing,
    keras_like,
)
from flaxconv.augment.ops import (
    FILL_MODES,
    FLIP_MODES,
    INTERPOLATIONS,
    affine,
    center_crop,
    factor_range,
    random_crop,
    random_flip,
    random_rotation,
    random_translation,
    random_zoom,
    resize,
    rotate,
    transform,
)
from flaxconv.augment.ops import Factor as Factor  # the types of the arguments
from flaxconv.augment.ops import Fill as Fill

# A saved model names each layer's class by module path (flaxconv.architecture); the public
# path, not the file it is defined in, keeps saved models loading when files move.
for _layer in (RandomCrop, RandomFlip, RandomRotation, RandomTranslation, RandomZoom,
               Rescaling, Resizing):
    _layer.__module__ = __name__
del _layer

__all__ = [
    "FILL_MODES",
    "FLIP_MODES",
    "INTERPOLATIONS",
    "RandomCrop",
    "RandomFlip",
    "RandomRotation",
    "RandomTranslation",
    "RandomZoom",
    "Rescaling",
    "Resizing",
    "affine",
    "transform",
    "center_crop",
    "factor_range",
    "keras_like",
    "random_crop",
    "random_flip",
    "random_rotation",
    "random_translation",
    "random_zoom",
    "resize",
    "rotate",
]
