"""Where the local cluster's binaries, caches and run state live, and which versions.

- Build cache (binaries, jars): `$FLEETWARD_CACHE` or `<repo>/.cache`, each entry
  keyed by its version (filled by hack/*.sh, see `make build`).
- Run state (certificates, kubeconfigs, data, logs): a state folder per cluster,
  `<repo>/.fleetward/<name>` by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


class MissingComponent(RuntimeError):
    """A binary or package the local cluster needs is not built/installed."""


@cache
def versions() -> dict[str, str]:
    out = {}
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("FLEETWARD_CACHE") or REPO / ".cache")


def state_root() -> Path:
    return Path(os.environ.get("FLEETWARD_STATE") or REPO / ".fleetward")


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path
    helm: Path
    kafka_libs: Path
    postgres_bin: Path
    prometheus: Path
    promtool: Path

    @property
    def bin_dirs(self) -> list[Path]:
        """Folders to put on PATH (kubectl, helm, kwok)."""
        return sorted({self.kubectl.parent, self.helm.parent, self.kwok.parent})


def _need(path: Path, what: str, how: str) -> Path:
    if not path.exists():
        raise MissingComponent(f"{what} not found at {path}; build it with `{how}` (or `make build`)")
    return path


def _postgres_bin() -> Path:
    base = Path("/usr/lib/postgresql")
    found = sorted(
        base.glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0
    )
    if not found:
        raise MissingComponent("PostgreSQL server not found under /usr/lib/postgresql; run `hack/install-debian.sh`")
    return found[-1].parent


def monitoring_crds() -> list[Path]:
    """The prometheus-operator CRDs (ServiceMonitor, PodMonitor, PrometheusRule) that
    hack/fetch-monitoring-crds.sh caches, for tests of the chart's monitoring objects."""
    v = versions()["PROMETHEUS_OPERATOR_VERSION"]
    folder = _need(
        cache_dir() / f"prometheus-operator-crds-v{v}", "prometheus-operator CRDs", "hack/fetch-monitoring-crds.sh"
    )
    return sorted(folder.glob("*.yaml"))


def gateway_binary() -> Path:
    """Where `make build` (hack/build-gateway.sh) puts the Rust gateway; may not exist yet."""
    return cache_dir() / "cargo-target" / "release" / "fleetward-gateway"


def binaries() -> Binaries:
    v, c = versions(), cache_dir()
    k8s = c / f"kubernetes-v{v['KUBERNETES_VERSION']}"
    go = "hack/build-go.sh"
    return Binaries(
        etcd=_need(c / f"etcd-v{v['ETCD_VERSION']}" / "etcd", "etcd", f"{go} etcd"),
        kube_apiserver=_need(k8s / "kube-apiserver", "kube-apiserver", f"{go} kubernetes"),
        kube_controller_manager=_need(k8s / "kube-controller-manager", "kube-controller-manager", f"{go} kubernetes"),
        kube_scheduler=_need(k8s / "kube-scheduler", "kube-scheduler", f"{go} kubernetes"),
        kubectl=_need(k8s / "kubectl", "kubectl", f"{go} kubernetes"),
        kwok=_need(c / f"kwok-v{v['KWOK_VERSION']}" / "kwok", "kwok", f"{go} kwok"),
        helm=_need(c / f"helm-v{v['HELM_VERSION']}" / "helm", "helm", f"{go} helm"),
        kafka_libs=_need(
            c / f"kafka-{v['KAFKA_SCALA_VERSION']}-{v['KAFKA_VERSION']}" / "libs", "Kafka jars", "hack/fetch-kafka.sh"
        ),
        postgres_bin=_postgres_bin(),
        prometheus=_need(Path("/usr/bin/prometheus"), "prometheus", "hack/install-debian.sh"),
        promtool=_need(Path("/usr/bin/promtool"), "promtool", "hack/install-debian.sh"),
    )
