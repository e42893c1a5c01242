# `make test` is the command CI and the README use: it builds .venv when missing,
# installs the project with its test extra, and runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The embedded default: the AWS seed session (VNI 7159709, PacketLength 25) as an appliance
# captured it, decoded with its session map. `collector serve` takes this place when it lands.
run: $(STAMP)
	$(BIN)/collector decode fixtures/seed-session.pcap --sessions fixtures/sessions/seed.json

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
