# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing and installs the package with its extras first.
# On a CUDA machine: `make demo EXTRA=gpu`.

PYTHON ?= python3
EXTRA ?= cpu
# pytest workers (pytest-xdist): 2 halves the suite's time on 2 cores; each worker is one TensorFlow process.
# make slow's worksteal: a worker that runs out takes tests queued behind a long one on the other (with xdist's
# default `load`, tests queued behind the 15-minute accuracy run waited for it while the other worker idled).
TEST_WORKERS ?= 2
DIST := --dist worksteal
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install demo lint format test slow clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRA),dev]'
	touch $(STAMP)

install: $(STAMP)

# The installed command, on the digits sample that ships inside the package (`digits/0/0000.png`: one of its
# images; a path that exists in the working directory would win over the sample's name).
demo: $(STAMP)
	$(BIN)/kerastune-flow train cifar10_cnn --data digits --epochs 10 --run-dir runs/demo --overwrite
	$(BIN)/kerastune-flow evaluate runs/demo --data digits
	$(BIN)/kerastune-flow predict runs/demo digits/0/0000.png digits/4/0000.png digits/9/0000.png

# ruff (lint and format, configured in pyproject.toml): `make test` fails on a finding.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Rewrites the files: what `make lint` asks for, where ruff can do it.
format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The longer checks (-m slow): the real data sets, the accuracy of the recipes as typed, the process-level
# kills and the variants of what the default suite tests once. CI runs them after `make test`; the 25 slowest
# are listed at the end, so a CI log shows where its time went.
slow: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(DIST) -m slow --durations=25

clean:
	rm -rf runs .pytest_cache
