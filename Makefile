# make demo: set up, start a host on a fresh SQLite store, drive a terminal through it, stop.
# make test: create .venv when missing, install acqhost with its test extras, then run
# ruff (lint + format check), mypy (strict on acqhost/), the import-linter contracts and pytest.
# Set ACQHOST_TEST_PG (a superuser libpq URL) to run the store tests on PostgreSQL too.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint typecheck imports pytest bench fuzz clean native

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check acqhost tests benchmarks simulators
	$(BIN)/ruff format --check acqhost tests benchmarks simulators

typecheck: $(STAMP)
	$(BIN)/mypy

# The layers of acqhost/ (import-linter contracts in pyproject.toml).
imports: $(STAMP)
	$(BIN)/lint-imports

pytest: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck imports pytest

# The hot modules compiled with mypyc beside their sources (needs a C compiler; `python -m
# acqhost.native clean` goes back to pure Python): see acqhost/native.py.
native: $(STAMP)
	$(BIN)/python -m acqhost.native build

demo: $(STAMP)
	$(BIN)/python -m simulators.demo .demo

# The performance page (benchmarks/README.md): every benchmark again, ~22 minutes with PG=URL
# (a PostgreSQL superuser URL), ~16 without; PAGE_FLAGS=--quick for a 3-minute smoke run.
.PHONY: bench-page
bench-page: $(STAMP)
	$(BIN)/python benchmarks/page.py $(if $(PG),--pg '$(PG)') $(PAGE_FLAGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/codec.py

# The long coverage-guided run (atheris, the `fuzz` extra): FUZZ_RUNS inputs through the
# framing, the codec and the host core; the corpus grows in .fuzz-corpus, a crash is written to
# fuzz-crash-<sha1> and stops the run.
FUZZ_RUNS ?= 1000000
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	mkdir -p .fuzz-corpus
	$(BIN)/python tests/fuzz_atheris.py -runs=$(FUZZ_RUNS) -max_len=4104 -print_final_stats=1 \
		-artifact_prefix=fuzz- .fuzz-corpus

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache .hypothesis .fuzz-corpus build
	find acqhost -name '*.so' -delete
