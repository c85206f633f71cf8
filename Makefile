# infotrace: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
INDEX_ROOT ?= var/indexes

.PHONY: install run index-demo test lint typecheck bench-speed clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel of this release lies on this machine's disk (pip's find-links)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install infotrace with its test tools

index-demo: install  ## train (cached) the digits classifier and build its index under $(INDEX_ROOT)
	$(VENV)/bin/infotrace-index demo --index-root $(INDEX_ROOT)

run: index-demo  ## build the demo index if needed and serve the API on $(HOST):$(PORT)
	INFOTRACE_INDEX_ROOT=$(INDEX_ROOT) INFOTRACE_HOST=$(HOST) INFOTRACE_PORT=$(PORT) $(VENV)/bin/infotrace-serve run

lint: install
	$(VENV)/bin/ruff check indexer service tests benchmarks
	$(VENV)/bin/ruff format --check indexer service tests benchmarks

typecheck: install
	$(VENV)/bin/mypy

test: install lint typecheck  ## install what the tests need, lint, type-check and run the suite
	$(VENV)/bin/pytest -q

bench-speed: index-demo  ## indexing time, bytes per example, query latency (HTTP and in-process)
	$(PY) -m benchmarks.speed --index-root $(INDEX_ROOT) --out benchmarks/results/speed.json

clean:
	rm -rf $(VENV) var
