"""The README's API tour runs as written: its ```python blocks, one after another, in one
namespace, on the real MNIST (a 2,048-image slice of each split, and four batches of each
streamed epoch, so that its fits take seconds)."""

import itertools
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flaxconv as fc

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("FLAXCONV_DATA_DIR")
EXAMPLES = 2048

# What the tour leaves to the reader, set up before the block that needs it.
BEFORE = {
    # The fine-tuning block starts from the DLWP preset (layers conv_0 ... conv_2).
    "fc.checkpoint.restore_params(": (
        "state = fc.create_train_state(jax.random.key(0), fc.models.get('dlwp_mnist'), tx, "
        "images[:1])\n"
    ),
}


def tour_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def make_the_readers_files(images: np.ndarray, labels: np.ndarray) -> None:
    """An image folder ``Train/<class>/``, an image ``x.jpg`` and the main job's run
    ``runs/mnist_convnet`` (a fit of the preset with a workdir), in the current folder."""
    for i in range(200):
        folder = Path("Train") / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, :, :, 0]).save(folder / f"{i}.png")
    Image.fromarray(images[0, :, :, 0]).convert("RGB").save("x.jpg")
    import jax

    state = fc.create_train_state(jax.random.key(0), fc.models.get("dlwp_mnist"),
                                  fc.optim.make("rmsprop", learning_rate=1e-3), images[:1])
    fc.fit(state, (images[:256], labels[:256]), epochs=1, verbose="silent",
           workdir="runs/mnist_convnet")


@pytest.mark.skipif(not DATA_DIR, reason="FLAXCONV_DATA_DIR is not set")
def test_the_readme_tour_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = tour_blocks()
    assert len(blocks) >= 8, "the README's API tour is gone"
    load, stream = fc.data.load, fc.data.stream
    monkeypatch.setattr(fc.data, "load",
                        lambda *a, **k: tuple(x[:EXAMPLES] for x in load(*a, **k)))
    monkeypatch.setattr(fc.data, "stream",
                        lambda *a, **k: itertools.islice(stream(*a, **k), 4))
    monkeypatch.chdir(tmp_path)
    test_images, test_labels = fc.data.load("mnist", "test")
    make_the_readers_files(*fc.data.load("mnist", "train"))

    namespace = {"test_images": test_images, "test_labels": test_labels}
    for block in blocks:
        for marker, setup in BEFORE.items():
            if marker in block:
                block = setup + block
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the tour itself

    assert "Total params" in capsys.readouterr().out  # print(fc.summary(state))
    assert namespace["logits"].shape == (7, 10)  # the exported model, served without flaxconv
    assert Path("runs/x/checkpoints").is_dir() and Path("maps.png").is_file()
