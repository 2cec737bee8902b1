"""The configurable convolutional classifier behind every preset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxconv.models.layers import Flatten, MaxPool, initializer


def compute_dtype(dtype: Any) -> jnp.dtype:
    """``dtype`` (None: float32; a name like ``"bfloat16"`` or a dtype) as a floating dtype.

    Raises:
      ValueError: not a floating dtype, naming the value.
    """
    try:
        resolved = jnp.dtype(jnp.float32 if dtype is None else dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(
            f"dtype={dtype!r} is not a computation dtype; expected a floating dtype such as "
            f"'float32' or 'bfloat16' (mixed precision)"
        )
    return resolved


#: Window and stride of every pool in a ConvStack.
POOL_WINDOW = 2


class ConvStack(nn.Module):
    """Conv blocks, then a dense head: the shape of every textbook convnet. Plain Flax
    layers (``nn.Conv``, ``nn.BatchNorm``, ``nn.relu``, ``nn.max_pool``, ``nn.Dense``); the
    library's steps give them their fast formulations (:mod:`flaxconv.kernels`), as they
    do any other module's.

    ``[N, H, W, C] float -> [N, num_classes]`` logits (the loss folds in the softmax).
    Layer names are stable so summaries, feature maps and freezing masks can refer to them:
    ``conv_i`` (and ``bn_i``), ``pool_i`` after conv ``i``, ``flatten``, ``dense_j``, ``head``.

    Attributes:
      features: output channels of each conv layer (3x3 by default), each followed by relu.
      pool: per conv layer, whether a 2x2 max-pool follows it; ``None`` pools after every
        conv layer but the last (the *Deep Learning with Python* layout).
      hidden: widths of the relu dense layers between ``flatten`` and ``head``.
      num_classes: width of the logits.
      kernel_size, padding: for every conv layer (Keras defaults: 3x3, "VALID").
      batch_norm: a BatchNorm (Keras's momentum 0.99, epsilon 1e-3) between each conv and relu.
      frozen_batch_norm: names of ``bn_i`` layers that run in inference mode even with
        ``train=True``: they normalize with their moving statistics and never update them
        (Keras's BatchNormalization with ``trainable=False``; set by
        ``flaxconv.finetune.freeze``).
      dropout_rate: dropout right before ``head``, active only with ``train=True``.
      kernel_init: initializer name; Keras's glorot-uniform reproduces the textbook numbers.
      dtype: computation dtype, e.g. ``jnp.bfloat16`` for mixed precision; parameters,
        the logits and the loss stay float32.
      augment: layers called as ``layer(x, train=train)`` on the float32 input before
        ``conv_0``, e.g. ``flaxconv.augment.RandomRotation(0.05)``; the random ones draw
        from the ``"augment"`` rng and are the identity when ``train=False``.
      trim: with ``train=True``, compute only the rows and columns that reach the logits
        (:meth:`used_input_size`): a 2x2 pool drops the last row and column of an odd map,
        so everything that only feeds them is dead work. For ``dlwp_mnist`` the input is
        cropped to its top-left 26x26 and conv_1 computes 10x10 instead of 11x11, 13% fewer
        FLOPs per step. The logits and gradients are the untrimmed ones (to float32
        rounding). Evaluation, summaries and feature maps (``train=False``) always see the
        full maps, as in Keras.
    """

    features: Sequence[int] = (32, 64, 128)
    pool: Sequence[bool] | None = None
    hidden: Sequence[int] = ()
    num_classes: int = 10
    kernel_size: tuple[int, int] = (3, 3)
    padding: str = "VALID"
    batch_norm: bool = False
    frozen_batch_norm: tuple[str, ...] = ()
    dropout_rate: float = 0.0
    kernel_init: str = "glorot_uniform"
    dtype: Any = None
    augment: Sequence[nn.Module] = ()
    trim: bool = True

    def pool_after(self) -> tuple[bool, ...]:
        if self.pool is None:
            return tuple(i < len(self.features) - 1 for i in range(len(self.features)))
        if len(self.pool) != len(self.features):
            raise ValueError(
                f"pool has {len(self.pool)} entries, expected one per conv layer "
                f"({len(self.features)})"
            )
        return tuple(bool(p) for p in self.pool)

    def used_input_size(self, height: int, width: int) -> tuple[int, int]:
        """The top-left ``(rows, columns)`` of a ``height x width`` input that reach the logits.

        A "VALID" conv needs ``kernel - 1`` more rows than it outputs and a pool exactly
        ``POOL_WINDOW`` times its output, so walking back from the last layer gives the rows
        in use; they are the top-left ones because every layer is anchored there. With
        BatchNorm (whose batch statistics cover every position), other paddings, or an input
        too small for the stack, every pixel counts and ``(height, width)`` comes back.
        """
        if self.batch_norm or not (isinstance(self.padding, str)
                                   and self.padding.upper() == "VALID"):
            return height, width
        return tuple(
            self._used_rows(size, k) for size, k in zip((height, width), self.kernel_size,
                                                          strict=True)
        )

    def _used_rows(self, size: int, kernel: int) -> int:
        pools = self.pool_after()
        out = size
        for pool in pools:
            out = (out - kernel + 1) // (POOL_WINDOW if pool else 1)
            if out < 1:
                return size
        for pool in reversed(pools):
            out = out * (POOL_WINDOW if pool else 1) + kernel - 1
        return out

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        bn_names = [f"bn_{i}" for i in range(len(self.features))] if self.batch_norm else []
        unknown = sorted(set(self.frozen_batch_norm) - set(bn_names))
        if unknown:
            raise ValueError(
                f"frozen_batch_norm names {unknown}, which are not BatchNorm layers of this "
                f"model; expected some of {bn_names}"
            )
        dtype = compute_dtype(self.dtype)
        for layer in self.augment:
            x = layer(x, train=train)
        if train and self.trim:
            rows, columns = self.used_input_size(x.shape[1], x.shape[2])
            x = x[:, :rows, :columns]
        x = x.astype(dtype)
        for i, (width, pool) in enumerate(zip(self.features, self.pool_after(), strict=True)):
            x = nn.Conv(
                width,
                tuple(self.kernel_size),
                padding=self.padding,
                use_bias=not self.batch_norm,
                kernel_init=initializer(self.kernel_init),
                dtype=dtype,
                name=f"conv_{i}",
            )(x)
            if self.batch_norm:
                x = nn.BatchNorm(
                    use_running_average=not train or f"bn_{i}" in self.frozen_batch_norm,
                    momentum=0.99,
                    epsilon=1e-3,
                    dtype=dtype,
                    name=f"bn_{i}",
                )(x)
            x = nn.relu(x)
            if pool:
                x = MaxPool(POOL_WINDOW, name=f"pool_{i}")(x)
        x = Flatten(name="flatten")(x)
        for j, width in enumerate(self.hidden):
            x = nn.relu(self._dense(width, f"dense_{j}")(x))
        if self.dropout_rate:
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        return self._dense(self.num_classes, "head")(x).astype(jnp.float32)

    def _dense(self, width: int, name: str) -> nn.Dense:
        return nn.Dense(
            width, kernel_init=initializer(self.kernel_init), dtype=self.dtype, name=name
        )
