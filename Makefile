# `make demo` and `make test` work from a clean clone: they create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,deploy,dali]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nestedtrain demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

test: $(STAMP)
	$(MAKE) lint
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) bench/bench_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
