# Every target sets up .venv itself, so a fresh checkout needs nothing else.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the exact torch first: it installs a CPU build from local disk; a range would fetch CUDA
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ps-sim run --workers 4 --shards 2 --task digits-mlp --consistency bsp --steps 300 --report runs/demo

# the suite minus the slow marker: under 15 minutes on 2 cores
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

# more crash points and comparisons; .ci/run runs these too
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --durations=10

lint: $(STAMP)
	$(BIN)/ruff check paramserver workers tests bench

# QUICK=1: the smoke version (about 2 minutes, results in bench/results/quick/, docs untouched)
bench: $(STAMP)
	$(BIN)/python -m bench.run $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) runs .pytest_cache
