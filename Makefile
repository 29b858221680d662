# Everything bootstraps .venv by itself on a fresh machine.
# torch==2.13.0 is installed FIRST: on this machine pip takes a CPU build from local
# disk, while an unpinned torch (or the package's own range) would pull a CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRAS := dev,bench,serve,ray,onnx
STAMP  := $(VENV)/.installed-$(EXTRAS)

.PHONY: help venv serve test check format demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

venv: $(STAMP)  ## create .venv with torch 2.13.0 (CPU) and every extra the tests need

serve: $(STAMP)  ## the main job: the sentiment service on http://127.0.0.1:8000 (embedded model)
	$(PY) -m gradfence serve

test: $(STAMP)  ## run the whole test suite
	$(PY) -m pytest

check: $(STAMP)  ## ruff (lint + format check) and mypy --strict on src/
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts
	$(VENV)/bin/ruff format src tests benchmarks scripts

demo: $(STAMP)  ## a short demonstration of gf.inference on a small model
	$(PY) -m gradfence demo

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
