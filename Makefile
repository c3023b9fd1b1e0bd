# Fresh clone -> `make demo` (set-up + the main job) and `make test` (lint + tests). Both reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint benchmark check-wheel browser clean

setup: $(STAMP)

# torch/torchvision are pinned to the builds this machine serves (a CPU-only torch plus PyPI torchvision
# does not import here); everything else comes from pyproject.toml.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m lightning_deconv.paper.cli demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

benchmark: setup
	$(PY) scripts/benchmark.py

# Debian's Chromium for the Deconv tab's browser test (it skips, saying why, where Chromium is missing).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# The wheel, in a clean venv: lean install, the callback fires with either Lightning flavour alone, and the
# `paper` extra runs the demo from outside the clone.
check-wheel: setup
	PYTHON=$(PY) bash scripts/check_wheel.sh

clean:
	rm -rf runs figure*.png settling.png
