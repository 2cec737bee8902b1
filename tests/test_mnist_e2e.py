"""End to end on the real MNIST: the main job's command, two epochs, all 10,000 test images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("FLAXCONV_DATA_DIR")


@pytest.mark.skipif(not DATA_DIR, reason="FLAXCONV_DATA_DIR is not set")
def test_mnist_convnet_two_epochs_reach_98_percent_on_the_full_test_set(tmp_path):
    workdir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "experiments" / "mnist_convnet.py"), "--epochs", "2",
               "--workdir", str(workdir), "--verbose", "epoch", "--data-source", "raw"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Total params: 104,202" in done.stdout  # the Keras-like summary
    assert done.stdout.count("938/938") == 2  # one Keras-style line per epoch

    results = json.loads((workdir / "results.json").read_text())
    assert results["test_examples"] == 10_000
    assert results["test_accuracy"] >= 0.98  # DLWP's convnet after two epochs: ~98.5-99%
    assert 0 < results["test_loss"] < 0.1
    assert len(results["epoch_seconds"]) == 2 and results["train_seconds"] > 0
    assert results["devices"] and results["config"]["model"] == "dlwp_mnist"
    saved = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == ["0", "1"]
    for png in ("curves.png", "feature_maps.png", "filters.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_dataset_is_one_readable_line(tmp_path):
    command = [sys.executable, str(ROOT / "experiments" / "mnist_convnet.py"),
               "--dataset", "no_such_dataset", "--workdir", str(tmp_path / "run")]
    env = {**os.environ, "FLAXCONV_DATA_DIR": str(tmp_path)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no_such_dataset" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_workdir_that_is_a_file_is_one_readable_line_before_any_work(tmp_path):
    in_the_way = tmp_path / "runs"
    in_the_way.write_text("my notes")
    command = [sys.executable, str(ROOT / "experiments" / "mnist_convnet.py"),
               "--workdir", str(in_the_way / "mnist")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: workdir='{in_the_way}/mnist'")
    assert "Traceback" not in done.stderr
    assert done.stdout == ""  # failed before loading data or printing the model
    assert in_the_way.read_text() == "my notes"
