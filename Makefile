# The two commands of the quick start:  make mnist  and  make test.
# Both create .venv (once) with flaxconv and its dev extras.
# Another interpreter gets its own venv (command-line variables override these), e.g. as
# .ci/run does for Python 3.13:
#   make test PYTHON=python3.13 VENV=.venv313 ARGS="tests/test_steps.py"
PYTHON ?= python3
VENV := .venv
# Offline datasets: use ../shared/datasets when it sits beside the clone, else tfds downloads.
# A given folder is made absolute, so it means the same in every working directory.
FLAXCONV_DATA_DIR := $(abspath $(or $(FLAXCONV_DATA_DIR),$(wildcard ../shared/datasets)))
export FLAXCONV_DATA_DIR

.PHONY: setup mnist test lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $@

mnist: setup
	$(VENV)/bin/python experiments/mnist_convnet.py $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# The speed benchmark against Keras 3 (TF and JAX backends) and PyTorch (CPU build).
bench: setup
	$(VENV)/bin/python -m pip install -q -e ".[bench]"
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python benchmarks/mnist_speed.py $(ARGS)
