"""The training history: what :func:`flaxconv.fit` returns and writes to a workdir.

A :class:`History` is a dict of per-epoch lists (JSON as is) that is also Keras's
``History`` object; :func:`append` adds an epoch's logs keeping the lists aligned;
:func:`write` and :func:`write_curves` put ``history.json``/``.csv`` and ``curves.png`` in a
workdir, atomically. ``fit`` and the population sweep (:mod:`flaxconv.sweep`) share them.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

from flaxconv.workdir import replace_file, write_json

__all__ = ["History", "append", "write", "write_curves"]


class History(dict):
    """What :func:`fit` returns: a dict of per-epoch lists (``history["loss"][-1]``, JSON as
    is), which is also Keras's ``History`` object: ``history.history["val_loss"]``,
    ``history.epoch`` and ``history.params`` work as they do on ``model.fit``'s result.
    """

    #: Keras's ``History.params``: ``{"verbose", "epochs", "steps"}`` of the fit call.
    params: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.params = {}

    @property
    def history(self) -> History:
        """Keras's ``History.history``: the dict of per-epoch lists (this object itself)."""
        return self

    @property
    def epoch(self) -> list[int]:
        """Keras's ``History.epoch``: the indices (from 0) of the epochs in the lists. A
        resumed run's history holds the earlier epochs too, so this is ``0 .. n - 1``."""
        return list(range(max((len(v) for v in self.values()), default=0)))


def write(workdir: str, history: History) -> None:
    """``history.json`` and ``history.csv`` (a row per epoch)."""
    write_json(os.path.join(workdir, "history.json"), history)

    def write_csv(tmp):
        keys = list(history)
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", *keys])
            rows = zip(*history.values(), strict=True)  # append keeps them aligned
            writer.writerows([i + 1, *row] for i, row in enumerate(rows))

    replace_file(os.path.join(workdir, "history.csv"), write_csv)


def write_curves(workdir: str, history: History) -> None:
    """``curves.png``: loss and accuracy per epoch, train vs validation."""
    from flaxconv import viz  # matplotlib is imported only here

    replace_file(os.path.join(workdir, "curves.png"), lambda t: viz.plot_history(history, t))


def append(history: History, logs: dict[str, float]) -> None:
    """Appends an epoch's logs; keys new or missing this epoch get NaN so rows line up."""
    epochs = max((len(v) for v in history.values()), default=0)
    for key in logs:
        history.setdefault(key, [math.nan] * epochs)
    for key, values in history.items():
        values.append(float(logs.get(key, math.nan)))
