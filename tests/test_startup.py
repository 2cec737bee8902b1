"""The main job's startup stays cheap (issue 16, item 5; measured by benchmarks/startup.py).

What is asserted here is what makes it cheap: importing flaxconv imports none of the heavy
optional libraries, and with the IDX files under ``$FLAXCONV_DATA_DIR`` the default
(``source="auto"``) dataset read takes them directly instead of importing TensorFlow.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxconv import data

DATA_DIR = os.environ.get(data.DATA_DIR_ENV)
HEAVY = ("tensorflow", "tensorflow_datasets", "keras", "matplotlib")


@pytest.mark.skipif(
    not (DATA_DIR and (Path(DATA_DIR) / "mnist").is_dir()),
    reason=f"{data.DATA_DIR_ENV} does not hold mnist/",
)
def test_import_and_default_load_import_no_heavy_library():
    code = (
        "import json, sys\n"
        "import flaxconv as fc\n"
        f"after_import = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "images, labels = fc.data.load('mnist', 'test')\n"
        f"after_load = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps([after_import, after_load, list(images.shape)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    after_import, after_load, shape = json.loads(out.splitlines()[-1])
    assert after_import == [], f"import flaxconv imported {after_import}"
    assert after_load == [], f"fc.data.load('mnist', 'test') imported {after_load}"
    assert shape == [10000, 28, 28, 1]


@pytest.mark.skipif(
    not (DATA_DIR and (Path(DATA_DIR) / "mnist").is_dir()),
    reason=f"{data.DATA_DIR_ENV} does not hold mnist/",
)
def test_auto_source_reads_the_idx_files_when_they_are_there():
    images, labels = data.load("mnist", "test")
    raw_images, raw_labels = data.load("mnist", "test", source="raw")
    np.testing.assert_array_equal(images, raw_images)  # the IDX files' order, not tfds's
    np.testing.assert_array_equal(labels, raw_labels)


def test_the_experiments_keep_compiled_programs_between_runs(tmp_path):
    """A run of the CLI turns on JAX's persistent cache (every program, however quick to
    compile), in $JAX_COMPILATION_CACHE_DIR; FLAXCONV_COMPILATION_CACHE=0 leaves it off."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from flaxconv import experiment\n"
        "print(experiment.use_compilation_cache())\n"
        "jax.jit(lambda x: x * 2 + 1)(jnp.arange(3.0)).block_until_ready()\n"
    )
    home = tmp_path / "home"

    def cli_run(**extra):
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env.update(HOME=str(home), **extra)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    default = home / ".cache" / "flaxconv" / "jax"
    assert cli_run(FLAXCONV_COMPILATION_CACHE="0") == "None" and not default.exists()
    assert cli_run(FLAXCONV_COMPILATION_CACHE="1") == str(default)
    assert any(default.iterdir())  # the program above, although it compiles in milliseconds
    chosen = tmp_path / "chosen"
    assert cli_run(FLAXCONV_COMPILATION_CACHE="1", JAX_COMPILATION_CACHE_DIR=str(chosen)) == str(
        chosen)
