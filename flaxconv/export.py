"""Export for serving: the inference function as a serialized ``jax.export`` artifact.

>>> fc.export(state, "runs/x/model.exported", platforms=("cpu", "cuda", "tpu"))

Loading it needs jax only, not flaxconv, Flax or the model's code::

    import jax, numpy as np
    with open("runs/x/model.exported", "rb") as f:
        serving = jax.export.deserialize(f.read())
    logits = serving.call(images)        # uint8 [B, H, W, C], any B -> float32 [B, classes]

The file holds one function, ``images -> logits`` with the parameters inside it as
constants: a symbolic batch size ``B``, the model's ``H, W, C``, and the one image dtype
chosen by ``input_dtype``: ``"uint8"`` (0..255, scaled to [0, 1] inside, as ``fc.predict``
does) or ``"float32"`` (already in [0, 1]). It returns ``fc.predict``'s float32 logits
(inference mode: dropout off, BatchNorm's running statistics).

Kernel formulations: the library's steps pick a backend's fast formulations when they are
traced (:mod:`flaxconv.kernels`, ``"auto"``), which would tie an export to the exporting
machine's backend. So an export for several platforms uses XLA's own operations
(``kernels="xla"``), which every platform lowers; an export for one platform uses that
platform's table, so its logits are ``fc.predict``'s there, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flaxconv.kernels import policy_name
from flaxconv.nnx_model import NNXModel
from flaxconv.state import TrainState
from flaxconv.steps import predict_fn
from flaxconv.workdir import replace_file

#: The platforms ``jax.export`` lowers for.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
#: The image dtypes an exported function can take.
INPUT_DTYPES = ("uint8", "float32")
# The kernel table ("auto" resolved) for a single-platform export.
_TABLE = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "tpu": "xla"}

__all__ = ["INPUT_DTYPES", "PLATFORMS", "ExportError", "export", "export_kernels"]


class ExportError(ValueError):
    """A model that does not export (e.g. one whose code needs a fixed batch size)."""


def export_kernels(state_kernels: str, platforms: Sequence[str]) -> str:
    """The kernel policy an export for ``platforms`` uses: ``"xla"`` for several
    platforms; for one, the state's policy with ``"auto"`` resolved for that platform
    (``"cpu"`` for cpu, ``"gpu"`` for cuda/rocm, ``"xla"`` for tpu)."""
    if len(platforms) > 1:
        return "xla"
    return _TABLE[platforms[0]] if state_kernels == "auto" else state_kernels


def _platforms(platforms: Sequence[str] | str) -> tuple[str, ...]:
    names = (platforms,) if isinstance(platforms, str) else tuple(platforms)
    bad = [p for p in names if p not in PLATFORMS]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(
            f"platforms={platforms!r}; expected distinct names from {PLATFORMS}, at least one"
        )
    return names


def export(
    state: TrainState,
    path: str | os.PathLike | None,
    platforms: Sequence[str] | str = ("cpu", "cuda", "tpu"),
    *,
    input_dtype: str = "uint8",
    kernels: str | None = None,
) -> jax.export.Exported:
    """Exports ``state``'s inference function with ``jax.export`` and writes its serialized
    bytes to ``path`` (see the module doc for what it takes and returns).

    Args:
      state: a train state (one model, not a population).
      path: the file to write, atomically (its folder is created); None writes nothing.
      platforms: what it will run on, from :data:`PLATFORMS`; lowered for all of them here,
        so no accelerator is needed to export for one.
      input_dtype: ``"uint8"`` or ``"float32"``, the dtype of the images it takes.
      kernels: the kernel policy to trace with; None: :func:`export_kernels`.

    Returns:
      The ``jax.export.Exported`` (``.serialize()`` is what ``path`` holds).

    Raises:
      ValueError: unknown platforms, ``input_dtype`` or ``kernels``, naming the value.
      ExportError: the model does not trace with a symbolic batch size, or does not lower
        for a platform; naming the model and jax's reason.
    """
    platforms = _platforms(platforms)
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype={input_dtype!r}; expected one of {INPUT_DTYPES}")
    kernels = export_kernels(state.kernels, platforms) if kernels is None else policy_name(kernels)
    # Host copies, so that the constants carry no device placement or sharding.
    state = state.replace(params=jax.device_get(state.params),
                          batch_stats=jax.device_get(state.batch_stats), kernels=kernels)
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *state.input_shape), jnp.dtype(input_dtype))

    @jax.jit
    def serve(images: jax.Array) -> jax.Array:
        return predict_fn(state, images)

    try:
        exported = jax.export.export(serve, platforms=platforms)(spec)
    except Exception as error:  # noqa: BLE001 - the user's model failed to trace or lower
        model = state.model
        name = model.module_type.__qualname__ if isinstance(model, NNXModel) else type(
            model).__name__
        reason = (str(error).strip().splitlines() or [""])[0][:300]
        raise ExportError(
            f"cannot export {name} for {platforms} with images {spec.dtype}[batch, "
            f"{', '.join(map(str, state.input_shape))}] ({type(error).__name__}: {reason})"
        ) from error
    if path is not None:
        path = os.fspath(path)
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        data = exported.serialize()

        def write(tmp: str) -> Any:
            with open(tmp, "wb") as f:
                f.write(data)

        replace_file(path, write)
    return exported
