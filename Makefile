# Two commands set up a fresh machine: `make demo` (install + the default job) and
# `make test` (install + lint + the test suite). Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; an unpinned `torch` pulls a multi-GB CUDA build. Elsewhere, e.g.
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0

.PHONY: demo test lint sweep clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,experiments,sweeps]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m lightning_lora.train

test: $(VENV)/.installed lint
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lightning_lora tests experiments
	$(VENV)/bin/ruff format --check lightning_lora tests experiments

clean:
	rm -rf $(VENV) outputs multirun
