# The two set-up commands of the README. Both create .venv when it is missing and refresh it
# when pyproject.toml changes; torch is installed first and pinned, because a looser
# requirement would pull a multi-GB CUDA build (the CPU wheel is the one on disk here).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TINY_SPEC := specs/tiny-cpu.toml

.PHONY: run test lint venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The main job on the tiny CPU default: validate the spec, compile it into an artifact
# directory (build/tiny: policy.json, spec.lock.json, report.md, plots, manifest.json), show
# the compiled policy, then run it: 4 worker processes (gloo) serve the spec's 64-request
# workload in real time, and the measured latencies, SLO attainment, batches per degree of
# parallelism (prefill and decode), KV bytes migrated and the elastic timeline
# (build/tiny/run/timeline_0.png) come out.
TINY_ARTIFACT := build/tiny

run: venv
	$(BIN)/espc check $(TINY_SPEC)
	$(BIN)/espc compile $(TINY_SPEC) -o $(TINY_ARTIFACT) --search-seconds 5
	$(BIN)/espc inspect $(TINY_ARTIFACT)
	$(BIN)/espc run $(TINY_ARTIFACT) --plot $(TINY_ARTIFACT)/run

test: venv
	$(BIN)/python -m pytest -q

# Lint and import order (ruff), type hints in basic mode (mypy): settings in pyproject.toml.
lint: venv
	$(BIN)/ruff check espc tests benchmarks
	$(BIN)/mypy
