#!/usr/bin/env bash
# The guardrail core's Rust unit tests (agent-runtime/guardrail-core). --release reuses the
# dependencies hack/build-guardrail-core.sh compiled. The differential test against the
# pure-Python engine is Python: tests/unit/test_guardrail_core.py (part of pytest).
source "$(dirname "$0")/lib.sh"
[[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH
export CARGO_TARGET_DIR=$CACHE/guardrail-core-target
step "cargo test (guardrail-core)"
cd "$REPO/agent-runtime/guardrail-core"
cargo test --release --locked
