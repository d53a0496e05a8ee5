# Fresh machine: `make demo` or `make test` set everything up first (uv + .venv, idempotent).
# CPU-only machines can skip the multi-GB CUDA torch download: `make setup TORCH=cpu`.

PYTHON_VERSION ?= 3.11
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= pypi
TORCH_PINS := torch==2.13.0 torchvision==0.28.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# uv from PATH, else the copy `pip install uv` puts next to python3 (`python3 -m uv`).
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
STAMP := $(VENV)/.acfrec-installed

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install uv
	@test -x $(BIN)/python || $(UV) venv $(VENV) --python $(PYTHON_VERSION)
ifeq ($(TORCH),cpu)
	$(UV) pip install --python $(BIN)/python $(TORCH_PINS) --index-url $(TORCH_CPU_INDEX)
endif
	$(UV) pip install --python $(BIN)/python -e '.[dev]'
	@touch $@

demo: setup
	$(BIN)/acfrec demo

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_ml100k.py

lint: setup
	$(BIN)/ruff check acfrec tests benchmarks

clean:
	rm -rf acfrec-demo build dist *.egg-info .pytest_cache .ruff_cache
