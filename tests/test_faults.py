"""Faults and bad input (issue #21): two runs on one workdir, corrupt checkpoints for
fine-tuning, test folders that lack a training class, truncated dataset files."""

import fcntl
import functools
import gzip
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import flaxconv as fc
from flaxconv import checkpoint, data, finetune
from flaxconv.experiment import cli, default_config, parse_flags
from flaxconv.workdir import LOCK_FILE, WorkdirLockedError, claim_workdir, lock_workdir

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
    images, labels = np.zeros((8, 8, 8, 1), np.uint8), np.zeros(8, np.int32)
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

