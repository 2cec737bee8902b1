"""Test-session setup shared by every test file."""

import os

# Tests start subprocesses in other working directories (tmp_path): a relative
# FLAXCONV_DATA_DIR such as ../shared/datasets must name the same folder there.
if os.environ.get("FLAXCONV_DATA_DIR"):
    os.environ["FLAXCONV_DATA_DIR"] = os.path.abspath(os.environ["FLAXCONV_DATA_DIR"])

# The experiments' CLI keeps compiled programs in a persistent cache
# (flaxconv.experiment.use_compilation_cache); tests run without it, so each compiles as
# a fresh install would.
os.environ.setdefault("FLAXCONV_COMPILATION_CACHE", "0")
