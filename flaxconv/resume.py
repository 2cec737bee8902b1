"""Resuming a run: which run a workdir holds, and what the next run must share with it.

:func:`check_config` keeps a workdir to one configuration (``config.json``, written by the
first run). :func:`run_config` is what a resumed run must share with the first: the model,
input shape, parameter shapes, optimizer state structure and the caller's settings, so a
formulation change of the kernel seam never makes a workdir look like another
configuration. :func:`callback_states` / :func:`load_callback_states` carry the callbacks'
state through a checkpoint. The workdir itself (its lock, its atomic writes) is
:mod:`flaxconv.workdir`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from flaxconv.workdir import write_json

__all__ = [
    "SAVED_STATE_DIRS",
    "IncompatibleWorkdirError",
    "callback_states",
    "check_config",
    "load_callback_states",
    "run_config",
]


class IncompatibleWorkdirError(ValueError):
    """The workdir holds a run whose configuration differs from this one, or whose
    configuration cannot be read (:func:`check_config`)."""


#: Folders of a workdir that hold a run's saved state (``fit``'s epoch checkpoints and the
#: checkpoint of a preempted epoch).
SAVED_STATE_DIRS = ("checkpoints", "preempted")


def _one_line(value: Any, limit: int = 80) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _holds_checkpoints(workdir: str) -> str | None:
    """The first folder of :data:`SAVED_STATE_DIRS` in ``workdir`` that holds a
    checkpoint (an entry named by a number), or None."""
    for name in SAVED_STATE_DIRS:
        folder = os.path.join(workdir, name)
        with contextlib.suppress(OSError):
            if any(entry.isdigit() for entry in os.listdir(folder)):
                return folder
    return None


def check_config(workdir: str, config: dict[str, Any]) -> None:
    """Refuses ``workdir`` when it holds a run of another configuration; a new run's
    ``config`` is written to ``<workdir>/config.json``.

    Args:
      workdir: an existing directory, locked by this run.
      config: JSON-able settings (others go through ``str``) that a resumed run must share;
        keys starting with ``_`` are the library's and are listed after the caller's.

    Raises:
      IncompatibleWorkdirError: ``config.json`` holds other values (naming each key with
        both values); it is unreadable; or it is missing while the workdir holds
        checkpoints, so that nothing tells which configuration they belong to.
      WorkdirWriteError: ``config.json`` cannot be written.
    """
    path = os.path.join(workdir, "config.json")
    config = json.loads(json.dumps(config, default=str))
    if not os.path.exists(path):
        saved = _holds_checkpoints(workdir)
        if saved is not None:
            raise IncompatibleWorkdirError(
                f"workdir {workdir} holds checkpoints ({saved}) but no config.json, so this "
                f"run cannot tell whether they are of its configuration; put config.json "
                f"back, or use another workdir (or delete {saved} to start over)"
            )
        write_json(path, config)
        return
    try:
        with open(path) as f:
            previous = json.load(f)
        if not isinstance(previous, dict):
            raise ValueError(f"a JSON {type(previous).__name__}, not an object")
    except (OSError, ValueError) as error:
        raise IncompatibleWorkdirError(
            f"{path} is unreadable ({_one_line(error)}); it records the configuration of "
            f"the run in {workdir}: put it back, or use another workdir (or delete this one "
            f"to start over)"
        ) from error
    changed = sorted(
        (k for k in set(previous) | set(config) if previous.get(k) != config.get(k)),
        key=lambda k: (k.startswith("_"), k),  # the caller's keys first
    )
    if changed:
        details = "; ".join(
            f"{k.lstrip('_')}: {_one_line(previous.get(k))} -> {_one_line(config.get(k))}"
            for k in changed
        )
        raise IncompatibleWorkdirError(
            f"workdir {workdir} holds a run with another configuration ({details}); "
            f"use another workdir or delete this one"
        )


def run_config(state: Any, config: dict[str, Any] | None) -> dict[str, Any]:
    """What must match for a workdir to be resumed: the model, input shape, parameter
    shapes, optimizer state structure, and the caller's ``config``."""
    shapes = jax.tree.map(lambda x: list(np.shape(x)), state.params)
    return {
        "_model": _one_line(repr(state.model), limit=10_000),
        "_input_shape": list(state.input_shape),
        "_param_shapes": json.dumps(shapes, sort_keys=True),
        "_opt_state": str(jax.tree.structure(state.opt_state)),
        **(config or {}),
    }


def callback_states(callbacks: Sequence[Any]) -> list[dict[str, Any]]:
    """The callbacks' ``state_dict()``s with their class names, as a checkpoint keeps them."""
    return [
        {"class": type(c).__name__, "state": c.state_dict() if hasattr(c, "state_dict") else {}}
        for c in callbacks
    ]


def load_callback_states(callbacks: Sequence[Any], saved: list[dict[str, Any]]) -> None:
    """Gives each callback its state from a checkpoint's :func:`callback_states`; one whose
    class differs from the saved one's starts afresh, with a warning."""
    for i, callback in enumerate(callbacks):
        entry = saved[i] if i < len(saved) else None
        if entry is None or entry.get("class") != type(callback).__name__:
            warnings.warn(
                f"callback {i} ({type(callback).__name__}) has no saved state in the "
                f"checkpoint (the callbacks differ from the first run's); it starts afresh",
                RuntimeWarning,
                stacklevel=3,
            )
        elif hasattr(callback, "load_state_dict"):
            callback.load_state_dict(entry["state"])
