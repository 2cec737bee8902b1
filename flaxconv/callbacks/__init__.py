"""The callback protocol of :func:`flaxconv.fit`, and Keras's callbacks on it.

A callback is any object with some of these methods (all optional; the base class
:class:`Callback` gives no-op defaults):

* ``on_train_begin(state, workdir) -> None``: called once, after a resumed run has
  restored the callback with ``load_state_dict``.
* ``on_epoch_begin(epoch, state) -> TrainState | None``: before each epoch's first step.
* ``on_train_batch_end(batch, logs, state) -> TrainState | None`` with an integer
  ``batch_interval``: called after every training step whose global number (``state.step``
  after it) is a multiple of ``batch_interval``; ``batch`` is the step's index in the epoch
  (from 0) and ``logs`` the epoch's running ``loss`` and ``accuracy`` so far (Keras's batch
  logs). ``fit`` runs an epoch as one compiled loop, so it is cut at those steps only (one
  more host round trip each, no recompilation); a callback whose ``batch_interval`` is
  None or missing (the default) gets no batch calls. Keras calls ``on_train_batch_end``
  after every batch, which would cut the scanned epoch into single steps: set
  ``batch_interval = 1`` for that, knowing it costs the scan's speed.
* ``on_epoch_end(epoch, logs, state) -> TrainState | None``: ``epoch`` counts from 0;
  ``logs`` holds the epoch's numbers (``loss``, ``accuracy``, ``val_*``, ``lr``, ...);
  return a new state to replace the current one (e.g. a lowered learning rate), or None
  to keep it. ``fit`` donates the state's buffers to the next epoch: keep copies
  (``jax.device_get``), not references.
* ``on_train_end(state) -> TrainState | None``: after the last epoch (not after an error).
* ``close() -> None``: always called when ``fit`` ends, also after an error; finish
  background writes and release files here.
* ``stop_training: bool``: set it to end training after the current epoch. A resumed
  run of a stopped one trains no further.
* ``state_dict() -> dict`` / ``load_state_dict(d)``: the callback's state, saved with every
  checkpoint of ``fit``'s workdir, so that a resumed run continues it (patience counters,
  best values, best weights). JSON-able values and numpy/jax arrays, nested in dicts and
  lists; arrays come back as numpy arrays.

The callbacks, one concern a module:

* :mod:`~flaxconv.callbacks.base`: :class:`Callback` and the helpers for a monitored
  number (:func:`resolve_mode`, :func:`improved`, :func:`monitored`).
* :mod:`~flaxconv.callbacks.monitor`: :class:`EarlyStopping`, :class:`ReduceLROnPlateau`
  (both on :class:`~flaxconv.callbacks.monitor.MonitorCallback`) and
  :class:`StopAtThreshold`.
* :mod:`~flaxconv.callbacks.model_checkpoint`: :class:`ModelCheckpoint`.
* :mod:`~flaxconv.callbacks.tensorboard`: :class:`TensorBoard`.
* :mod:`~flaxconv.callbacks.batch_hooks`: how ``fit`` runs the ones with a
  ``batch_interval`` inside an epoch.

A callback object holds the state of one training run: give each ``fit`` call new ones.

>>> callbacks = [EarlyStopping("val_loss", patience=2, restore_best_weights=True),
...              ModelCheckpoint("best", monitor="val_accuracy", save_best_only=True),
...              ReduceLROnPlateau("val_loss", factor=0.5, patience=1),
...              StopAtThreshold("accuracy", 0.99)]
>>> state, history = fc.fit(state, (x, y), 20, validation_split=0.1, callbacks=callbacks)
"""

from flaxconv.callbacks.base import Callback, improved, monitored, resolve_mode
from flaxconv.callbacks.model_checkpoint import ModelCheckpoint
from flaxconv.callbacks.monitor import EarlyStopping, ReduceLROnPlateau, StopAtThreshold
from flaxconv.callbacks.tensorboard import TensorBoard

__all__ = [
    "Callback",
    "EarlyStopping",
    "ModelCheckpoint",
    "ReduceLROnPlateau",
    "StopAtThreshold",
    "TensorBoard",
    "improved",
    "monitored",
    "resolve_mode",
]
