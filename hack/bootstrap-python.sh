#!/usr/bin/env bash
# Create .venv and install Fleetward (editable) with its pinned dependencies.
# Idempotent: re-installs only when pyproject.toml or requirements.lock changed.
source "$(dirname "$0")/lib.sh"
VENV=$REPO/.venv
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null ||
  die "Python 3.11 is required (found: $("$PY" --version 2>&1))"

stamp=$VENV/.installed
want=$( { cat "$REPO/pyproject.toml"; cat "$REPO/requirements.lock" 2>/dev/null || true; } | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  note "python environment up to date (.venv)"
  exit 0
fi
[[ -x $VENV/bin/python ]] || run_step "create .venv" "$CACHE/logs/venv.log" "$PY" -m venv "$VENV"
constraints=()
[[ -f $REPO/requirements.lock ]] && constraints=(-c "$REPO/requirements.lock")
run_step "pip install fleetward and pinned dependencies" "$CACHE/logs/pip.log" \
  "$VENV/bin/pip" install --disable-pip-version-check -e "$REPO[test]" "${constraints[@]}"
echo "$want" > "$stamp"
