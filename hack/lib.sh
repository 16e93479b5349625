# Shared helpers for hack/*.sh. Source it; it sets REPO, CACHE and the versions.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The build cache: an ignored folder, every entry keyed by its version.
# FLEETWARD_CACHE moves it (CI points it at a folder that outlives the clone).
CACHE=${FLEETWARD_CACHE:-$REPO/.cache}
# shellcheck source=versions.env
source "$REPO/hack/versions.env"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
mkdir -p "$CACHE"

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
die()  { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

# run_step NAME LOGFILE CMD...: runs CMD with its output in LOGFILE, printing a
# heartbeat every 30 s so long builds show progress; on failure prints the log tail
# and names the step.
run_step() {
  local name=$1 log=$2; shift 2
  local start=$SECONDS
  step "$name"
  mkdir -p "$(dirname "$log")"
  "$@" >"$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    if (( (SECONDS - start) % 30 < 5 && SECONDS - start >= 30 )); then
      note "... still running ($((SECONDS - start)) s): $(tail -n 1 "$log" | cut -c1-100)"
    fi
  done
  if ! wait "$pid"; then
    tail -n 30 "$log" >&2
    die "step '$name' failed after $((SECONDS - start)) s; full log: $log"
  fi
  note "done in $((SECONDS - start)) s"
}
