# Two commands do all set-up: `make run` (install into .venv + run the embedded pipeline) and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Pytest arguments for `make test` (e.g. make test PYTEST_ARGS="-m 'not slow'").
PYTEST_ARGS ?=

.PHONY: run test install bench ablation clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found (Python 3.11 is required)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# The DAG (dvc.yaml) with the venv first on PATH: DVC runs each stage as `noisyrollout <stage>`.
WITH_VENV := PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=1

run: $(STAMP)
	$(WITH_VENV) noisyrollout restore-data
	$(WITH_VENV) dvc repro
	$(WITH_VENV) noisyrollout plots
	$(WITH_VENV) noisyrollout summary

test: $(STAMP)
	$(WITH_VENV) python -m pytest $(PYTEST_ARGS)

# Performance benchmarks -> BENCHMARKS.md (needs `make run` first for the SFT model and prepared data; ~15 min).
# TRL (the comparison) is the optional `bench` extra, installed here only, never by `make run`.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -c constraints.txt -e ".[test,bench]"
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(WITH_VENV) python -m bench.run $(BENCH_ARGS)

# NoisyRollout vs vanilla GRPO: 5 arms x 3 seeds through `dvc exp run --queue` -> ABLATION.md (needs `make run` first;
# about an hour on 2 cores). ABLATION_ARGS e.g. "--seeds 1 --arms grpo,crop_fill" for a quick look.
ablation: $(STAMP)
	$(WITH_VENV) noisyrollout ablation $(ABLATION_ARGS)

clean:
	rm -rf runs reports
