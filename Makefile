# banklora: the two commands.  make quickstart  |  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch from PyPI on Linux is a CUDA build (~5 GB). Where the machine's package sources offer
# the CPU-only build (e.g. with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), take
# it first: the same torch, 190 MB. Otherwise pyproject's range decides. Override with TORCH=.
TORCH ?= torch==2.13.0+cpu

# pip compiles the installed packages' bytecode on one core (30 s for banklora's); compileall on every core
# (20 s on 2 cores). Files written for newer Pythons (torch's py312 test helpers) fail and are skipped, as pip skips them.
COMPILE = $(BIN)/python -m compileall -qq -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true

.PHONY: quickstart test install clean

quickstart: $(VENV)/.installed
	$(BIN)/banklora quickstart

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

install: $(VENV)/.installed

# banklora itself; the tests' tools (pytest, the openai client, playwright, MLflow) only for make test
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "banklora needs Python 3.10 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH)" 2>/dev/null || echo "no $(TORCH) here; pip takes torch from pyproject's range"
	$(BIN)/python -m pip install --quiet --no-compile -e .
	$(COMPILE)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --no-compile -e ".[test]"
	$(COMPILE)
	touch $@

clean:
	rm -rf $(VENV) outputs .pytest_cache
