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

# Two pytest processes (pytest-xdist), each with its own local Ray cluster; the slow tests keep both
# cores busy (README). Tests go to whichever process is free; those marked with one xdist_group
# (the two-node cluster's, the official Omniglot release's) stay together, so that what they set up
# (the cluster, the prepared release) is set up once.
TEST_PROCESSES ?= 2
PYTEST_PARALLEL := -n $(TEST_PROCESSES) --dist loadgroup

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_PARALLEL)

# Everything but the tests marked slow (see pyproject.toml); `make test` (CI) runs those too.
test-fast: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow"

clean:
	rm -rf $(VENV) runs
