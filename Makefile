# torchkeep developer targets. Every target creates .venv with pip when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-long lint format bench bench-remote bench-training fuzz clean

$(STAMP): pyproject.toml setup.py constraints.txt src/torchkeep/_streamcopy.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,interop,remote]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/basics.py
	$(PY) examples/demo.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples setup.py
	$(PY) -m ruff format --check src tests benchmarks examples setup.py

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks examples setup.py
	$(PY) -m ruff check --fix src tests benchmarks examples setup.py

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
	$(PY) benchmarks/training_overhead.py --plot docs/training_overhead.png

fuzz: $(STAMP)
	$(PY) tests/fuzz_campaign.py --seconds $${FUZZ_SECONDS:-300}
	$(PY) tests/fuzz_campaign.py --target scan --seconds $${FUZZ_SCAN_SECONDS:-60}

clean:
	rm -rf $(VENV) build dist src/*.egg-info
