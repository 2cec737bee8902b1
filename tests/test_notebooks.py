"""Every notebook in notebooks/ runs top to bottom and is stored without outputs.

The notebooks run with ``FLAXCONV_NOTEBOOK_SMALL=1`` (a few hundred training steps), in a
fresh Python kernel of this interpreter, in a temporary working directory, reading MNIST
from ``$FLAXCONV_DATA_DIR`` (their download cell is skipped when it is set).
"""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from flaxconv import data

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
DATA_DIR = os.environ.get(data.DATA_DIR_ENV)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks under {REPO / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        i for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: code cells {dirty} hold outputs; clear them before saving"
    assert "widgets" not in notebook.metadata, f"{path.name}: widget state is an output too"


@pytest.mark.skipif(
    not (DATA_DIR and (Path(DATA_DIR) / "mnist").is_dir()),
    reason=f"{data.DATA_DIR_ENV} does not hold mnist/ (the notebooks would download it)",
)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAXCONV_NOTEBOOK_SMALL", "1")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure
    text = "\n".join(
        output.get("text", "")
        for cell in notebook.cells if cell.cell_type == "code"
        for output in cell.outputs
    )
    if path.name == "mnist_convnet.ipynb":
        accuracy = float(re.search(r"test accuracy (\d\.\d+) \(10000 images\)", text).group(1))
        assert accuracy > 0.9, text[-2000:]  # 200 steps of the textbook convnet
        assert "same predictions: True" in text
        images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
                  if "image/png" in o.get("data", {})]
        assert len(images) >= 4, "expected the digits, curves, feature maps and confusion plots"
