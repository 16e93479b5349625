#!/usr/bin/env bash
# Build the compiled guardrail core (agent-runtime/guardrail-core, Python module
# fleetward_guardrail_core) as an abi3 wheel with maturin and install it into .venv.
# Cached: the wheel is kept under $CACHE/guardrail-core/<hash of the crate sources>/, so an
# unchanged crate is only (re)installed, never rebuilt; cargo's target dir is
# $CACHE/guardrail-core-target (apart from the gateway's: the two builds never share locks).
# Cold build ~1-2 min on 2 cores (pyo3 and the bundled PCRE2 C sources; see the crate README).
source "$(dirname "$0")/lib.sh"

MATURIN_VERSION=1.16.0
crate=$REPO/agent-runtime/guardrail-core
venv=$REPO/.venv
[[ -x $venv/bin/python ]] || die ".venv is missing; run hack/bootstrap-python.sh first"
[[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH
command -v cargo >/dev/null || die "cargo not found; install Rust >= 1.88 (https://rustup.rs)"

key=$(cd "$crate" && { cat Cargo.toml Cargo.lock .cargo/config.toml; find src -type f -name '*.rs' | LC_ALL=C sort | xargs cat; \
  echo "maturin $MATURIN_VERSION $(rustc --version)"; } | sha256sum | cut -c1-16)
wheel_dir=$CACHE/guardrail-core/$key
stamp=$venv/.guardrail-core-installed
if [[ -f $stamp && $(cat "$stamp") == "$key" ]] && "$venv/bin/python" -c 'import fleetward_guardrail_core' 2>/dev/null; then
  note "guardrail core up to date ($key)"
  exit 0
fi

if ! compgen -G "$wheel_dir/*.whl" >/dev/null; then
  # maturin is a build tool only: its own venv in the cache, not a project dependency.
  tools=$CACHE/tools/maturin-$MATURIN_VERSION
  if [[ ! -x $tools/bin/maturin ]]; then
    run_step "install maturin $MATURIN_VERSION (build tool)" "$CACHE/logs/maturin-install.log" \
      bash -c "python3 -m venv '$tools' && '$tools/bin/pip' install --disable-pip-version-check -q maturin==$MATURIN_VERSION"
  fi
  export CARGO_TARGET_DIR=$CACHE/guardrail-core-target
  rm -rf "$wheel_dir.tmp"
  (cd "$crate" && run_step "build guardrail core (maturin, release, abi3; ~1-2 min cold)" \
    "$CACHE/logs/build-guardrail-core.log" \
    "$tools/bin/maturin" build --release --locked --features extension-module \
      --interpreter "$venv/bin/python" --out "$wheel_dir.tmp")
  rm -rf "$wheel_dir" && mv "$wheel_dir.tmp" "$wheel_dir"
fi
wheel=$(compgen -G "$wheel_dir/*.whl" | head -n1)
run_step "install guardrail core into .venv" "$CACHE/logs/install-guardrail-core.log" \
  "$venv/bin/pip" install --disable-pip-version-check --no-deps --force-reinstall "$wheel"
echo "$key" > "$stamp"
note "guardrail core: $(basename "$wheel")"
