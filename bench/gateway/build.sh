#!/usr/bin/env bash
# Build the gateway benchmark's Go programs (centrifuge-anchor, loadgen) into the build cache,
# keyed by a hash of this module's sources, go.mod/go.sum and the Go version, so a re-run with
# nothing changed builds nothing. Prints the folder holding both binaries on stdout.
#   bench/gateway/build.sh      (called by bench/gateway_bench.py)
source "$(dirname "$0")/../../hack/lib.sh"
export GOFLAGS=-mod=readonly  # the versions pinned in go.mod/go.sum, never updated by a build
MODULE="$REPO/bench/gateway"
command -v go >/dev/null || die "go not found; install Go >= 1.26 (the module proxy must be reachable)"
key=$( (cd "$MODULE" && go version && cat go.mod go.sum && find . -name '*.go' -print0 | sort -z | xargs -0 cat) \
  | sha256sum | cut -c1-16)
out="$CACHE/gwbench/$key"
if [[ ! -x $out/centrifuge-anchor || ! -x $out/loadgen ]]; then
  mkdir -p "$out.tmp"
  (cd "$MODULE" && run_step "build gateway benchmark (centrifuge-anchor, loadgen)" "$CACHE/logs/build-gwbench.log" \
    go build -trimpath -o "$out.tmp/" ./centrifuge-anchor ./loadgen)
  rm -rf "$out" && mv "$out.tmp" "$out"
fi
echo "$out"
