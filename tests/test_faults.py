"""Faults and bad input (issue #21): two runs on one workdir, SIGTERM, a full disk or a
read-only workdir, corrupt checkpoints for fine-tuning, test folders that lack a training
class, truncated dataset files, an unreadable config.json, out-of-range flags, the sweep's
checkpoints."""

import contextlib
import errno
import fcntl
import functools
import gzip
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import types
import warnings
import zlib
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import preemptible
import pytest
from PIL import Image
from tiny_data import pixel_dataset

import flaxconv as fc
from flaxconv import checkpoint, data, experiment, finetune, preemption
from flaxconv import workdir as workdir_lib
from flaxconv.data import idx_files, tfds_source
from flaxconv.experiment import cli, default_config, parse_flags
from flaxconv.resume import IncompatibleWorkdirError
from flaxconv.workdir import (
    LOCK_FILE,
    WorkdirLockedError,
    WorkdirWriteError,
    claim_workdir,
    lock_workdir,
)

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = os.environ.get(data.DATA_DIR_ENV)


def needs_real(*parts):
    path = Path(REAL_DATA or "/nonexistent", *parts)
    return pytest.mark.skipif(not path.is_file(), reason=f"needs {path} ($FLAXCONV_DATA_DIR)")


def _experiment(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size: what a test checks was left untouched."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


# ----------------------------------------------------------------------- 1. one run per workdir

HOLDER = """
import sys, time
from flaxconv.workdir import lock_workdir
lock = lock_workdir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def _can_flock(path: Path) -> bool:
    """Whether a new open file description of ``path`` gets the exclusive flock now."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_second_run_is_refused_naming_the_holder_and_kill_9_frees_the_workdir(
    tmp_path, capsys
):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        assert line == "locked\n", holder.stderr.read()
        assert (workdir / LOCK_FILE).read_text() == f"{holder.pid}\n"
        with pytest.raises(WorkdirLockedError, match=rf"in use by another run \(PID "
                                                     rf"{holder.pid}, which holds .*\.lock\)"):
            lock_workdir(workdir)
        # The CLI refuses in one line, before loading any data or training.
        status = cli(default_config(), "", ["--workdir", str(workdir), "--data-source", "raw",
                                            "--verbose", "epoch"])
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert status == 1 and "\n" not in err, err
        assert err.startswith(f"error: workdir {workdir} is in use by another run (PID "
                              f"{holder.pid},")
        assert "Epoch" not in captured.out
        assert sorted(os.listdir(workdir)) == [LOCK_FILE]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    # The OS released the dead holder's lock: nothing stale to clean up.
    with lock_workdir(workdir) as lock:
        assert (workdir / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert not _can_flock(workdir / LOCK_FILE)  # a second open file conflicts, even here
        with lock_workdir(workdir):  # the same thread again (train_and_evaluate around fit)
            pass
        assert lock.path is not None and not _can_flock(workdir / LOCK_FILE)  # still held
    assert _can_flock(workdir / LOCK_FILE)
    assert (workdir / LOCK_FILE).read_text() == ""  # a clean release leaves no PID


def test_another_thread_of_the_process_is_refused(tmp_path):
    errors = []

    def second_run():
        try:
            lock_workdir(tmp_path)
        except WorkdirLockedError as error:
            errors.append(str(error))

    with lock_workdir(tmp_path):
        thread = threading.Thread(target=second_run)
        thread.start()
        thread.join()
    assert len(errors) == 1 and f"PID {os.getpid()}, another thread of this process" in errors[0]


def test_fit_releases_the_workdir_when_it_returns_or_fails(tmp_path):
    images, labels = np.zeros((8, 8, 8, 1), np.uint8), np.arange(8, dtype=np.int32) % 2
    model = fc.models.get("dense", num_classes=2, hidden=(4,))
    state = fc.create_train_state(jax.random.key(0), model, fc.optim.make("sgd"), images[:1])
    run = dict(batch_size=4, workdir=tmp_path, verbose="silent")
    with pytest.raises(ValueError, match="train_data produced no batch"):
        fc.fit(state, lambda epoch: iter(()), 1, **run)
    assert _can_flock(tmp_path / LOCK_FILE)
    errors = []

    def second_run():
        try:
            fc.fit(state, (images, labels), 1, **run)
        except WorkdirLockedError as error:
            errors.append(error)

    before = _tree(tmp_path)
    with lock_workdir(tmp_path):  # held by another run: fit refuses before writing anything
        thread = threading.Thread(target=second_run)
        thread.start()
        thread.join()
    assert len(errors) == 1 and _tree(tmp_path) == before
    fc.fit(state, (images, labels), 1, **run)
    assert _can_flock(tmp_path / LOCK_FILE)
    assert (tmp_path / "checkpoints" / "0").is_dir()


def test_a_failed_start_leaves_no_new_workdir(tmp_path):
    with pytest.raises(ValueError, match="no data"):
        with claim_workdir(tmp_path / "new"):
            raise ValueError("no data")
    assert os.listdir(tmp_path) == []
    (tmp_path / "old").mkdir()
    with pytest.raises(ValueError, match="no data"):
        with claim_workdir(tmp_path / "old"):
            raise ValueError("no data")
    assert os.listdir(tmp_path / "old") == [LOCK_FILE]  # the user's folder stays


# ------------------------------------------------------------ 3. restores verify the checksum

SHAPE = (12, 12, 1)


@functools.cache
def _state(num_classes=3, shift=0.0):
    """Cached: states are immutable, and every new one costs a compilation."""
    model = fc.models.get("dlwp_mnist", num_classes=num_classes, features=(4, 8))
    state = fc.create_train_state(jax.random.key(0), model, fc.optim.make("rmsprop"),
                                  np.zeros((1, *SHAPE)))
    return state.replace(params=jax.tree.map(lambda x: x + shift, state.params))


def _replace_arrays(epoch_dir: Path, tmp: Path) -> None:
    """Puts other values into checkpoint ``epoch_dir``'s array files, as a bit flip that
    still decompresses would (Orbax itself reads this without complaint)."""
    other = tmp / "other"
    checkpoint.save_state(other, _state(shift=0.75))
    shutil.rmtree(epoch_dir / "state")
    shutil.copytree(other / epoch_dir.name / "state", epoch_dir / "state")


def _flip_bits(epoch_dir: Path) -> None:
    """Flips one bit in each of 8 bytes of the compressed array data (the OCDBT data file,
    not its index nodes): some flips make Orbax fail, others change values silently."""
    (path,) = [p for p in (epoch_dir / "state" / "ocdbt.process_0" / "d").iterdir()
               if not p.read_bytes().startswith(b"\x0c\xdb\x20\xde")]  # node magic
    raw = bytearray(path.read_bytes())
    for i in range(8):
        raw[(i + 1) * len(raw) // 20] ^= 0x01  # the first half: array chunks, then metadata
    path.write_bytes(bytes(raw))


def test_restore_params_refuses_changed_arrays_naming_the_checkpoint(tmp_path):
    source = tmp_path / "source"
    checkpoint.save_state(source, _state(shift=0.5))
    epoch = int(_state().step)
    target = _state(num_classes=24)
    intact = checkpoint.restore_params(source, target, include="conv_*")
    assert finetune.changed_layers(target, intact) == ["conv_0", "conv_1"]

    _replace_arrays(source / str(epoch), tmp_path)
    before = {"params": jax.device_get(target.params)}
    where = f"{source}/{epoch}"
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=f"checkpoint {where} does not match its checksum"):
        checkpoint.restore_params(source, target, include="conv_*", epoch=epoch)
    with pytest.warns(RuntimeWarning, match=f"checkpoint {where} does not restore"):
        with pytest.raises(FileNotFoundError, match=f"no intact checkpoint under {source}: "
                                                    f"{where}: CorruptCheckpointError"):
            checkpoint.restore_params(source, target, include="conv_*")
    assert finetune.changed_layers(before, target) == []  # nothing was loaded
    # The full restore refuses it alike (the reference behaviour).
    with pytest.raises(checkpoint.CorruptCheckpointError, match="does not match its checksum"):
        checkpoint.Checkpoints(source, asynchronous=False).restore(epoch, _state())


def test_restore_params_refuses_flipped_bits_naming_the_checkpoint(tmp_path):
    checkpoint.save_state(tmp_path, _state(shift=0.5))
    epoch = int(_state().step)
    _flip_bits(tmp_path / str(epoch))
    where = f"{tmp_path}/{epoch}"
    with pytest.warns(RuntimeWarning, match=f"checkpoint {where} does not restore"):
        with pytest.raises(FileNotFoundError,
                           match=f"no intact checkpoint under {tmp_path}: {where}: "):
            checkpoint.restore_params(tmp_path, _state(num_classes=24), include="conv_*")


def test_restore_params_falls_back_to_the_previous_intact_checkpoint(tmp_path):
    saves = checkpoint.Checkpoints(tmp_path / "run", max_to_keep=2, asynchronous=False)
    older = _state(shift=0.25)
    saves.save(0, older, {"epoch": 0})
    saves.save(1, _state(shift=0.5), {"epoch": 1})
    saves.close()
    other = checkpoint.Checkpoints(tmp_path / "other", asynchronous=False)
    other.save(1, _state(shift=0.75), {"epoch": 1})
    other.close()
    shutil.rmtree(tmp_path / "run" / "1" / "state")
    shutil.copytree(tmp_path / "other" / "1" / "state", tmp_path / "run" / "1" / "state")
    listing = _tree(tmp_path / "run")
    with pytest.warns(RuntimeWarning, match=f"checkpoint {tmp_path}/run/1 does not restore "
                                            r"\(CorruptCheckpointError"):
        restored = checkpoint.restore_params(tmp_path / "run", _state())
    assert finetune.changed_layers(older, restored) == []
    assert _tree(tmp_path / "run") == listing  # nothing moved or written


def test_checkpoints_with_the_earlier_checksum_still_verify(tmp_path, monkeypatch):
    """Checkpoints written before the path-keyed checksum carry ``_sha256``."""
    root = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_CHECKSUM", checkpoint._LEGACY_CHECKSUM)
        m.setattr(checkpoint, "_digest", checkpoint._legacy_digest)
        checkpoint.save_state(root, _state(shift=0.5))
    epoch = int(_state().step)
    meta = (root / str(epoch) / "meta" / "metadata").read_text()
    assert '"_sha256"' in meta and "_sha256_by_path" not in meta
    restored, _ = checkpoint.load_state(root, _state())
    assert finetune.changed_layers(_state(shift=0.5), restored) == []
    copied = checkpoint.restore_params(root, _state(), include="conv_*", epoch=epoch)
    assert finetune.changed_layers(_state(shift=0.5), copied) == ["head"]
    _replace_arrays(root / str(epoch), tmp_path)  # its meta keeps the legacy checksum
    with pytest.raises(checkpoint.CorruptCheckpointError, match="does not match its checksum"):
        checkpoint.restore_params(root, _state(), include="conv_*", epoch=epoch)


CORRUPT_RESUME = """
import glob, os, shutil, sys
import jax
import flaxconv as fc
sys.path.insert(0, sys.argv[2])
from tiny_data import pixel_dataset

workdir = sys.argv[1]
def fit(epochs):
    state = fc.create_train_state(jax.random.key(0), fc.models.get("dense", num_classes=3),
                                  fc.optim.make("adam"), pixel_dataset(1, 3)[0])
    fc.fit(state, pixel_dataset(96, 3), epochs, batch_size=32, workdir=workdir, verbose=0)
fit(2)
for path in glob.glob(f"{workdir}/checkpoints/*/state/d/*"):  # every array file
    os.remove(path)
shutil.copytree(f"{workdir}/checkpoints", f"{workdir}-copy")
fit(3)
state = fc.create_train_state(jax.random.key(0), fc.models.get("dense", num_classes=3),
                              fc.optim.make("adam"), pixel_dataset(1, 3)[0])
try:
    fc.checkpoint.restore_params(f"{workdir}-copy", state)
except FileNotFoundError:
    print("finished")
"""


def test_checkpoints_orbax_cannot_read_are_reported_once_each_without_tracebacks(tmp_path):
    # Orbax fails on the first missing array and closes its event loop while its other
    # reads are in flight; they used to print a dozen tracebacks from tensorstore's threads
    # and asyncio (in most runs: it is a race) after the one warning.
    child = subprocess.run(
        [sys.executable, "-c", CORRUPT_RESUME, str(tmp_path / "run"), str(ROOT / "tests")],
        capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == 0 and child.stdout.strip() == "finished", child.stderr
    warned = [line for line in child.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warned) == 5, child.stderr
    for epoch, line in zip(("1", "0"), warned, strict=False):
        assert f"checkpoints/{epoch} is corrupt or incomplete" in line
    assert "training starts over" in warned[2]
    # restore_params (fine-tuning) tries both copies, each one warning, then refuses.
    assert all("has no readable state metadata" in line for line in warned[3:])
    for noise in ("Traceback", "never retrieved", "never awaited", "Event loop is closed"):
        assert noise not in child.stderr, child.stderr
    assert len(os.listdir(tmp_path / "run" / "checkpoints.corrupt")) == 2


# ------------------------------------------------- 4. a test folder takes the training classes


def _save_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_a_test_folder_without_a_training_class_keeps_the_training_labels(tmp_path):
    for name, value in (("a", 0), ("b", 100), ("c", 200)):
        _save_png(tmp_path / "Train" / name / "1.png", value)
    for name, value in (("a", 0), ("c", 200)):  # Test has no "b"
        _save_png(tmp_path / "Test" / name / "1.png", value)
    read = dict(image_size=(8, 8), color_mode="grayscale", shuffle=False)
    train = data.image_folder(tmp_path / "Train", **read)
    assert train.class_names == ("a", "b", "c")
    shifted = data.image_folder(tmp_path / "Test", **read)
    assert shifted.class_names == ("a", "c") and list(shifted.labels) == [0, 1]  # c -> 1: wrong
    test = data.image_folder(tmp_path / "Test", class_names=train.class_names, **read)
    assert test.class_names == ("a", "b", "c") and list(test.labels) == [0, 2]
    # The given order fixes the ids.
    reordered = data.image_folder(tmp_path / "Test", class_names=["c", "b", "a"], **read)
    assert [Path(p).parent.name for p in reordered.file_paths] == ["c", "a"]
    assert list(reordered.labels) == [0, 2]

    _save_png(tmp_path / "Test" / "d" / "1.png", 50)  # a class training never saw
    with pytest.raises(ValueError, match=r"class subfolder\(s\) \['d'\] that are not in "
                                         r"class_names \['a', 'b', 'c'\]"):
        data.image_folder(tmp_path / "Test", class_names=train.class_names, **read)
    for bad, match in (("abc", "expected a list of class subfolder names"),
                       (["a", "a", "b"], r"\['a'\] repeated"),
                       ([], "at least one")):
        with pytest.raises(ValueError, match=match):
            data.image_folder(tmp_path / "Train", class_names=bad, **read)


def _sign_language_folder(root: Path, test_letters: str) -> None:
    for i, letter in enumerate(data.SIGN_LANGUAGE_CLASSES):
        _save_png(root / "Train" / letter / "1.png", 10 * i)
        if letter in test_letters:
            _save_png(root / "Test" / letter / "1.png", 10 * i)


def test_sign_language_experiment_labels_test_images_by_the_training_classes(
    tmp_path, monkeypatch
):
    module = _experiment("sign_language_cnn")
    seen = {}
    monkeypatch.setattr(module, "train_and_evaluate",
                        lambda config, datasets, **kwargs: seen.setdefault("datasets", datasets))
    _sign_language_folder(tmp_path / "folder", test_letters="BY")  # no A in Test
    config = module.get_config()
    config.update(folder=str(tmp_path / "folder"), workdir=str(tmp_path / "run"),
                  validation_split=0.25)
    module.run(config)
    images, labels = seen["datasets"].test
    assert list(labels) == [1, 23]  # B and Y, as in training: not shifted down to 0 and 22
    assert [int(image[0, 0, 0]) for image in images] == [10, 230]

    _save_png(tmp_path / "folder" / "Test" / "J" / "1.png", 0)  # not a training class
    with pytest.raises(ValueError, match=r"\['J'\] that are not in class_names"):
        module.run(config)


def _fake_csvs(root: Path, rows: int = 30) -> None:
    header = "label," + ",".join(f"pixel{i}" for i in range(1, 785))
    labels = [i for i in range(25) if i != 9]
    for split in ("train", "test"):
        lines = [header] + [",".join([str(labels[r % 24])] + ["7"] * 784) for r in range(rows)]
        path = root / "sign_language_mnist" / f"sign_mnist_{split}.csv.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def test_sign_language_experiment_never_writes_into_a_folder_without_test(
    tmp_path, monkeypatch
):
    _fake_csvs(tmp_path / "data")  # what the old code wrote Test/ from
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "data"))
    folder = tmp_path / "mine"
    for letter in "ABC":
        _save_png(folder / "Train" / letter / "1.png", 0)
    before = _tree(folder)
    module = _experiment("sign_language_cnn")
    argv = ["--folder", str(folder), "--workdir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=rf"{folder} exists but has no Test/"):
        module.run(parse_flags(module.get_config(), argv, ""))
    assert _tree(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["data", "mine"]  # no workdir, no temporary folder
    # A new folder is written whole; the make script completes one it is pointed at.
    assert data.sign_language_folder(tmp_path / "new") == tmp_path / "new"
    assert sorted(os.listdir(tmp_path / "new")) == ["Test", "Train"]
    make = _experiment("make_sign_language_folder")
    assert make.main(["--out", str(folder)]) == 0
    assert sorted(os.listdir(folder)) == ["Test", "Train"] and _tree(folder / "Train") == {
        k.removeprefix("Train/"): v for k, v in before.items() if k.startswith("Train/")
    }


# ------------------------------------------------------------ 6. truncated dataset files


def _truncated_copy(source: Path, target: Path, keep: float = 0.5) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as f:
        target.write_bytes(f.read(int(os.path.getsize(source) * keep)))
    return target


@needs_real("mnist", "train-images-idx3-ubyte.gz")
def test_a_truncated_idx_file_is_named_and_the_cli_says_it_in_one_line(
    tmp_path, monkeypatch, capsys
):
    real = Path(REAL_DATA) / "mnist"
    bad = _truncated_copy(real / "train-images-idx3-ubyte.gz",
                          tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz")
    shutil.copy(real / "train-labels-idx1-ubyte.gz", bad.parent)
    with pytest.raises(ValueError, match=rf"{bad} is truncated or corrupt \(gzip: EOFError"):
        data.read_idx(bad)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "data"))
    with pytest.raises(ValueError, match=f"{bad} is truncated or corrupt"):
        data.load("mnist", "train", source="raw")
    workdir = tmp_path / "run"
    status = cli(default_config(), "", ["--data-source", "raw", "--workdir", str(workdir)])
    err = capsys.readouterr().err.strip()
    assert status == 1 and "\n" not in err and err.startswith(f"error: {bad} is truncated")
    assert not workdir.exists()  # the run created it and wrote nothing: removed again
    # A garbled (not cut short) stream is named too.
    garbled = bytearray((real / "train-labels-idx1-ubyte.gz").read_bytes())
    garbled[len(garbled) // 2] ^= 0xFF
    (bad.parent / "garbled.gz").write_bytes(bytes(garbled))
    with pytest.raises(ValueError, match=r"garbled.gz is truncated or corrupt \(gzip: "):
        data.read_idx(bad.parent / "garbled.gz")


@needs_real("sign_language_mnist", "sign_mnist_train.csv.gz")
def test_a_truncated_sign_language_csv_is_named_and_leaves_no_folder(tmp_path, capsys):
    real = Path(REAL_DATA) / "sign_language_mnist" / "sign_mnist_train.csv.gz"
    root = tmp_path / "data"
    bad = _truncated_copy(real, root / "sign_language_mnist" / "sign_mnist_train.csv.gz", 0.02)
    shutil.copy(real.with_name("sign_mnist_test.csv.gz"), bad.parent)
    with pytest.raises(ValueError, match=rf"{bad} is truncated or corrupt \(gzip: EOFError"):
        data.load_sign_language_mnist("train", root)

    make = _experiment("make_sign_language_folder")
    out = tmp_path / "out"
    assert make.main(["--out", str(out), "--data-dir", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {bad} is truncated or corrupt")
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no output folder, empty or temporary

    # The same file uncompressed, its last row cut short.
    text = zlib.decompressobj(wbits=31).decompress(bad.read_bytes())
    plain = root / "plain" / "sign_language_mnist" / "sign_mnist_train.csv"
    plain.parent.mkdir(parents=True)
    plain.write_bytes(text)
    with pytest.raises(ValueError, match=rf"{plain} is truncated or corrupt \(.*\); expected "
                                         r"the complete Kaggle CSV"):
        data.load_sign_language_mnist("train", root / "plain")



# ------------------------------------------------------------ SIGTERM: graceful preemption


def _params(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def _same_run(history_a, history_b) -> None:
    for key in ("loss", "accuracy"):
        assert history_a[key] == history_b[key], key


def test_sigterm_mid_epoch_saves_exits_143_and_the_same_command_resumes(tmp_path):
    workdir = tmp_path / "run"
    kill_at = 7  # global batch 7: epoch 2 (5 batches an epoch), after 2 of its steps
    child = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "preemptible.py"), str(workdir), str(kill_at),
         str(tmp_path / "unused.npz")],
        capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == 143, child.stderr
    message = (f"preempted (SIGTERM) at step 7, in epoch 2/3 after 2 of its steps; saved "
               f"{workdir}/preempted/7; run the same command again to resume")
    assert child.stderr.strip().splitlines() == [message]
    assert "Epoch 2/3" in child.stdout and not (tmp_path / "unused.npz").exists()
    assert _can_flock(workdir / LOCK_FILE)  # released on the way out
    assert os.listdir(workdir / "checkpoints") == ["0"]

    state, history = preemptible.run(workdir)  # the same run again: resumes in epoch 2
    assert not (workdir / "preempted").exists()  # epoch 2's own checkpoint holds it now
    reference, reference_history = preemptible.run(None)  # uninterrupted, nothing saved
    assert int(state.step) == int(reference.step) == 15
    for a, b in zip(_params(state), _params(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    _same_run(history, reference_history)


STOP = {"at_call": None, "calls": 0}  # the training call of StopsAt that requests a stop


class StopsAt(nn.Module):
    """A small dense classifier that requests a preemption stop from inside its
    STOP["at_call"]th training call (a host callback in the jitted scan, arriving while
    the device trains, as a signal would)."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if train:
            jax.debug.callback(_count_call)
        x = x.reshape((x.shape[0], -1)).astype(jax.numpy.float32)
        return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))


def _count_call():
    STOP["calls"] += 1
    if STOP["calls"] == STOP["at_call"]:
            preemption.request_stop("test request")


class _StopAfterEpoch(fc.callbacks.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs, state):
        if epoch == self.epoch:
                    preemption.request_stop("test request")


def test_a_stop_in_a_scanned_epoch_or_at_its_end_resumes_to_the_same_parameters(tmp_path):
    data_ = pixel_dataset(80, 4)
    model = StopsAt()
    state0 = fc.create_train_state(jax.random.key(0), model, fc.optim.make("adam"),
                                   data_[0][:1])

    def run(workdir, stop_epoch=-1):
        state = jax.tree.map(jnp_copy, state0)
        # "bar": 20 scan calls an epoch, so a stop lands between two of them.
        return fc.fit(state, data_, 3, batch_size=4, workdir=workdir, verbose="bar",
                      callbacks=[_StopAfterEpoch(stop_epoch)])

    STOP.update(at_call=None, calls=0)
    reference, reference_history = run(None)
    workdir = tmp_path / "run"
    with pytest.raises(preemption.Preempted) as stopped:
        run(workdir, stop_epoch=0)
    assert stopped.value.code == 143 and str(stopped.value) == (
        f"preempted (test request) at step 20, after epoch 1/3; saved {workdir}/checkpoints/0; "
        f"run the same command again to resume")
    STOP.update(at_call=6, calls=0)  # the 6th step of epoch 2, where this run resumes
    with pytest.raises(preemption.Preempted) as stopped:
        run(workdir)
    match = re.fullmatch(rf"preempted \(test request\) at step (\d+), in epoch 2/3 after "
                         rf"(\d+) of its steps; saved {workdir}/preempted/(\d+); .*",
                         str(stopped.value))
    assert match and 6 <= int(match[2]) < 20 and match[1] == match[3]
    STOP.update(at_call=None)
    state, history = run(workdir)
    assert not (workdir / "preempted").exists() and _can_flock(workdir / LOCK_FILE)
    for a, b in zip(_params(state), _params(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    _same_run(history, reference_history)
    assert preemption.request_stop() is False  # no run is training: nothing to stop


def jnp_copy(x):
    return jax.numpy.array(x, copy=True)


# ------------------------------------------------------------------ 2. a full disk, read-only


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (root on Linux); skips the test elsewhere."""
    path.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                  str(path)], capture_output=True, text=True)
    except OSError as error:
        pytest.skip(f"cannot mount a tmpfs here ({error})")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def _run_files(workdir: Path) -> set[str]:
    """The files and folders a run left, minus the lock file."""
    return {str(p.relative_to(workdir)) for p in workdir.rglob("*")} - {LOCK_FILE}


def _temporary(workdir: Path) -> list[str]:
    return sorted(name for name in _run_files(workdir) if ".tmp" in name)


@functools.cache
def _big_dense_state():
    """A dense model whose checkpoints take about 0.4 MB (Adam triples the parameters)."""
    model = fc.models.get("dense", num_classes=4, hidden=(400,))
    return fc.create_train_state(jax.random.key(0), model, fc.optim.make("adam"),
                                 np.zeros((1, 8, 8, 1), np.uint8))


def _fit_big(workdir, epochs=4):
    state = jax.tree.map(jnp_copy, _big_dense_state())
    return fc.fit(state, pixel_dataset(64, 4), epochs, batch_size=32, workdir=workdir,
                  verbose="silent")


def test_a_failed_history_write_stops_the_run_in_one_line_and_keeps_the_previous_files(
    tmp_path, monkeypatch, capsys
):
    """ENOSPC simulated in the JSON writer (half a file written, then the error): the
    variant that runs everywhere; the tmpfs tests below fill a real disk."""
    def dump_until_full(obj, f, **kwargs):
        if isinstance(obj, dict) and len(obj.get("loss", ())) == 2:  # epoch 2's history
            f.write(json.dumps(obj)[:20])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        json.dump(obj, f, **kwargs)

    fake_json = types.SimpleNamespace(dump=dump_until_full, load=json.load,
                                      loads=json.loads, dumps=json.dumps)
    workdir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(workdir_lib, "json", fake_json)
        status = experiment.report_errors(lambda: _fit_big(workdir, epochs=3))
    err = capsys.readouterr().err.strip()
    assert status == 1 and err == (
        f"error: cannot write {workdir}/history.json: no space left on device; free some "
        f"space, then run the same command again to resume from the last checkpoint")
    assert _temporary(workdir) == []  # no history.tmp.json left behind
    assert len(json.loads((workdir / "history.json").read_text())["loss"]) == 1  # epoch 1's
    assert sorted(os.listdir(workdir / "checkpoints")) == ["0", "1"]
    assert _can_flock(workdir / LOCK_FILE)

    state, history = _fit_big(workdir, epochs=3)  # space again: resumes after epoch 2
    reference, reference_history = _fit_big(None, epochs=3)
    for a, b in zip(_params(state), _params(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    _same_run(history, reference_history)


def test_a_full_tmpfs_stops_the_run_before_a_checkpoint_that_cannot_fit(tmp_path):
    mount = tmp_path / "disk"
    with _tmpfs(mount, "1000k"):  # two checkpoints fit, not a third
        workdir = mount / "run"
        with pytest.raises(WorkdirWriteError) as error:
            _fit_big(workdir)
        assert error.value.errno == errno.ENOSPC
        assert re.fullmatch(
            rf"cannot write {workdir}/checkpoints/2: no space left on device \(it needs "
            rf"about 0\.\d\d MB, 0\.\d\d MB are free\); free some space, then run the same "
            rf"command again to resume from the last checkpoint", str(error.value))
        assert sorted(os.listdir(workdir / "checkpoints")) == ["0", "1"]
        assert _temporary(workdir) == []
        assert len(json.loads((workdir / "history.json").read_text())["loss"]) == 2
        assert _can_flock(workdir / LOCK_FILE)

        _remount(mount, "size=4m")  # space freed: the same call resumes after epoch 2
        state, history = _fit_big(workdir)
        reference, reference_history = _fit_big(None)
        for a, b in zip(_params(state), _params(reference), strict=True):
            np.testing.assert_array_equal(a, b)
        _same_run(history, reference_history)


def test_a_checkpoint_write_that_fills_the_disk_is_one_error_and_leaves_no_temporary(
    tmp_path, monkeypatch
):
    """The free-space check fooled, so the disk fills inside Orbax's writer threads."""
    mount = tmp_path / "disk"
    with _tmpfs(mount, "1000k"):
        plenty = shutil._ntuple_diskusage(1 << 40, 0, 1 << 40)
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: plenty)
        workdir = mount / "run"
        with pytest.raises(WorkdirWriteError) as error:
            _fit_big(workdir, epochs=5)
        # The first write that failed: a checkpoint or, while one was being written, history.
        assert error.value.errno == errno.ENOSPC
        assert re.fullmatch(rf"cannot write {workdir}/(checkpoints/\d|history.json): no space "
                            rf"left on device; .*", str(error.value))
        assert _temporary(workdir) == []  # neither Orbax's temporary folder nor ours
        saved = checkpoint.Checkpoints(workdir / "checkpoints", asynchronous=False)
        try:
            assert saved.epochs() and saved.restore(saved.epochs()[-1], _big_dense_state())
        finally:
            saved.close()
        json.loads((workdir / "history.json").read_text())


def test_a_read_only_workdir_is_one_line_and_left_untouched(tmp_path, capsys):
    mount = tmp_path / "disk"
    with _tmpfs(mount, "4m"):
        workdir = mount / "run"
        _fit_big(workdir, epochs=1)
        before = _tree(workdir)
        _remount(mount, "ro")
        assert experiment.report_errors(lambda: _fit_big(workdir, epochs=2)) == 1
        err = capsys.readouterr().err.strip()
        assert err == (f"error: cannot write {workdir}/{LOCK_FILE}: read-only file system; "
                       f"make it writable or use another workdir, then run the same command "
                       f"again to resume from the last checkpoint")
        assert _tree(workdir) == before
        status = cli(default_config(), "", ["--workdir", str(mount / "new"), "--verbose",
                                            "silent"])
        err = capsys.readouterr().err.strip()
        assert status == 1 and "\n" not in err and err.startswith(
            f"error: workdir='{mount}/new' cannot be created as a directory: Read-only")


# --------------------------------------------------------------- config.json, flags, sweep


@functools.cache
def _small_dense_state():
    model = fc.models.get("dense", num_classes=4, hidden=(8,))
    return fc.create_train_state(jax.random.key(0), model, fc.optim.make("adam"),
                                 np.zeros((1, 8, 8, 1), np.uint8))


def _fit_small(workdir, **config):
    state = jax.tree.map(jnp_copy, _small_dense_state())
    return fc.fit(state, pixel_dataset(32, 4), 1, batch_size=16, workdir=workdir,
                  verbose="silent", config=config)


def test_an_unreadable_or_missing_config_json_is_refused_naming_it(tmp_path):
    workdir = tmp_path / "run"
    _fit_small(workdir, learning_rate=1e-3)
    config = workdir / "config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(IncompatibleWorkdirError,
                       match=rf"^{config} is unreadable \(Unterminated string .*\); it records "
                             rf"the configuration of the run in {workdir}: put it back"):
        _fit_small(workdir, learning_rate=1e-3)
    config.unlink()  # deleted: the checkpoints cannot be matched to a configuration
    listing = _tree(workdir)
    with pytest.raises(IncompatibleWorkdirError,
                       match=rf"^workdir {workdir} holds checkpoints \({workdir}/checkpoints\) "
                             rf"but no config.json, so this run cannot tell"):
        _fit_small(workdir, learning_rate=0.01)
    assert _tree(workdir) == listing  # nothing moved aside as "corrupt", nothing written
    config.write_text(text)  # put back: resumes (nothing left to train)
    _fit_small(workdir, learning_rate=1e-3)


@pytest.mark.parametrize("flags, message", [
    (["--seed", "99999999999999999999"],
     "error: seed=99999999999999999999; expected an integer from 0 to 4294967295"),
    (["--seed", "-1"], "error: seed=-1; expected an integer from 0 to 4294967295"),
    (["--train-examples", "-59990"],
     "error: train_examples=-59990; expected 0 (the whole training split) or a positive"),
])
def test_out_of_range_seed_and_train_examples_are_one_line_before_any_data(
    tmp_path, capsys, flags, message
):
    workdir = tmp_path / "run"
    status = cli(default_config(), "", ["--workdir", str(workdir), "--dataset", "nothing",
                                        *flags])
    err = capsys.readouterr().err.strip()
    assert status == 1 and "\n" not in err and err.startswith(message)
    assert not workdir.exists()


def _sweep():
    return _experiment("mnist_sweep")


def _built_once(build):
    """``build`` returning the same object for the same arguments."""
    built = {}

    def once(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build(*args, **kwargs)
        return built[key]

    return once


def test_the_sweep_saves_each_epoch_resumes_stops_on_sigterm_and_fails_when_all_diverge(
    tmp_path, monkeypatch, capsys
):
    sweep = _sweep()
    splits = {"train": pixel_dataset(128, 4, seed=0), "test": pixel_dataset(64, 4, seed=1)}
    monkeypatch.setattr(sweep.data, "load", lambda name, split, source: splits[split])
    # The same model and optimizer objects for every run, so that they compile once.
    monkeypatch.setattr(fc.optim, "make", _built_once(fc.optim.make))
    monkeypatch.setattr(fc.models, "get", _built_once(fc.models.get))
    flags = ["--model", "dense", "--num-models", "2", "--learning-rates", "1e-3,3e-3",
             "--epochs", "2"]
    train_epoch = sweep.pop.train_population_epoch

    def preempted_in_epoch_1(states, *args):
        preemption.request_stop("SIGTERM")  # as the signal handler does
        monkeypatch.setattr(sweep.pop, "train_population_epoch", train_epoch)
        return train_epoch(states, *args)

    workdir = tmp_path / "run"
    monkeypatch.setattr(sweep.pop, "train_population_epoch", preempted_in_epoch_1)
    assert sweep.main([*flags, "--workdir", str(workdir)]) == 143
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"preempted (SIGTERM) at step 2, after epoch 1/2; saved {workdir}/checkpoints/0; "
        f"run the same command again to resume")
    assert "epoch 1/2" in captured.out and not (workdir / "results.json").exists()

    assert sweep.main([*flags, "--workdir", str(workdir)]) == 0
    assert f"Resuming from {workdir}/checkpoints/0 (epoch 1/2 done)" in capsys.readouterr().out
    assert sweep.main([*flags, "--workdir", str(tmp_path / "reference")]) == 0
    resumed, reference = (json.loads((w / "results.json").read_text())["members"]
                          for w in (workdir, tmp_path / "reference"))
    assert [m["history"] for m in resumed] == [m["history"] for m in reference]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["0", "1"]

    capsys.readouterr()
    assert sweep.main([*flags, "--workdir", str(workdir), "--learning-rates", "1e-2"]) == 1
    assert "holds a run with another configuration (learning_rates: " in capsys.readouterr().err

    diverged = tmp_path / "diverged"
    assert sweep.main([*flags, "--learning-rates", "1e30", "--workdir", str(diverged)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: every member diverged in epoch 1 (training losses [nan, "
                          "nan]); stopped (lower the learning rates")
    assert not os.listdir(diverged / "checkpoints")  # nothing saved of the NaN states

    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--seeds", "1,99999999999999999999"])
    assert exit_info.value.code == 2
    assert ("seed 1 of --seeds=99999999999999999999; expected an integer from 0 to "
            "4294967295") in capsys.readouterr().err


# ------------------------------------------------- data: published files, pixels, one class


@needs_real("fashion_mnist", "train-images-idx3-ubyte.gz")
def test_fashion_files_under_mnist_are_refused_unless_the_folder_says_they_are_custom(
    tmp_path, monkeypatch
):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        os.symlink(Path(REAL_DATA) / "fashion_mnist" / name, folder / name)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    images = folder / "train-images-idx3-ubyte.gz"
    with pytest.raises(ValueError, match=re.escape(
            f"{images} is not the published mnist file (SHA-256 3aede38d61863908..., "
            f"expected 440fcabf73cc546f...; it is fashion_mnist's train-images-idx3-ubyte.gz)"
            f"; download it again, or, to train on files of your own, create an empty "
            f"{folder}/CUSTOM_FILES")):
        data.load("mnist", "train", source="raw")
    (folder / idx_files.CUSTOM_FILES_MARKER).touch()
    images, labels = data.load("mnist", "train", source="raw")
    assert images.shape == (60_000, 28, 28, 1) and labels.max() == 9


def test_nan_pixels_and_unscaled_floats_and_one_class_are_named_before_training(tmp_path):
    images, labels = pixel_dataset(32, 4)
    state = _small_dense_state()
    scaled = images.astype(np.float32) / 255
    nan = scaled.copy()
    nan[5, 1, 2, 0] = np.nan
    nan[9, 0, 0, 0] = np.inf
    for where in ("training", "validation"):
        run = {"train_data": (nan, labels)} if where == "training" else {
            "train_data": (scaled, labels), "validation_data": (nan, labels)}
        with pytest.raises(ValueError, match=rf"^{where} images hold 2 NaN or infinite pixel "
                                             rf"value\(s\), e.g. in image 5; expected finite"):
            fc.fit(state, epochs=0, verbose="silent", **run)
    with pytest.warns(RuntimeWarning, match=r"training images are float32 in \[0, 255\]; "
                                            r"expected floats in \[0, 1\]"):
        fc.fit(state, (images.astype(np.float32), labels), 0, verbose="silent")
    with pytest.warns(RuntimeWarning, match=r"training labels hold a single class \(3\) in all "
                                            r"32 examples"):
        fc.fit(state, (images, np.full(32, 3, np.int32)), 0, verbose="silent")
    standardized = (scaled - scaled.mean()) / scaled.std()  # negative values: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fc.fit(state, (standardized, labels), 0, validation_data=(scaled, labels),
               verbose="silent")
    # fc.evaluate (fit's validation, the experiments' test set, a user's own call) too.
    with pytest.raises(ValueError, match=r"^images hold 2 NaN or infinite pixel value\(s\), "
                                         r"e.g. in image 5"):
        fc.evaluate(state, nan, labels)
    # The experiments check their test set before training.
    config = default_config()
    config.update(workdir=str(tmp_path / "run"), verbose="silent")
    with pytest.raises(ValueError, match=r"^test images hold 2 NaN or infinite pixel"):
        experiment.train_and_evaluate(
            config, datasets=experiment.Datasets((scaled, labels), (nan, labels), 4))
    assert not (tmp_path / "run").exists()


def test_a_dataset_to_download_while_offline_fails_at_once(tmp_path, monkeypatch):
    if not tfds_source._tfds_importable():
        pytest.skip("tfds needs TensorFlow")

    def offline(address, timeout=None):
        raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))

    monkeypatch.setattr(tfds_source.socket, "create_connection", offline)
    monkeypatch.setattr(tfds_source.urllib.request, "getproxies", dict)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "no_cifar_here"))
    with pytest.raises(data.DatasetUnavailableError,
                       match=r"dataset 'cifar10' is unavailable \(cannot reach "
                             r"www\.cs\.toronto\.edu:443 to download it: Network is unreachable"):
        data.load("cifar10", "train", source="tfds", data_dir=tmp_path / "tfds")
