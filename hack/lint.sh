#!/usr/bin/env bash
# One lint for the whole tree: ruff (lint + format check) for Python, rustfmt and
# clippy (warnings are errors) for the gateway and the guardrail core. `make test` runs it first.
source "$(dirname "$0")/lib.sh"
cd "$REPO"
"$REPO/hack/bootstrap-python.sh"
step "ruff check"
.venv/bin/ruff check .
step "ruff format --check"
.venv/bin/ruff format --check .
if [[ -f gateway-rs/Cargo.toml ]]; then
  [[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH
  export CARGO_TARGET_DIR=$CACHE/cargo-target
  step "cargo fmt --check"
  (cd gateway-rs && cargo fmt --check)
  step "cargo clippy"
  (cd gateway-rs && cargo clippy --release --locked --all-targets --quiet -- -D warnings)
fi
if [[ -f agent-runtime/guardrail-core/Cargo.toml ]]; then
  [[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH
  export CARGO_TARGET_DIR=$CACHE/guardrail-core-target
  step "cargo fmt --check (guardrail-core)"
  (cd agent-runtime/guardrail-core && cargo fmt --check)
  step "cargo clippy (guardrail-core)"
  (cd agent-runtime/guardrail-core && cargo clippy --release --locked --all-targets --quiet -- -D warnings)
fi
