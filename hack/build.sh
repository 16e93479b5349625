#!/usr/bin/env bash
# Build or fetch everything the local cluster and the tests need, each step cached:
#   Debian packages (PostgreSQL, Prometheus), the Python environment (.venv),
#   etcd + Kubernetes + kwok + Helm from their Go modules, the Kafka jars, the
#   prometheus-operator CRDs (for the tests of the chart's monitoring objects), the Rust gateway
#   and the compiled guardrail core (a Python extension module, installed into .venv).
# Safe to re-run: finished steps are skipped. Set FLEETWARD_CACHE to move the cache.
source "$(dirname "$0")/lib.sh"
start=$SECONDS
"$REPO/hack/install-debian.sh"
"$REPO/hack/bootstrap-python.sh"
"$REPO/hack/build-go.sh"
"$REPO/hack/fetch-kafka.sh"
"$REPO/hack/fetch-monitoring-crds.sh"
"$REPO/hack/build-gateway.sh"
"$REPO/hack/build-guardrail-core.sh"
step "build complete in $((SECONDS - start)) s (cache: $CACHE)"
