"""Every notebook in notebooks/ runs top to bottom and is stored without outputs.

The notebooks run with ``FLAXCONV_NOTEBOOK_SMALL=1`` (a few hundred training steps), in a
temporary working directory, reading MNIST from ``$FLAXCONV_DATA_DIR`` (their download cell
is skipped when it is set). The default run uses a kernel of this interpreter, where flaxconv
is installed already, and leaves out the cell tagged ``install``. The opt-in ``colab`` test
(``pytest -m colab``, a step of its own in ``.ci/run``) runs that cell too, in a fresh
Python 3.13 venv holding Colab's packages.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
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
    notebook.cells = [c for c in notebook.cells if "install" not in c.metadata.get("tags", [])]
    _execute(notebook, "python3", tmp_path)
    if path.name == "mnist_convnet.ipynb":
        _check_mnist_outputs(notebook)
        # No ipywidgets here: tqdm.auto falls back to the text bar, as on a terminal.
        assert "step/s" in _text(_fit_cell(notebook)), "no progress bar in the training cell"


def _execute(notebook, kernel_name: str, workdir: Path) -> None:
    client = NotebookClient(
        notebook, timeout=600, kernel_name=kernel_name,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure


def _text(*cells) -> str:
    """The stream text of the code cells among ``cells``."""
    return "\n".join(output.get("text", "") for cell in cells if cell.cell_type == "code"
                     for output in cell.outputs)


def _fit_cell(notebook):
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and "fc.fit(" in c.source]
    return cell


def _check_mnist_outputs(notebook) -> None:
    text = _text(*notebook.cells)
    accuracy = float(re.search(r"test accuracy (\d\.\d+) \(10000 images\)", text).group(1))
    assert accuracy > 0.9, text[-2000:]  # 200 steps of the textbook convnet
    assert "same predictions: True" in text
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "expected the digits, curves, feature maps and confusion plots"


def _repository_url() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["urls"]["Repository"]


def test_one_repository_url_for_badges_and_install():
    url = _repository_url()
    owner_name = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+)", url).group(1)
    notebook = nbformat.read(REPO / "notebooks" / "mnist_convnet.ipynb", as_version=4)
    badge = ("https://colab.research.google.com/github/"
             f"{owner_name}/blob/main/notebooks/mnist_convnet.ipynb")
    readme = (REPO / "README.md").read_text()
    for where, text in (("README.md", readme), ("the notebook", notebook.cells[0].source)):
        found = set(re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", text))
        assert found == {badge}, f"{where}: Colab badge {found}; pyproject.toml says {badge}"
    (install,) = [c for c in notebook.cells if "install" in c.metadata.get("tags", [])]
    default = re.search(r'FLAXCONV_PIP_SPEC", "([^"]+)"', install.source).group(1)
    assert default == f"git+{url}", f"notebook installs {default}; pyproject.toml says {url}"


# Colab's preinstalled packages (its published list, Aug 2026); all resolve on Python 3.13.
# ipywidgets: Colab has it, so tqdm.auto draws a widget there.
COLAB_PACKAGES = [
    "jax==0.7.2", "jaxlib==0.7.2", "flax==0.11.2", "orbax-checkpoint==0.12.4", "chex==0.1.90",
    "grain==0.2.18", "tensorflow-datasets==4.9.10", "ipykernel", "ipywidgets==7.7.1",
    "matplotlib", "numpy",
]


def _python313() -> str:
    """FLAXCONV_COLAB_PYTHON, else the newest pyenv 3.13.x, else python3.13 on PATH."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(glob.glob(f"{root}/versions/3.13.*/bin/python3.13"),
                   key=lambda p: [int(x) for x in re.findall(r"\d+", p.split("/versions/")[1])])
    for cand in [os.environ.get("FLAXCONV_COLAB_PYTHON"), *found[::-1], shutil.which("python3.13")]:
        if cand and os.path.exists(cand):
            return cand
    pytest.fail("the colab test needs Python 3.13: set FLAXCONV_COLAB_PYTHON or install it (pyenv)")


def _versions(python: Path, names) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; print(json.dumps("
            "{n: m.version(n) for n in sys.argv[1:]}))")
    # cwd: not the checkout, whose flaxconv/ would be importable from there
    out = subprocess.run([str(python), "-c", code, *names], check=True, capture_output=True,
                         text=True, cwd=python.parents[2]).stdout
    return json.loads(out)


@pytest.mark.colab
@pytest.mark.skipif(
    not (DATA_DIR and (Path(DATA_DIR) / "mnist").is_dir()),
    reason=f"{data.DATA_DIR_ENV} does not hold mnist/ (the notebook would download it)",
)
def test_notebook_installs_and_runs_in_a_colab_like_venv(tmp_path, monkeypatch):
    """Colab's Python and packages, no TensorFlow, no flaxconv: the install cell upgrades
    jax & co. in the running kernel, with no restart, and the notebook runs to the end."""
    started = time.monotonic()
    venv = tmp_path / "colab"
    subprocess.run([_python313(), "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", *COLAB_PACKAGES], check=True)
    before = _versions(python, ["jax", "flax"])
    assert before == {"jax": "0.7.2", "flax": "0.11.2"}, before
    probe = "import importlib.util as u; print(u.find_spec('tensorflow'), u.find_spec('flaxconv'))"
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.stdout.split() == ["None", "None"], out.stdout

    # The checkout's package, copied: pip builds a local directory in place (build/ and
    # *.egg-info beside pyproject.toml), which must not litter the working tree.
    source = tmp_path / "flaxconv-src"
    shutil.copytree(REPO / "flaxconv", source / "flaxconv",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)

    kernels = tmp_path / "jupyter"
    spec = {"argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "colab-like", "language": "python"}
    (kernels / "kernels" / "colab-like").mkdir(parents=True)
    (kernels / "kernels" / "colab-like" / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(kernels))
    monkeypatch.setenv("FLAXCONV_PIP_SPEC", str(source))
    monkeypatch.setenv("FLAXCONV_NOTEBOOK_SMALL", "1")
    venv_ready = time.monotonic()

    notebook = nbformat.read(REPO / "notebooks" / "mnist_convnet.ipynb", as_version=4)
    _execute(notebook, "colab-like", tmp_path)
    _check_mnist_outputs(notebook)
    after = _versions(python, ["jax", "flax", "flaxconv"])
    # The kernel imported the upgraded jax in the same session, with no restart.
    assert f"JAX {after['jax']} on" in _text(*notebook.cells), after
    assert after["jax"] != before["jax"], (before, after)
    widgets = [o for o in _fit_cell(notebook).outputs
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "tqdm.auto drew no widget progress bar in the training cell"
    print(f"colab-like venv: {venv_ready - started:.0f} s; notebook with its install: "
          f"{time.monotonic() - venv_ready:.0f} s; jax {before['jax']} -> {after['jax']}, "
          f"flax {before['flax']} -> {after['flax']}")
