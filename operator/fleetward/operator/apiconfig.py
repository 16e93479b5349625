"""Where the operator's API connections go and how they authenticate: the pod's service
account in a cluster, else a kubeconfig.

Own code rather than `kubernetes.config`: the operator talks to the API server with its own
aiohttp client (kube.py) and Kopf logs in by itself, so the kubernetes package was imported
only to read these few fields, and importing it costs ~30 MB of resident memory per
operator (Kopf imports it too when it can; main.py keeps it out). The issue's memory target
is 300 MB at 1000 Agents (docs/bench/operator.md).

Supported (what kubeconfigs written by clusters and `kubectl config` use): the current
context (or a named one), `server`, `certificate-authority[-data]`,
`insecure-skip-tls-verify`, `client-certificate[-data]` / `client-key[-data]`, `token`,
`tokenFile`. Exec and auth-provider plugins are not: the operator runs in a pod with its
service account, and a developer's kubeconfig for the local cluster uses certificates.
"""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_SECONDS = 60.0
"""Projected service-account tokens are rotated by the kubelet: read the file again this often."""


class ApiConfigError(RuntimeError):
    """No usable API configuration; the message says what is missing and where."""


@dataclass
class ApiConfig:
    host: str
    ca_file: str | None = None
    ca_data: str | None = None
    """PEM text of the CA (from certificate-authority-data)."""
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    token: str | None = None
    token_file: str | None = None
    _token_read_at: float = field(default=0.0, repr=False)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        if not self.verify:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        return ctx

    def bearer_token(self) -> str | None:
        """The token to send, re-read from `token_file` at most every minute."""
        if self.token_file and (self.token is None or time.monotonic() - self._token_read_at > TOKEN_REREAD_SECONDS):
            try:
                self.token = Path(self.token_file).read_text().strip()
                self._token_read_at = time.monotonic()
            except OSError as e:
                if self.token is None:
                    raise ApiConfigError(f"cannot read the API token file {self.token_file}: {e.strerror}") from e
        return self.token


def load(kubeconfig: str | None = None, *, context: str | None = None) -> ApiConfig:
    """`kubeconfig` when given; else the pod's service account when running in a pod; else
    $KUBECONFIG (its first file) or ~/.kube/config."""
    if kubeconfig:
        return from_kubeconfig(kubeconfig, context=context)
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (SERVICE_ACCOUNT_DIR / "token").exists():
        return in_cluster()
    path = (os.environ.get("KUBECONFIG") or "").split(os.pathsep)[0] or str(Path.home() / ".kube" / "config")
    return from_kubeconfig(path, context=context)


def in_cluster(directory: Path = SERVICE_ACCOUNT_DIR) -> ApiConfig:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ApiConfigError("KUBERNETES_SERVICE_HOST is not set: not running in a pod")
    if ":" in host:  # IPv6
        host = f"[{host}]"
    ca = directory / "ca.crt"
    config = ApiConfig(
        host=f"https://{host}:{port}",
        ca_file=str(ca) if ca.exists() else None,
        token_file=str(directory / "token"),
    )
    config.bearer_token()  # fails here, with the path, rather than at the first request
    return config


def _named(items: list[dict[str, Any]] | None, name: str, what: str, path: str) -> dict[str, Any]:
    for item in items or []:
        if item.get("name") == name:
            return item.get(what) or {}
    raise ApiConfigError(f"{path}: no {what} named {name!r}")


def _relative(value: str | None, base: Path) -> str | None:
    """kubeconfig file paths are relative to the kubeconfig's directory."""
    if not value:
        return None
    return str(base / value) if not os.path.isabs(value) else value


def _data_file(data: str, suffix: str) -> str:
    """client-certificate-data / client-key-data as a private file (ssl loads a chain only
    from files), removed when the process exits."""
    directory = _private_dir()
    fd, path = tempfile.mkstemp(suffix=suffix, dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(data))
    return path


_PRIVATE_DIR: str | None = None


def _private_dir() -> str:
    global _PRIVATE_DIR
    if _PRIVATE_DIR is None:
        _PRIVATE_DIR = tempfile.mkdtemp(prefix="fleetward-apiconfig-")  # mode 0700
        atexit.register(shutil.rmtree, _PRIVATE_DIR, True)
    return _PRIVATE_DIR


def from_kubeconfig(path: str, *, context: str | None = None) -> ApiConfig:
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ApiConfigError(f"cannot read kubeconfig {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ApiConfigError(f"kubeconfig {path} is not YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ApiConfigError(f"kubeconfig {path} is not a kubeconfig (expected a mapping)")
    name = context or doc.get("current-context")
    if not name:
        raise ApiConfigError(f"{path}: no current-context (pass a context)")
    ctx = _named(doc.get("contexts"), name, "context", path)
    cluster = _named(doc.get("clusters"), ctx.get("cluster", ""), "cluster", path)
    user = _named(doc.get("users"), ctx.get("user", ""), "user", path) if ctx.get("user") else {}
    if not cluster.get("server"):
        raise ApiConfigError(f"{path}: cluster {ctx.get('cluster')!r} has no server")
    unsupported = sorted({"exec", "auth-provider"} & set(user))
    if unsupported:
        raise ApiConfigError(
            f"{path}: user {ctx.get('user')!r} uses {', '.join(unsupported)}, which the operator does not "
            "support; use a client certificate or a token (in a pod, its service account is used)"
        )
    base = Path(path).resolve().parent
    ca_data = cluster.get("certificate-authority-data")
    config = ApiConfig(
        host=cluster["server"].rstrip("/"),
        ca_file=_relative(cluster.get("certificate-authority"), base),
        ca_data=base64.b64decode(ca_data).decode() if ca_data else None,
        verify=not cluster.get("insecure-skip-tls-verify", False),
        token=user.get("token"),
        token_file=_relative(user.get("tokenFile"), base),
    )
    cert, key = user.get("client-certificate-data"), user.get("client-key-data")
    config.cert_file = _data_file(cert, ".crt") if cert else _relative(user.get("client-certificate"), base)
    config.key_file = _data_file(key, ".key") if key else _relative(user.get("client-key"), base)
    return config
