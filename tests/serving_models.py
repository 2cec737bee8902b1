"""Models and states shared by the saved-model, export and predict tests.

The classes live in this importable module, as a user's would, so a fresh process finds
them by the name a saved model records (``serving_models:Net``). :func:`states` builds
each state once per test session.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tiny_data import pixel_dataset

import flaxconv as fc

CLASSES = 4
#: uint8 [64, 8, 8, 1] images and their int32 labels.
IMAGES, LABELS = pixel_dataset(64, CLASSES)
#: The preset's options: BatchNorm, dropout, and an augmentation layer (a nested module).
PRESET = dict(features=(4, 8), num_classes=CLASSES, batch_norm=True, dropout_rate=0.5,
              augment=(fc.augment.RandomRotation(0.1),))


class Block(nn.Module):
    """Conv -> BatchNorm -> activation: a linen module given to :class:`Net` as a field."""

    features: int
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(self.features, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return self.activation(x)


class Net(nn.Module):
    """A user's linen module: a nested module, a dtype and a function among its fields."""

    block: Block
    classes: int = CLASSES
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.max_pool(self.block(x, train=train), (2, 2), (2, 2))
        x = nn.Dropout(0.2, deterministic=not train)(x.reshape(x.shape[0], -1))
        return nn.Dense(self.classes, dtype=self.dtype)(x)


class Small(nnx.Module):
    """An NNX module whose constructor arguments are not kept as attributes."""

    def __init__(self, features=4, classes=CLASSES, *, rngs):
        self.conv = nnx.Conv(1, features, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(features, momentum=0.5, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(features * 4 * 4, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), (2, 2))
        return self.head(self.dropout(x.reshape(x.shape[0], -1)))


class BridgedSmall(Small):
    """:class:`Small` as ``nnx.bridge.to_linen`` calls it: ``train`` sets NNX's mode."""

    def __call__(self, x, *, train):
        self.train() if train else self.eval()
        return super().__call__(x)


def trained(model: Any, sample: Any = IMAGES[:1]) -> fc.TrainState:
    """A state of ``model`` for inputs like ``sample`` at step 3 whose parameters and
    BatchNorm statistics are random values, as after training (the variances positive).

    Built by ``fc.create_train_state`` under ``jax.eval_shape``, then filled with numpy
    values: nothing is compiled, which keeps these tests fast (compiling a model's ``init``
    costs seconds of CPU).
    """
    abstract = jax.eval_shape(
        lambda: fc.create_train_state(jax.random.key(0), model, optax.sgd(0.1), sample))
    rng = np.random.default_rng(1)

    def fill(scale, offset):
        return lambda x: (offset + scale * rng.uniform(-1, 1, x.shape)).astype(x.dtype)

    return abstract.replace(
        step=jnp.asarray(3, jnp.int32),
        params=jax.tree.map(fill(0.5, 0.0), abstract.params),
        batch_stats=jax.tree.map(fill(0.4, 0.6), abstract.batch_stats),
        rng=np.array([0, 1], np.uint32),  # raw threefry key data; sgd has no opt_state arrays
    )


@functools.cache
def states() -> dict[str, fc.TrainState]:
    """``{"preset", "linen", "nnx"}``: a preset (``dlwp_mnist`` with :data:`PRESET`), a
    user's linen :class:`Net` and an NNX :class:`Small` (``features=6``), for 8x8x1 images
    and :data:`CLASSES` classes."""
    return {
        "preset": trained(fc.models.get("dlwp_mnist", **PRESET)),
        "linen": trained(Net(Block(6, activation=nn.gelu))),
        "nnx": trained(lambda rngs: Small(6, rngs=rngs)),
    }
