# `make test` is the command CI and the README use: it builds .venv when missing,
# installs the project with its test extra, and runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run demo test install bench clean fuzz soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard collector/*.c)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The embedded default: the appliance on UDP 4789 (VXLAN) and 6081 (GENEVE), health and
# metrics on http://0.0.0.0:8080, data in ./data, knowing the AWS seed session. Ctrl-C stops it
# cleanly (every flow written).
run: $(STAMP)
	$(BIN)/collector serve --sessions fixtures/sessions/seed.json

# The appliance end to end in a few seconds: collector serve on loopback ports, two fixture
# captures replayed into it (sessions VNI 42/43 whole, VNI 44 cut to 64 bytes), flushed, the
# top talkers per session queried, a clean stop (collector/demo.py).
demo: $(STAMP)
	$(BIN)/python -m collector.demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Sustained load (docs/robustness.md): serve held SOAK_MINUTES (10) at SOAK_RATE datagrams/s
# (default: 80% of a zero-loss rate probed first) with 100,000 concurrent flows and churn, then
# reconciled: nothing lost, RSS flat, files as expected. Loopback only; not part of `make test`.
SOAK_MINUTES ?= 10
soak: $(STAMP)
	SOAK_MINUTES=$(SOAK_MINUTES) $(BIN)/python bench/soak.py

# Benchmarks are scripts that print numbers (see BENCHMARKS.md); not part of `make test`.
# The suite of issue 6 (ingest drain live replay flows growth; about 30 minutes), peers
# installed on demand; one part: `make bench PART=drain`.
PART ?=
bench: $(STAMP)
	$(BIN)/python bench/run.py $(PART)

# Coverage-guided fuzzing (atheris) of the decoders, capture readers, sessions and config
# loaders, FUZZ_SECONDS per target; failing inputs land in fuzz/crashes/ (docs/robustness.md).
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet 'atheris>=2.3'  # the `fuzz` extra of pyproject.toml
	$(BIN)/python fuzz/run.py --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
