"""Old public names kept one release: a module ``__getattr__`` that warns and forwards.

Each module lists its renamed names as ``{old: (new, getter)}``: ``new`` is the name to use
instead (as text, e.g. ``"flaxconv.metrics.compute"``) and ``getter`` a zero-argument
function returning the object that the old name now stands for. The getter is called on
access, so a module can alias an object of a module that imports it (no import cycle).
The module then ends with ``__getattr__ = _deprecation.module_getattr(__name__, aliases)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

Aliases = dict[str, tuple[str, Callable[[], Any]]]


def resolve(module: str, name: str, aliases: Aliases) -> Any:
    """The object behind the deprecated ``module.name``, after a ``DeprecationWarning``
    naming its replacement; ``AttributeError`` (as Python's own) for any other name."""
    if name not in aliases:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new, getter = aliases[name]
    warnings.warn(
        f"{module}.{name} is deprecated and will be removed in the next release; "
        f"use {new}", DeprecationWarning, stacklevel=3,
    )
    return getter()


def module_getattr(module: str, aliases: Aliases) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` (PEP 562) that resolves ``module``'s
    deprecated ``aliases``."""

    def __getattr__(name: str) -> Any:
        return resolve(module, name, aliases)

    return __getattr__
