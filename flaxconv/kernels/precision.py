"""The precision of a convolution, carried through every formulation.

A convolution traced with ``precision=lax.Precision.HIGHEST`` (``nn.Conv(precision=...)``,
or any code run under ``jax.default_matmul_precision("highest")``, e.g. to keep TF32 out on
a GPU) is covered by the seam at that precision: each formulation traces its matmuls and
convolutions, forward and in its custom backward rule, inside :func:`matmul_precision`.
"""

from __future__ import annotations

import contextlib

import jax

#: The precisions the formulations reproduce besides the default (None): the names of
#: ``lax.Precision.HIGH`` and ``HIGHEST``, as ``jax.default_matmul_precision`` takes them.
PRECISIONS = ("high", "highest")

_BY_ENUM = {jax.lax.Precision.DEFAULT: None, jax.lax.Precision.HIGH: "high",
            jax.lax.Precision.HIGHEST: "highest"}


def check_precision(precision) -> None:
    """Raises ValueError, naming ``precision``, unless it is None or in :data:`PRECISIONS`."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected None or one of {PRECISIONS}")


def matmul_precision(precision: str | None):
    """A context in which matmuls and convolutions trace at ``precision`` (one of
    :data:`PRECISIONS`; None leaves the ambient default). A custom VJP's backward rule is
    traced outside its caller's context, so each rule enters it again."""
    check_precision(precision)
    if precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


def precision_name(param) -> tuple[str | None, bool]:
    """``(name, covered)`` of a ``conv_general_dilated`` equation's ``precision`` parameter:
    None, a ``lax.Precision`` or a pair of equal ones are covered (``name`` None for the
    default); a pair of different ones or an algorithm preset are not."""
    if param is None:
        return None, True
    pair = tuple(param) if isinstance(param, tuple | list) else (param, param)
    if len(pair) != 2 or pair[0] != pair[1] or pair[0] not in _BY_ENUM:
        return None, False
    return _BY_ENUM[pair[0]], True
