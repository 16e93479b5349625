#!/usr/bin/env bash
# The gateway's Rust tests (unit + shared envelope fixtures). --release reuses the
# dependencies `make build` compiled, so this only builds the test harnesses.
source "$(dirname "$0")/lib.sh"
[[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH
export CARGO_TARGET_DIR=$CACHE/cargo-target
step "cargo test (gateway-rs)"
cd "$REPO/gateway-rs"
cargo test --release --locked
