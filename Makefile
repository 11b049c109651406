# scratchpath: every developer and CI command lives here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?=
OUT    ?= demo_output

.PHONY: venv demo test lint format bench clean

# The virtualenv is (re)built whenever pyproject.toml changes.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

## make demo [DATA=path/to/slides]: synthetic (or your) slides -> store -> pretrain -> export -> eval
demo: venv
	$(BIN)/scratchpath demo --out $(OUT) $(if $(DATA),--slides $(DATA),)

## make test: the whole test suite (what CI runs)
test: venv
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: venv
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: venv
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
