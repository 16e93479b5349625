"""Container environment: env, envFrom, downward API fields, `$(VAR)` expansion."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException


class EnvError(Exception):
    """The environment cannot be built yet (the kubelet's CreateContainerConfigError)."""


_FIELD_INDEX = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z0-9]+)\)")


def field_value(pod: Any, path: str) -> str:
    """Value of a downward-API fieldRef path."""
    m = _FIELD_INDEX.match(path)
    if m:
        source = pod.metadata.labels if m.group(1) == "labels" else pod.metadata.annotations
        return (source or {}).get(m.group(2), "")
    simple = {
        "metadata.name": lambda: pod.metadata.name,
        "metadata.namespace": lambda: pod.metadata.namespace,
        "metadata.uid": lambda: pod.metadata.uid,
        "metadata.labels": lambda: "\n".join(f'{k}="{v}"' for k, v in sorted((pod.metadata.labels or {}).items())),
        "metadata.annotations": lambda: "\n".join(
            f'{k}="{v}"' for k, v in sorted((pod.metadata.annotations or {}).items())
        ),
        "spec.nodeName": lambda: pod.spec.node_name,
        "spec.serviceAccountName": lambda: pod.spec.service_account_name,
        "status.hostIP": lambda: pod.status.host_ip if pod.status else "",
        "status.podIP": lambda: pod.status.pod_ip if pod.status else "",
        "status.podIPs": lambda: ",".join(i.ip for i in (pod.status.pod_ips or [])) if pod.status else "",
    }
    if path not in simple:
        raise EnvError(f"unsupported fieldRef {path!r}")
    return simple[path]() or ""


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known vars are replaced, `$$` escapes, unknown refs stay."""

    def repl(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(repl, value)


def _key(getter: Callable[[str, str], Any], namespace: str, ref: Any, kind: str, decode: bool) -> str | None:
    try:
        obj = getter(namespace, ref.name)
    except ApiException as e:
        if e.status == 404:
            if ref.optional:
                return None
            raise EnvError(f'{kind} "{ref.name}" not found') from e
        raise
    data = obj.data or {}
    if ref.key not in data:
        if ref.optional:
            return None
        raise EnvError(f"couldn't find key {ref.key} in {kind} {namespace}/{ref.name}")
    return base64.b64decode(data[ref.key]).decode(errors="replace") if decode else data[ref.key]


def container_env(
    pod: Any,
    container: Any,
    base: dict[str, str],
    get_configmap: Callable[[str, str], Any],
    get_secret: Callable[[str, str], Any],
) -> dict[str, str]:
    ns = pod.metadata.namespace
    env = dict(base)
    for source in container.env_from or []:
        prefix = source.prefix or ""
        if source.config_map_ref is not None:
            ref, getter, kind, decode = source.config_map_ref, get_configmap, "configmap", False
        elif source.secret_ref is not None:
            ref, getter, kind, decode = source.secret_ref, get_secret, "secret", True
        else:
            continue
        try:
            obj = getter(ns, ref.name)
        except ApiException as e:
            if e.status == 404 and ref.optional:
                continue
            if e.status == 404:
                raise EnvError(f'{kind} "{ref.name}" not found') from e
            raise
        for k, v in (obj.data or {}).items():
            env[prefix + k] = base64.b64decode(v).decode(errors="replace") if decode else v
    for var in container.env or []:
        if var.value_from is None:
            env[var.name] = expand(var.value or "", env)
            continue
        vf = var.value_from
        value: str | None
        if vf.field_ref is not None:
            value = field_value(pod, vf.field_ref.field_path)
        elif vf.secret_key_ref is not None:
            value = _key(get_secret, ns, vf.secret_key_ref, "secret", decode=True)
        elif vf.config_map_key_ref is not None:
            value = _key(get_configmap, ns, vf.config_map_key_ref, "configmap", decode=False)
        elif vf.resource_field_ref is not None:
            value = _resource_value(container, vf.resource_field_ref.resource)
        else:
            raise EnvError(f"env {var.name}: unsupported valueFrom")
        if value is not None:
            env[var.name] = value
    return env


def _resource_value(container: Any, resource: str) -> str:
    kind, _, name = resource.partition(".")
    res = container.resources
    values = (getattr(res, kind, None) or {}) if res else {}
    return str(values.get(name, "0"))
