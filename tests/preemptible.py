"""A tiny streamed ``fc.fit`` run that can send itself SIGTERM part-way: the preemption
tests run it in a subprocess (``python tests/preemptible.py WORKDIR KILL_AT OUT``) and, for
reference and resume, in the test process (:func:`run`)."""

import functools
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np

import flaxconv as fc

sys.path.insert(0, os.path.dirname(__file__))
from tiny_data import pixel_dataset  # noqa: E402

EPOCHS, BATCH = 3, 16
IMAGES, LABELS = pixel_dataset(80, 4)  # 5 batches an epoch


def batches(epoch: int, kill_at: int | None):
    """The epoch's batches in an order fixed by ``epoch``; SIGTERM to this process while
    global batch ``kill_at`` is handed out."""
    order = np.random.default_rng(epoch).permutation(len(LABELS))
    for i in range(0, len(order), BATCH):
        if kill_at is not None and epoch * len(order) // BATCH + i // BATCH == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        take = order[i : i + BATCH]
        yield {"image": IMAGES[take], "label": LABELS[take]}


@functools.cache
def _initial_state():
    """Built once: the same model and optimizer objects compile once in a process."""
    model = fc.models.get("dense", num_classes=4, hidden=(16,))
    return fc.create_train_state(jax.random.key(0), model, fc.optim.make("adam"), IMAGES[:1])


def run(workdir, kill_at: int | None = None):
    """``fc.fit`` for :data:`EPOCHS` epochs on the streamed batches, in ``workdir`` (None:
    no workdir, nothing saved)."""
    state = jax.tree.map(jnp.copy, _initial_state())  # fit donates the state it is given
    return fc.fit(state, lambda epoch: batches(epoch, kill_at), EPOCHS, workdir=workdir,
                  verbose="epoch")


if __name__ == "__main__":
    state, history = run(sys.argv[1], int(sys.argv[2]))
    np.savez(sys.argv[3], *jax.tree.leaves(jax.device_get(state.params)))
