# The commands of the README:
#   make demo   sets everything up and runs the controller on the example plugins
#   make test   sets everything up and runs lint, types, import contracts and all tests
#   make check  lint, types, import contracts and the unit tests: no engine, no images
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STEP := scripts/step.sh

.PHONY: demo test test-loaded check setup venv venv-dev venv-docs engines images lint typecheck imports unit integration docs crd manifests proto

demo: venv
	@$(STEP) engines bash scripts/engines.sh docker
	@$(STEP) images env PYTHON=$(BIN)/python bash images/build.sh
	$(BIN)/bhctl validate examples/plugins
	@bash scripts/demo.sh $(BIN)/bhctl

test: setup
	@$(STEP) lint $(MAKE) --no-print-directory lint
	@$(STEP) typecheck $(MAKE) --no-print-directory typecheck
	@$(STEP) imports $(MAKE) --no-print-directory imports
	@$(STEP) unit $(MAKE) --no-print-directory unit
	@$(STEP) integration $(MAKE) --no-print-directory integration

# The integration suite beside a CPU hog that keeps every core busy (scripts/loaded.sh).
test-loaded: setup
	@bash scripts/loaded.sh $(MAKE) --no-print-directory integration

check: venv-dev
	@$(STEP) helm bash scripts/helm.sh tools $(BIN)
	@$(STEP) lint $(MAKE) --no-print-directory lint
	@$(STEP) typecheck $(MAKE) --no-print-directory typecheck
	@$(STEP) imports $(MAKE) --no-print-directory imports
	@$(STEP) unit $(MAKE) --no-print-directory unit

setup: venv-dev
	@$(STEP) helm bash scripts/helm.sh tools $(BIN)
	@$(STEP) engines bash scripts/engines.sh docker podman prometheus browser netns
	@$(STEP) images bash images/build.sh

# The virtual environment with what a target needs: venv the controller and the SDK
# (make demo), venv-dev the development tools too (make test), venv-docs mkdocs (make docs).
venv: $(VENV)/.installed-base
venv-dev: $(VENV)/.installed-dev
venv-docs: $(VENV)/.installed-docs

$(VENV)/.installed-%: pyproject.toml sdk/pyproject.toml VERSION
	@$(STEP) venv-$* bash scripts/venv.sh "$(PYTHON)" "$(VENV)" $*
	@touch $@

engines:
	bash scripts/engines.sh docker podman prometheus browser netns

images: venv
	PYTHON=$(BIN)/python bash images/build.sh

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

imports:
	$(BIN)/lint-imports

unit:
	$(BIN)/pytest tests/unit examples

# Two groups side by side: the Kubernetes scenarios' files and the rest (scripts/integration.sh).
integration:
	BIN=$(BIN) bash scripts/integration.sh

# The docs site into site/, strict: a broken link or a missing page fails.
docs: venv-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

crd: venv
	$(BIN)/bhctl crd > charts/blackhole/files/crds/plugins.blackhole.dev.yaml
	$(BIN)/bhctl crd > deploy/kubernetes/crd-plugins.blackhole.dev.yaml

# The chart rendered as plain manifests (deploy/kubernetes/blackhole.yaml), after
# copying the alert rules and the dashboard into the chart.
manifests: venv
	BIN_DIR=$(BIN) bash scripts/helm.sh manifests

proto: venv-dev
	bash scripts/proto.sh $(BIN)/python
