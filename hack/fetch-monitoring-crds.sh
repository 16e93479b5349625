#!/usr/bin/env bash
# The prometheus-operator CRDs (ServiceMonitor, PodMonitor, PrometheusRule), taken from its Go
# module on the module proxy and cached by version. The local cluster has no
# prometheus-operator; the tests install these CRDs so that the API server itself validates
# the chart's monitoring objects (tests/integration/test_chart_monitoring_install.py).
source "$(dirname "$0")/lib.sh"
v=$PROMETHEUS_OPERATOR_VERSION
out=$CACHE/prometheus-operator-crds-v$v
[[ -f $out/.complete ]] && { note "prometheus-operator CRDs v$v cached"; exit 0; }
command -v go >/dev/null || die "Go is not installed (needed to fetch the prometheus-operator CRDs)"
step "fetch prometheus-operator v$v CRDs (Go module proxy)"
# Outside any module: a plain download into the module cache.
info=$(cd "$(mktemp -d)" && go mod download -json "github.com/prometheus-operator/prometheus-operator@v$v") ||
  die "go mod download of prometheus-operator v$v failed"
read -r dir sum < <(python3 -c 'import json, sys; m = json.load(sys.stdin); print(m["Dir"], m["Sum"])' <<<"$info")
[[ $sum == "$PROMETHEUS_OPERATOR_SUM" ]] || die "prometheus-operator v$v: module hash $sum, expected $PROMETHEUS_OPERATOR_SUM"
mkdir -p "$out"
for kind in servicemonitors podmonitors prometheusrules; do
  cp "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$out/"
done
chmod u+w "$out"/*.yaml
touch "$out/.complete"
note "copied to $out"
