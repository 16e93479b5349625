#!/usr/bin/env bash
# Install the Debian packages the local cluster runs: PostgreSQL and Prometheus
# (plus the tools the podlet uses: util-linux for unshare/mount, iproute2).
# Services are never started by the package: fleetward.devcluster starts its own
# instances on loopback with data under .fleetward/.
source "$(dirname "$0")/lib.sh"
packages=(postgresql prometheus util-linux iproute2 procps)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then note "debian packages installed (${packages[*]})"; exit 0; fi
command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
SUDO=(); [[ $(id -u) -eq 0 ]] || SUDO=(sudo)
# No init system here: keep maintainer scripts from starting the packaged services.
policy_added=
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
  "${SUDO[@]}" chmod +x /usr/sbin/policy-rc.d; policy_added=1
fi
export DEBIAN_FRONTEND=noninteractive
run_step "apt-get update" "$CACHE/logs/apt-update.log" "${SUDO[@]}" apt-get update -q
run_step "apt-get install ${missing[*]}" "$CACHE/logs/apt-install.log" \
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
[[ -n $policy_added ]] && "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d
exit 0
