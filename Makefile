# The README's two commands: `make quickstart` and `make test`. Each (re)creates the virtual
# environment when pyproject.toml changed, so both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= configs/quickstart.yaml

.PHONY: setup test quickstart bench bench-quality bench-speed clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest

quickstart: $(STAMP)
	$(BIN)/eftnas run $(RECIPE)

bench: bench-speed bench-quality

bench-speed: $(STAMP)
	$(BIN)/python scripts/bench_speed.py

bench-quality: $(STAMP)
	$(BIN)/python scripts/bench_quality.py

clean:
	rm -rf runs .pytest_cache
