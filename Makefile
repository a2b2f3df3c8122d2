# torchkeep developer targets. Every target creates .venv with pip when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-long lint typecheck docs dist format bench bench-remote bench-training fuzz clean

$(STAMP): pyproject.toml setup.py constraints.txt src/torchkeep/_streamcopy.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,interop,remote,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/basics.py
	$(PY) examples/demo.py

LINT_PATHS := src tests benchmarks examples setup.py docs/hooks

# ruff, mypy (config in pyproject.toml: all of src/, strict on the public API) and the docs
# site built with --strict (a broken link or an undocumented public object fails).
lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site-check  # no --quiet: it hides the warnings --strict fails on

typecheck: $(STAMP)
	$(PY) -m mypy

# The documentation site, into site/ (open site/index.html).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# Wheel and sdist into dist/. CC=false builds a wheel without the optional C extension (what a
# machine without a compiler gets): `make dist CC=false`.
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .

format: $(STAMP)
	$(PY) -m ruff format $(LINT_PATHS)
	$(PY) -m ruff check --fix $(LINT_PATHS)

test: lint
	$(PY) -m pytest -q -m "not long" -p no:cacheprovider

test-long: $(STAMP)
	TORCHKEEP_LONG=1 $(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/run.py --plot docs/perf.png
	$(PY) benchmarks/remote.py --size-mb 256 --reps 2
	$(MAKE) bench-training

bench-remote: $(STAMP)
	$(PY) benchmarks/remote.py --size-mb 256 --reps 2

# Training-loop overhead of checkpointing every 10 steps (docs/performance.md, issue 23).
bench-training: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/training_overhead.py --reps 21 --plot docs/training_overhead.png

fuzz: $(STAMP)
	$(PY) tests/fuzz_campaign.py --seconds $${FUZZ_SECONDS:-300}
	$(PY) tests/fuzz_campaign.py --target scan --seconds $${FUZZ_SCAN_SECONDS:-60}

clean:
	rm -rf $(VENV) build dist site src/*.egg-info
