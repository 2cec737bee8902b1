"""python -m flaxconv.predict: top classes per image file, files read as image_folder reads
them, one line per failure and a non-zero exit; and the README's save / load / export /
predict snippets, run as written."""

import re
import runpy
import shlex
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from serving_models import CLASSES, IMAGES, LABELS, states, trained

import flaxconv as fc
from flaxconv import steps

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["up", "down", "left", "right"]


def run_cli(monkeypatch, capsys, *args):
    """``python -m flaxconv.predict *args`` in this process: ``(status, stdout, stderr)``."""
    monkeypatch.setattr(sys, "argv", ["flaxconv.predict", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("flaxconv.predict", run_name="__main__")
    out, err = capsys.readouterr()
    return exit.value.code, out, err


def expected_line(path, logits, names=None):
    """The line the command should print for one file, from its logits."""
    probabilities = np.asarray(jax.nn.softmax(np.asarray(logits, np.float64)))
    top = np.argsort(-probabilities)[:3]
    return f"{path}: " + ", ".join(
        f"{names[c] if names else c} {100 * probabilities[c]:.1f}%" for c in top)


def test_top_classes_per_file_read_as_image_folder_reads_them(tmp_path, monkeypatch, capsys):
    state = states()["preset"]
    fc.save_model(state, tmp_path / "model", class_names=NAMES)
    Image.fromarray(IMAGES[0, :, :, 0]).save(tmp_path / "same.png")  # the model's size, gray
    # Another size and colour: an RGB JPEG 4x as large, converted and resized.
    big = np.kron(IMAGES[1, :, :, 0], np.ones((4, 3), np.uint8))
    (tmp_path / "folder" / "x").mkdir(parents=True)
    Image.fromarray(np.stack([big, big // 2, 255 - big], -1)).save(tmp_path / "folder/x/big.jpg")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    files = [tmp_path / "same.png", tmp_path / "bad.png", tmp_path / "folder/x/big.jpg",
             tmp_path / "missing.png"]
    status, out, err = run_cli(monkeypatch, capsys, "--model", tmp_path / "model", *files)
    assert status == 1  # some file failed; the others are still predicted
    converted, _ = fc.data.image_folder(tmp_path / "folder", image_size=(8, 8),
                                        color_mode="grayscale", shuffle=False).arrays()
    logits = fc.predict(state, np.concatenate([IMAGES[:1], converted]))
    assert out.splitlines() == [expected_line(files[0], logits[0], NAMES),
                                expected_line(files[2], logits[1], NAMES)]
    bad, missing = err.splitlines()  # Pillow's reason varies with its version
    assert re.fullmatch(rf"error: cannot decode image file {re.escape(str(files[1]))} \(\w+: "
                        r".+\); expected a valid JPEG, PNG, BMP or GIF image", bad)
    assert missing == f"error: image file {files[3]} does not exist"
    # Without recorded class names: class indices; --top beyond the classes: all of them.
    fc.save_model(states()["linen"], tmp_path / "unnamed")
    status, out, err = run_cli(monkeypatch, capsys, "--model", tmp_path / "unnamed", "--top",
                               "9", files[0])
    assert (status, err) == (0, "")
    assert re.fullmatch(rf"{files[0]}: (\d \d+\.\d%, ){{3}}\d \d+\.\d%\n", out)


def test_errors_are_one_line_and_a_non_zero_exit(tmp_path, monkeypatch, capsys):
    two_channels = trained(fc.models.get("dense", num_classes=CLASSES),
                           sample=np.zeros((1, 8, 8, 2), np.uint8))
    fc.save_model(two_channels, tmp_path / "two")
    Image.fromarray(IMAGES[0, :, :, 0]).save(tmp_path / "a.png")
    status, out, err = run_cli(monkeypatch, capsys, "--model", tmp_path / "two",
                               tmp_path / "a.png")
    assert (status, out) == (1, "")
    assert err == ("error: the model takes images of shape (8, 8, 2); image files are read as "
                   "(8, 8, 1), (8, 8, 3) or (8, 8, 4) (grayscale, rgb or rgba), so its channels "
                   "cannot come from a file\n")
    for model, message in ((tmp_path / "none", "no saved model at"),
                           (tmp_path, "no saved model at")):
        status, out, err = run_cli(monkeypatch, capsys, "--model", model, tmp_path / "a.png")
        assert status == 1 and err.startswith(f"error: {message} ") and err.count("\n") == 1


def test_importing_the_command_leaves_fc_predict_the_step():
    sys.modules.pop("flaxconv.predict", None)
    try:
        import flaxconv.predict  # noqa: F401 - the import is what is tested

        assert fc.predict is steps.predict
        assert fc.predict(states()["preset"], IMAGES[:2]).shape == (2, CLASSES)
    finally:  # runpy runs the command only if the module was never imported
        sys.modules.pop("flaxconv.predict", None)


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Models in and out: save, load, export, predict")
    return text[start:text.index("\n## ", start)]


def test_the_readme_snippets_run_as_written(tmp_path, monkeypatch, capsys):
    section = readme_section()
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    bash = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(python) == 2 and len(bash) == 1
    monkeypatch.chdir(tmp_path)
    # What the researcher's tour leaves behind: an MNIST-shaped state, images and labels.
    images = np.tile(IMAGES, (1, 4, 4, 1))[:, :28, :28]
    state = trained(fc.models.get("dlwp_mnist"), sample=images[:1])
    tour = {"jax": jax, "fc": fc, "state": state, "images": images, "labels": LABELS}
    exec(python[0], tour)
    assert tour["logits"].shape == (10, 10)
    served = {}
    exec(python[1], served)
    assert served["logits"].shape == (7, 10) and served["logits"].dtype == np.float32
    # The command, on what `make mnist` writes and two image files.
    fc.save_model(state, "runs/mnist_convnet/saved_model", class_names=[str(d) for d in range(10)])
    Image.fromarray(images[0, :, :, 0]).save("digit.png")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8) + 80).save("photo.jpg")
    command = shlex.split(bash[0].strip())
    assert command[:3] == ["python", "-m", "flaxconv.predict"]
    status, out, err = run_cli(monkeypatch, capsys, *command[3:])  # as `python -m` runs it
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["digit.png", "photo.jpg"]
    assert all(re.fullmatch(r"[^:]+: (\d \d+\.\d%, ){2}\d \d+\.\d%", line) for line in lines)
