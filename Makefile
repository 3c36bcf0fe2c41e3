# Everything runs on CPU; pass DEVICE=cuda to benchmarks on a GPU machine.
PY ?= python
DEVICE ?= auto

.PHONY: install test test-fast bench bench-solvers bench-pipeline bench-outliers

install:
	pip install torch==2.13.0 && pip install -e ".[dev]" && pip install --no-deps -r requirements-nodeps.txt

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

bench: bench-solvers bench-pipeline

bench-solvers:
	$(PY) scripts/bench_solvers.py

bench-pipeline:
	$(PY) scripts/bench_pipeline.py --device $(DEVICE)

# Outlier-aware QuantEase and FFSplit vs equal-bit uniform grids (README "Outliers and FFSplit"); BENCH_ARGS to
# reduce the protocol, e.g. BENCH_ARGS="--nsamples 16 --seqlen 512 --ppl-seqlen 512 --ppl-limit 8"
bench-outliers:
	$(PY) scripts/bench_outliers.py --device $(DEVICE) $(BENCH_ARGS)
