#!/usr/bin/env bash
# Build the Rust WebSocket gateway (gateway-rs, binary `fleetward-gateway`, SPEC §5):
#   cargo build --release --locked, target dir $CACHE/cargo-target (CI keeps it between runs),
#   so the binary is $CACHE/cargo-target/release/fleetward-gateway.
# librdkafka is compiled from the rdkafka crate's bundled sources with Debian's cmake
# (Debian's librdkafka-dev 2.0 is older than the crate needs), against Debian's OpenSSL.
# Safe to re-run: Debian packages are installed only when missing and cargo rebuilds only
# what changed. Prints only progress (stderr); the build output goes to $CACHE/logs.
source "$(dirname "$0")/lib.sh"

RUST_MIN=1.88  # gateway-rs/Cargo.toml rust-version
# libcurl4-openssl-dev: only its header. librdkafka 2.12's rdkafka_conf.c includes <curl/curl.h>
# under `#ifdef WITH_OAUTHBEARER_OIDC`, which the cmake build always defines (to 0); nothing of
# curl is linked (the rdkafka `curl` feature stays off).
packages=(cmake make gcc g++ pkg-config libssl-dev zlib1g-dev libcurl4-openssl-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
  SUDO=(); [[ $(id -u) -eq 0 ]] || SUDO=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  run_step "apt-get update" "$CACHE/logs/apt-update.log" "${SUDO[@]}" apt-get update -q
  run_step "apt-get install ${missing[*]} (gateway build tools)" "$CACHE/logs/apt-install-gateway.log" \
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Rust comes from rustup, not Debian (bookworm's cargo is too old for the crates used).
[[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH
command -v cargo >/dev/null || die "cargo not found; install Rust >= $RUST_MIN (https://rustup.rs)"
have=$(rustc --version | awk '{print $2}')
[[ $(printf '%s\n%s\n' "$RUST_MIN" "$have" | sort -V | head -n1) == "$RUST_MIN" ]] \
  || die "rustc $have is older than $RUST_MIN; run: rustup update stable"

export CARGO_TARGET_DIR=$CACHE/cargo-target
bin=$CARGO_TARGET_DIR/release/fleetward-gateway
(cd "$REPO/gateway-rs" && run_step "build gateway (cargo build --release --locked; ~5-8 min cold on 2 cores)" \
  "$CACHE/logs/build-gateway.log" cargo build --release --locked)
[[ -x $bin ]] || die "cargo finished but $bin is missing"
note "gateway: $bin"
