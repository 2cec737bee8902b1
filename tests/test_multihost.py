"""Multi-process (multi-host) data parallelism, on one machine: two CPU processes joined by
``fc.parallel.initialize`` over loopback (JAX's CPU collectives are gloo), two devices each.

What this shows: the processes form one 4-device mesh; ``fc.fit`` trains the same model
as one process on one device (array data, replicated), and so does a stream of global
batches to which each process contributes only its rows (``process_batches``); the Orbax
checkpoints both processes write together restore in each of them and in a plain
single-device process; SIGTERM to one process stops both at the same step, saved, and the
rerun resumes. What a real cluster adds (several machines, a shared file
system, TPU/GPU interconnects) cannot be tested here.
"""

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import numpy as np

import flaxconv as fc
from flaxconv import parallel, preemption
from flaxconv.checkpoint import load_state

REPO = Path(__file__).resolve().parents[1]
N, BATCH, EPOCHS = 128, 16, 1
TOL = 1e-5

COMMON = f"""
import functools
import jax, numpy as np
import flaxconv as fc

N, BATCH, EPOCHS = {N}, {BATCH}, {EPOCHS}


def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 12, 12, 1), dtype=np.uint8)
    return images, (images.reshape(N, -1)[:, :10].argmax(-1)).astype(np.int32)


@functools.cache
def _initial_state():
    model = fc.models.get("dlwp_mnist", features=(4, 8))
    tx = fc.optim.make("rmsprop", learning_rate=1e-3)
    return fc.create_train_state(jax.random.key(0), model, tx, np.zeros((1, 12, 12, 1)))


def new_state():  # a fresh copy (fit donates its input); one init, one optimizer object
    return jax.tree.map(jax.numpy.copy, _initial_state())


def validation(images, labels):
    return images[:40], labels[:40]


def stream(images, labels, mesh=None):
    return lambda epoch: fc.parallel.process_batches(
        images, labels, BATCH, mesh, shuffle=True, seed=0, epoch=epoch)
"""

WORKER = COMMON + """
import sys
from flaxconv import parallel
from flaxconv.checkpoint import load_state, save_state, state_arrays

process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
assert parallel.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
assert parallel.initialize()  # again: harmless
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2

images, labels = data()
mesh = parallel.data_mesh()
state, history = fc.fit(new_state(), (images, labels), epochs=EPOCHS, batch_size=BATCH,
                        validation_data=validation(images, labels), verbose="silent")
assert set(jax.tree.leaves(state.params)[0].sharding.device_set) == set(jax.devices())

# Every process takes part in writing the checkpoint, and it restores onto the 4 devices.
save_state(workdir + "/checkpoint", state, {"epochs": EPOCHS})
template = parallel.replicate(new_state(), mesh)
restored, meta = load_state(workdir + "/checkpoint", template)
assert meta == {"epochs": EPOCHS}, meta
chex_ok = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                       state_arrays(restored), state_arrays(state))
assert all(jax.tree.leaves(chex_ok)), chex_ok

# Streaming: this process reads only its half of every global batch.
streamed, _ = fc.fit(parallel.replicate(new_state(), mesh), stream(images, labels, mesh),
                     epochs=EPOCHS, verbose="silent")
if process_id == 0:
    np.savez(workdir + "/result.npz", loss=history["loss"], val_loss=history["val_loss"],
             **{"fit/" + jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(state.params)},
             **{"stream/" + jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(streamed.params)})
print(f"process {process_id} OK", flush=True)
"""


PREEMPTED_WORKER = COMMON + """
import os, signal, sys, time
from flaxconv import parallel, preemption

process_id, port, workdir, signal_at = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
assert parallel.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)


class SigtermOnce(fc.callbacks.Callback):
    \"\"\"Process 1 gets SIGTERM after epoch ``signal_at``; every later step takes 50 ms
    more, so JAX's notice (about 0.5 s to reach both) arrives well before the end, most
    likely inside an epoch. Without a signal (the rerun), each process tries request_stop()
    once.\"\"\"

    batch_interval = 1
    signalled = False

    def on_train_batch_end(self, batch, logs, state):
        if self.signalled:
            time.sleep(0.05)

    def on_epoch_end(self, epoch, logs, state):
        if epoch == signal_at:
            self.signalled = True
            if process_id == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        if signal_at < 0 and epoch == PREEMPT_EPOCHS - 1:
            try:
                preemption.request_stop("a time budget")
            except RuntimeError as error:
                print("refused:", error, flush=True)


images, labels = data()
mesh = parallel.data_mesh()
# A stream: the stop flag is asked after every step, Orbax's saves once per epoch.
state, _ = fc.fit(parallel.replicate(new_state(), mesh), stream(images, labels, mesh),
                  epochs=PREEMPT_EPOCHS, workdir=workdir, callbacks=[SigtermOnce()],
                  verbose="silent")
if process_id == 0:
    np.savez(workdir + "/../params.npz",
             **{jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(state.params)})
print(f"process {process_id} done", flush=True)
"""
PREEMPT_EPOCHS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def two_processes(script: str, *args: str):
    """Starts ``script`` as processes 0 and 1 of one JAX job (2 CPU devices each), runs the
    ``with`` block meanwhile, then waits for them: the list it yields is filled with each
    one's ``(exit status, stdout, stderr)``."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    port = str(free_port())
    workers = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(i), port, *args],
                         env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for i in range(2)
    ]
    results: list[tuple[int, str, str]] = []
    try:
        yield results
        for worker in workers:
            out, err = worker.communicate(timeout=300)
            results.append((worker.returncode, out, err))
    finally:
        for worker in workers:
            worker.kill()


def run_two_processes(script: str, *args: str) -> list[tuple[int, str, str]]:
    """:func:`two_processes` with nothing to do meanwhile."""
    with two_processes(script, *args) as results:
        pass
    return results


def test_two_processes_train_like_one_device_and_share_checkpoints(tmp_path):
    with two_processes(WORKER, str(tmp_path)) as results:
        # The reference, meanwhile: the same training in this single process, on one CPU
        # device (like the workers: a GPU's float rounding would differ by more than TOL).
        namespace = {}
        exec(textwrap.dedent(COMMON), namespace)
        images, labels = namespace["data"]()
        cpu = jax.devices("cpu")[0]
        mesh = parallel.data_mesh([cpu])
        one = lambda: parallel.replicate(namespace["new_state"](), mesh)  # noqa: E731
        fitted, history = fc.fit(one(), (images, labels), epochs=EPOCHS, batch_size=BATCH,
                                 validation_data=namespace["validation"](images, labels),
                                 verbose="silent")
        streamed, _ = fc.fit(one(), namespace["stream"](images, labels, mesh), epochs=EPOCHS,
                             verbose="silent")
    for i, (status, out, err) in enumerate(results):
        assert status == 0 and f"process {i} OK" in out, f"process {i}:\n{err[-4000:]}"

    result = np.load(tmp_path / "result.npz")
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(result[key], history[key], rtol=TOL, atol=TOL, err_msg=key)
    for prefix, reference in (("fit/", fitted), ("stream/", streamed)):
        for key, value in jax.tree_util.tree_leaves_with_path(reference.params):
            np.testing.assert_allclose(result[prefix + jax.tree_util.keystr(key)],
                                       np.asarray(value), rtol=TOL, atol=TOL)

    # The two processes' checkpoint restores onto this process's single device.
    restored, meta = load_state(tmp_path / "checkpoint", one())
    assert meta == {"epochs": EPOCHS}
    assert restored.params["head"]["kernel"].sharding.device_set == {cpu}
    chex.assert_trees_all_close(jax.device_get(restored.params),
                                jax.device_get(fitted.params), rtol=TOL, atol=TOL)


def test_sigterm_to_one_process_stops_all_at_the_same_step_and_the_rerun_resumes(tmp_path):
    """JAX's preemption service catches SIGTERM in a multi-process job; fit asks its sync
    point after every step of a stream, so both processes save at one step (mostly inside
    an epoch: the partial-epoch checkpoint) and exit 143, and running the same command
    again ends where an uninterrupted run does. request_stop() is refused there."""
    script = PREEMPTED_WORKER.replace("PREEMPT_EPOCHS", str(PREEMPT_EPOCHS))
    workdir = str(tmp_path / "run")
    results = run_two_processes(script, workdir, "1")
    messages = []
    for i, (status, _, err) in enumerate(results):
        lines = [line for line in err.splitlines() if line.startswith("preempted (")]
        assert status == preemption.EXIT_STATUS and len(lines) == 1, f"process {i}:\n{err[-4000:]}"
        messages.append(lines[0])
    assert messages[0] == messages[1]  # the same step, the same saved checkpoint
    step = int(messages[0].split(" at step ")[1].split(",")[0])
    steps_per_epoch = N // BATCH
    assert 2 * steps_per_epoch <= step < PREEMPT_EPOCHS * steps_per_epoch, messages[0]
    assert "SIGTERM" in messages[0] and "run the same command again" in messages[0]

    for i, (status, out, err) in enumerate(run_two_processes(script, workdir, "-1")):
        assert status == 0 and f"process {i} done" in out, f"process {i}:\n{err[-4000:]}"
        # One process cannot stop alone: the other would wait in a collective.
        assert "refused: request_stop() in a multi-process run (2 processes)" in out, out
        assert "send SIGTERM to any one of them" in out

    namespace = {}
    exec(textwrap.dedent(COMMON), namespace)
    images, labels = namespace["data"]()
    mesh = parallel.data_mesh([jax.devices("cpu")[0]])
    reference, _ = fc.fit(parallel.replicate(namespace["new_state"](), mesh),
                          namespace["stream"](images, labels, mesh), epochs=PREEMPT_EPOCHS,
                          verbose="silent")
    resumed = np.load(tmp_path / "params.npz")
    for key, value in jax.tree_util.tree_leaves_with_path(reference.params):
        np.testing.assert_allclose(resumed[jax.tree_util.keystr(key)], np.asarray(value),
                                   rtol=TOL, atol=TOL)


def test_checkpoint_saves_leave_jax_preemption_sync_point_to_the_stop_flag(tmp_path, monkeypatch):
    """The sync protocol needs one sequence of call ids per process. Orbax's manager would
    add its own (checkpoint numbers, also from its saving thread), so a stop could land
    on one of its calls and never on fit's; a Checkpoints save must not call it."""
    from jax.experimental import multihost_utils

    from flaxconv.checkpoint import Checkpoints

    calls = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                        lambda step: calls.append(step) or False)
    namespace = {}
    exec(textwrap.dedent(COMMON), namespace)
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    try:
        for epoch in range(2):
            checkpoints.save(epoch, namespace["new_state"](), {"epoch": epoch})
        checkpoints.wait()
    finally:
        checkpoints.close()
    assert calls == []
