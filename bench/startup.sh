#!/usr/bin/env bash
# Measure how long `make up` takes to be ready, and to stop after Ctrl-C.
#   bench/startup.sh          with the caches as they are (normally: all cached)
#   bench/startup.sh --cold   with empty Go, pip, Maven and Fleetward caches in a temp
#                             folder (Debian packages stay installed): the first run
#                             on a fresh machine
# Prints one JSON object (also appended to docs/bench/startup.jsonl).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
mode=warm
if [[ ${1:-} == --cold ]]; then
  mode=cold
  tmp=$(mktemp -d /tmp/fleetward-cold.XXXXXX)
  export GOCACHE=$tmp/go-build GOMODCACHE=$tmp/gomod PIP_CACHE_DIR=$tmp/pip \
         MAVEN_OPTS="-Dmaven.repo.local=$tmp/m2" FLEETWARD_CACHE=$tmp/fleetward
  rm -rf "$REPO/.venv"
fi
log=$(mktemp /tmp/fleetward-up.XXXXXX.log)
cd "$REPO"
start=$(date +%s.%N)
# setsid: its own process group, so the SIGINT below reaches make and fleetward like Ctrl-C does
setsid make up >"$log" 2>&1 &
pid=$!
build_done=
until grep -q "Press Ctrl-C" "$log"; do
  [[ -z $build_done ]] && grep -q "starting control plane" "$log" && build_done=$(date +%s.%N)
  kill -0 "$pid" 2>/dev/null || { echo "make up exited early; log: $log" >&2; tail -20 "$log" >&2; exit 1; }
  sleep 0.1
done
ready=$(date +%s.%N)
kill -INT -- "-$pid"
wait "$pid" && rc=0 || rc=$?
stopped=$(date +%s.%N)
cluster_line=$(grep -o "Fleetward local cluster is up ([^)]*)" "$log")
json=$(python3 - "$mode" "$start" "${build_done:-$start}" "$ready" "$stopped" "$rc" "$cluster_line" <<'PY'
import json, sys, datetime
mode, start, build, ready, stopped, rc, line = sys.argv[1:]
start, build, ready, stopped = map(float, (start, build, ready, stopped))
print(json.dumps({"date": datetime.date.today().isoformat(), "mode": mode,
                  "build_seconds": round(build - start, 1), "ready_seconds": round(ready - start, 1),
                  "cluster_start_seconds": round(ready - build, 1), "stop_seconds": round(stopped - ready, 1),
                  "make_exit_code": int(rc), "components": line}))
PY
)
mkdir -p "$REPO/docs/bench"
echo "$json" | tee -a "$REPO/docs/bench/startup.jsonl"
if [[ -n ${tmp:-} ]]; then rm -rf "$tmp"; fi
