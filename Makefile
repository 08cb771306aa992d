# `make run` and `make test` each do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build installs from a local file; any other spec pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/reptile-dist train --config sine --backend ray --workers 2 --mode sync --out runs/sine-$$(date +%Y%m%d-%H%M%S)

# Two pytest processes (pytest-xdist), each with its own local Ray cluster: most slow tests wait on
# Ray's start-up, not on a core. Each process starts on half the tests and takes over the
# other's when it runs out (worksteal), so a few long tests do not leave a core idle at the end.
TEST_PROCESSES ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist worksteal

# Everything but the tests marked slow (see pyproject.toml); `make test` (CI) runs those too.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist worksteal -m "not slow"

clean:
	rm -rf $(VENV) runs
