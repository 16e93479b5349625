"""Installing Fleetward into the local cluster the way a platform team would: `helm
upgrade --install` of charts/fleetward. The operator then runs as a pod on the podlet
(the podlet runs the chart's `fleetward operator run` command as a local process).

Used by `fleetward dev up` and by the tests, so both exercise the real chart.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from kubernetes import client

from fleetward.devcluster.layout import REPO, gateway_binary
from fleetward.devcluster.process import ComponentFailed, free_port

CHART = REPO / "charts" / "fleetward"
NAMESPACE = "fleetward-system"
RELEASE = "fleetward"


def local_values(kafka_bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Values for the local cluster: Kafka on loopback; images are ignored by the podlet."""
    port = free_port()
    values: dict[str, Any] = {
        "kafka": {"bootstrapServers": kafka_bootstrap},
        # No Service networking: the API server calls the webhook on loopback, where every
        # operator replica listens (SO_REUSEPORT); the chart's certificate names 127.0.0.1.
        "webhook": {"url": f"https://127.0.0.1:{port}", "listenAddress": "127.0.0.1", "port": port},
        # The podlet runs host commands: the gateway binary `make build` produced.
        "gateway": {"command": [str(gateway_binary())]},
        # Quick drift checks keep the tests short; production keeps the chart's default.
        "operator": {"resyncSeconds": 60},
        # The GitHouse example's scripted model, priced like a small hosted one, so that the
        # spend panels of the dashboards and the cost alert have something to show locally.
        "modelPrices": {"githouse-scripted": {"inputPerMillionTokens": 0.15, "outputPerMillionTokens": 0.6}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


# The chart's PostgreSQL (values `postgresql`) as the podlet runs it: the image's entrypoint
# does not exist here, so the pod's command does what it does with the Debian server: create
# the database on first start (as the `postgres` user when the podlet runs as root, which
# PostgreSQL requires), then run the server on 127.0.0.1 (the DSN's host: no Service
# networking here) and the pod's IP (the readiness probe's).
LOCAL_POSTGRESQL_SCRIPT = r"""
set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
as_pg=""
mkdir -p "$PGDATA"
if [ "$(id -u)" = 0 ]; then
  chown -R postgres:postgres "$(dirname "$PGDATA")"
  as_pg="setpriv --reuid=postgres --regid=postgres --init-groups"
fi
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  if [ -n "$as_pg" ]; then chown postgres "$pwfile"; fi
  $as_pg "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" --auth=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8
  rm -f "$pwfile"
  echo "CREATE DATABASE \"$POSTGRES_DB\"" | $as_pg "$bin/postgres" --single -D "$PGDATA" postgres >/dev/null
fi
exec $as_pg "$bin/postgres" -D "$PGDATA" -p "$PGPORT" -c "listen_addresses=127.0.0.1,$POD_IP" \
  -c unix_socket_directories=
"""


def local_postgresql() -> dict[str, Any]:
    """Values that turn on the chart's PostgreSQL in the local cluster (on a free port)."""
    return {
        "enabled": True,
        "command": ["sh", "-c", LOCAL_POSTGRESQL_SCRIPT],
        "host": "127.0.0.1",
        "port": free_port(),
        "storage": {"size": "1Gi"},
    }


def helm_install(
    helm: Path,
    kubeconfig: Path,
    values: dict[str, Any],
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    timeout: float = 180,
) -> None:
    """`helm upgrade --install` the chart; raises ComponentFailed with helm's output."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(values, f)
    cmd = [
        str(helm),
        "upgrade",
        "--install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--create-namespace",
        f"--kubeconfig={kubeconfig}",
        "--values",
        f.name,
        "--timeout",
        f"{int(timeout)}s",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
    Path(f.name).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise ComponentFailed(f"helm install of {CHART} failed ({proc.returncode}):\n{proc.stderr or proc.stdout}")


def helm_uninstall(helm: Path, kubeconfig: Path, *, release: str = RELEASE, namespace: str = NAMESPACE) -> None:
    subprocess.run(
        [
            str(helm),
            "uninstall",
            release,
            "--namespace",
            namespace,
            f"--kubeconfig={kubeconfig}",
            "--wait",
            "--timeout",
            "120s",
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )


def wait_operator_ready(
    api: client.ApiClient,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    timeout: float = 120,
    log_dir: Path | None = None,
) -> list[str]:
    """Wait until every operator pod is Ready; returns their names. On timeout the error
    carries the pods' state and, when log_dir is given, the tail of their logs."""
    core = client.CoreV1Api(api)
    apps = client.AppsV1Api(api)
    deadline = time.monotonic() + timeout
    name = f"{release}-operator"
    while True:
        dep = apps.read_namespaced_deployment(name, namespace)
        want = dep.spec.replicas or 0
        pods = core.list_namespaced_pod(
            namespace, label_selector=f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
        ).items
        ready = [
            p.metadata.name
            for p in pods
            if p.metadata.deletion_timestamp is None
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]
        if len(ready) >= want and (dep.status.updated_replicas or 0) >= want:
            return ready
        if time.monotonic() > deadline:
            detail = "\n".join(
                f"  {p.metadata.name}: {p.status.phase} {[(c.type, c.status) for c in p.status.conditions or []]}"
                for p in pods
            )
            tails = ""
            if log_dir is not None:
                for log in sorted(log_dir.glob(f"{namespace}_{name}-*/operator/*.log"))[-2:]:
                    tails += f"\n--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise ComponentFailed(
                f"the Fleetward operator did not become Ready within {timeout:.0f} s:\n{detail}{tails}"
            )
        time.sleep(0.5)
