# The project's verbs. Every target that runs code depends on `install`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install run test lint bench demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: install
	$(BIN)/warmer run

# Two runs of parallel workers (pytest-xdist), a test file to a worker: the broker tests
# mostly wait. The reliability and replica tests time failovers and stalls, so they get
# two workers, the rest four; all together about 6 minutes on two cores.
test: install
	$(BIN)/pytest -q -n 4 --dist loadfile tests/unit tests/integration
	$(BIN)/pytest -q -n 2 --dist loadfile tests/reliability tests/replicas

lint: install
	$(BIN)/ruff check warmer tests bench
	$(BIN)/ruff format --check warmer tests bench
	$(BIN)/mypy --strict warmer
	$(BIN)/mypy --strict --explicit-package-bases tests bench

demo: install
	$(BIN)/warmer demo

# Every benchmark module, a table at the end (about 12 minutes: `python -m bench --list`).
# make bench BENCH_ARGS="--markdown /tmp/bench.md" also writes the machine and the table.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
