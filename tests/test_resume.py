"""A training run killed with SIGKILL and started again ends exactly where an uninterrupted one
does: the real CLI in subprocesses, on a small slice of real MNIST."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import flaxconv as fc
from flaxconv.checkpoint import load_state

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("FLAXCONV_DATA_DIR")
pytestmark = pytest.mark.skipif(
    not (DATA_DIR and (Path(DATA_DIR) / "mnist").is_dir()),
    reason="needs real MNIST in $FLAXCONV_DATA_DIR/mnist",
)
EPOCHS = 10


def command(workdir: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "experiments" / "mnist_convnet.py"),
        "--data-source", "raw", "--train-examples", "1024", "--model", "dense",
        "--batch-size", "32", "--epochs", str(EPOCHS), "--validation-split", "0.25",
        "--metrics", "accuracy", "--verbose", "epoch", "--workdir", str(workdir),
    ]


def run(workdir: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command(workdir), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start(workdir: Path) -> subprocess.Popen:
    """The command in the background, its output in files (a full pipe would block it)."""
    with open(f"{workdir}.log", "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(command(workdir), stdout=out, stderr=subprocess.STDOUT)


def log(workdir: Path) -> str:
    return Path(f"{workdir}.log").read_text()[-3000:]


def final_state(workdir: Path):
    model = fc.models.get("dense")
    template = fc.create_train_state(
        jax.random.key(0), model, fc.optim.make("rmsprop", 1e-3), np.zeros((1, 28, 28, 1))
    )
    state, meta = load_state(workdir / "checkpoints", template)
    return state, meta


def test_sigkill_mid_run_then_rerun_ends_with_identical_parameters(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = start(reference)

    # Kill -9 as soon as the first checkpoint is committed (Orbax renames a finished
    # checkpoint into place): mid-training, or mid-way through writing the next one.
    process = start(killed)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "0").is_dir():
        assert process.poll() is None, f"the run ended before its first checkpoint: {log(killed)}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it was killed"
    assert not (killed / "results.json").exists()

    rerun = run(killed)
    assert uninterrupted.wait(timeout=300) == 0, log(reference)
    assert "Resuming from" in rerun.stdout
    resumed_from = int(rerun.stdout.split("Resuming from")[1].split("(epoch ")[1].split("/")[0])
    assert resumed_from >= 1
    trained = rerun.stdout.count("Epoch ")
    assert trained == EPOCHS - resumed_from  # no epoch trained twice in the rerun

    ours, meta = final_state(killed)
    theirs, reference_meta = final_state(reference)
    assert meta["epoch"] == reference_meta["epoch"] == EPOCHS - 1
    assert int(ours.step) == int(theirs.step) == EPOCHS * 24  # 768 examples / 32
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit

    # The history covers every epoch, the earlier ones restored, and agrees exactly.
    ours_h = json.loads((killed / "history.json").read_text())
    theirs_h = json.loads((reference / "history.json").read_text())
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert ours_h[key] == theirs_h[key]
    results = json.loads((killed / "results.json").read_text())
    assert results["test_accuracy"] == json.loads((reference / "results.json").read_text())[
        "test_accuracy"
    ]
