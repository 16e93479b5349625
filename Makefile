# Fleetward — the two commands that matter:
#   make up     build what is missing, start the local cluster, install Fleetward,
#               apply the GitHouse example; stays up until Ctrl-C
#   make test   build what is missing, run the whole test suite against real components
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: help build up test test-unit lint format bench crds crds-check dashboards clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

build: ## build/fetch everything (cached under .cache, keyed by version)
	@hack/build.sh

up: build ## run the product locally (Ctrl-C stops it)
	@$(VENV)/bin/fleetward dev up

test: build lint ## run lint, then all tests (Rust unit tests, then pytest: unit, local-cluster integration)
	@hack/test-gateway.sh
	@hack/test-guardrail-core.sh
	@$(PY) -m pytest $(PYTEST_ARGS)

lint: ## ruff (lint + format check) for Python; rustfmt + clippy for the gateway
	@hack/lint.sh

format: ## apply ruff format and rustfmt
	@$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix . && (cd gateway-rs && cargo fmt) && (cd agent-runtime/guardrail-core && cargo fmt)

bench: build ## slow benchmarks (kwok floor, 1000 Agents, guardrail scan, gateway vs Centrifuge, runtime floor and overhead, kill switch); results in docs/bench/
	@$(PY) bench/kwok_floor.py --deployments 1000 --nodes 10 --runs 1 --stay 30 --write
	@$(PY) bench/operator_scale.py --agents 1000 --nodes 12
	@$(PY) bench/guardrail_bench.py
	@$(PY) bench/gateway_bench.py --write
	@$(PY) bench/runtime_floor.py
	@$(PY) bench/runtime_overhead.py
	@$(PY) bench/killswitch_bench.py

test-unit: ## run only the tests that need no cluster
	@hack/bootstrap-python.sh && hack/build-guardrail-core.sh && hack/build-go.sh helm argocd-health && $(PY) -m pytest -m "not cluster" $(PYTEST_ARGS)

crds: ## regenerate crds/ from the typed API
	@$(VENV)/bin/fleetward crds generate

crds-check: ## fail if crds/ is stale
	@$(VENV)/bin/fleetward crds generate --check

dashboards: ## regenerate the Grafana dashboards (charts/fleetward/monitoring/dashboards) from hack/dashboards.py
	@$(PY) hack/dashboards.py

clean: ## remove run state (.fleetward); keeps the build cache
	rm -rf .fleetward
