# Everything runs on CPU; pass DEVICE=cuda to benchmarks on a GPU machine.
PY ?= python
DEVICE ?= auto

LATEST ?= build/venv-latest

.PHONY: install test test-fast test-latest constraints bench bench-solvers bench-pipeline bench-outliers bench-peers \
	bench-scale bench-distributed gpu-check bench-gguf

# The README's install: torch first (the CPU build), then everything at the versions of constraints.txt.
install:
	pip install torch==2.13.0 && pip install -c constraints.txt -e ".[dev]" && pip install --no-deps -r requirements-nodeps.txt

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

# The suite on whatever the registry serves today (no constraints), in a scratch venv: upstream drift shows here
# before users see it. Prints the installed versions that differ from constraints.txt first.
test-latest:
	rm -rf $(LATEST) && python3 -m venv $(LATEST)
	$(LATEST)/bin/pip install -q torch==2.13.0 && $(LATEST)/bin/pip install -q -e ".[dev]" && \
		$(LATEST)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	@echo "versions that differ from constraints.txt:"; \
		$(LATEST)/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -v -x -F -f constraints.txt || true
	$(LATEST)/bin/python -m pytest -q

# Rewrite constraints.txt from the current environment (after the suite passed in it), keeping its header.
constraints:
	{ grep '^#' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$$//'; } > constraints.tmp
	mv constraints.tmp constraints.txt

bench: bench-solvers bench-pipeline

bench-solvers:
	$(PY) scripts/bench_solvers.py

bench-pipeline:
	$(PY) scripts/bench_pipeline.py --device $(DEVICE)

# Outlier-aware QuantEase and FFSplit vs equal-bit uniform grids (README "Outliers and FFSplit"); BENCH_ARGS to
# reduce the protocol, e.g. BENCH_ARGS="--nsamples 16 --seqlen 512 --ppl-seqlen 512 --ppl-limit 8"
bench-outliers:
	$(PY) scripts/bench_outliers.py --device $(DEVICE) $(BENCH_ARGS)

# Our default next to llm-compressor's GPTQ on the same calibration windows and perplexity code (README "Against
# llm-compressor"); the peers' virtualenv is built once. BENCH_ARGS e.g. "--bits 3 --nsamples 64".
PEERS ?= build/venv-peers
$(PEERS)/bin/python:
	python3 -m venv $(PEERS)
	$(PEERS)/bin/pip install -q torch==2.13.0 && $(PEERS)/bin/pip install -q llmcompressor==0.14.0.1 torch==2.13.0

bench-peers: $(PEERS)/bin/python
	$(PY) scripts/bench_peers.py --venv $(PEERS) $(BENCH_ARGS)

# Llama-3-8B shapes truncated to a few blocks, W4 QuantEase, plan vs measured (README "Scale"); BENCH_ARGS to change
# the protocol, e.g. BENCH_ARGS="--blocks 3 --dtype float32"
bench-scale:
	$(PY) scripts/bench_scale.py --device $(DEVICE) $(BENCH_ARGS)

# One process x 2 threads vs torchrun 2 processes x 1 thread, default model W4 QuantEase at 16 x 2048 (README
# "Many GPUs and nodes"); BENCH_ARGS e.g. "--nproc 4 --threads 4 --predict 4,8"
bench-distributed:
	$(PY) scripts/bench_distributed.py $(BENCH_ARGS)

# The prepared GPU check (README "Scale"): at most 8 minutes on one H100/H200
gpu-check:
	bash scripts/gpu_check.sh

# GGUF exports of the default model read back by transformers' GGUF reader (README "GGUF"); BENCH_ARGS as above
bench-gguf:
	$(PY) scripts/bench_gguf.py $(BENCH_ARGS)
