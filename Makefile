# One command each for a fresh machine: `make demo` runs the main job, `make test` the suite.
# Both create .venv on first use. Torch is installed first and pinned here (the CPU build on this
# project's machines); override for a GPU build, e.g. `make test TORCH_SPEC="torch"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install demo test lint train-factworld train-planted clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# the knowledge-neurons validation peer (dev extra) without its own dependencies
	$(PY) -m pip install -q --no-deps "knowledge-neurons==0.0.2"
	$(PY) -m pip install -q -e ".[dev,notebooks,ray]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m mechedit demo

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=25 -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(PY) -m ruff check mechedit tests bench

train-factworld: $(VENV)/.installed
	$(PY) -m mechedit.zoo train factworld

train-planted: $(VENV)/.installed
	$(PY) -m mechedit.zoo train factworld-planted

clean-venv:
	rm -rf $(VENV)
