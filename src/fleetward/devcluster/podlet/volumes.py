"""Pod volumes, materialised the way the kubelet does it.

ConfigMap, Secret, downward API and projected volumes are written with the kubelet's
atomic-writer layout, so a process sees either the old or the new content, never a mix:

    <volume>/..2026_11_22_10_00_00.123456/<files>   one folder per version
    <volume>/..data -> ..2026_11_22_10_00_00.123456 swapped with a rename(2)
    <volume>/<top-level name> -> ..data/<top-level name>

Like the kubelet, a Secret or ConfigMap deleted while the pod runs leaves the files
in place: deleting a Secret does not take a credential away from a running pod.

A persistentVolumeClaim volume is the folder of the hostPath PersistentVolume bound to
the claim (what the local provisioner makes, provisioner.py), mounted as it is: its
content outlives the pod.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException


class VolumeNotReady(Exception):
    """A referenced object is missing (the pod waits, as with the kubelet's FailedMount)."""


def write_atomic(target: Path, files: dict[str, bytes], modes: dict[str, int]) -> bool:
    """Make `target` hold exactly `files` (relative path -> bytes). Returns True if changed."""
    target.mkdir(parents=True, exist_ok=True)
    data_link = target / "..data"
    if data_link.is_symlink():
        current = target / os.readlink(data_link)
        if _same_content(current, files, modes):
            return False
    else:
        current = None
    stamp = dt.datetime.now(dt.UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
    version_dir = target / stamp
    version_dir.mkdir()
    for rel, content in files.items():
        path = version_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(modes.get(rel, 0o644))
    version_dir.chmod(0o755)
    tmp_link = target / "..data_tmp"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(stamp)
    os.replace(tmp_link, data_link)  # the atomic switch
    top_level = {rel.split("/", 1)[0] for rel in files}
    for name in top_level:
        link = target / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for entry in target.iterdir():  # names no longer present, and the old version
        if entry.name.startswith(".."):
            if entry.name not in ("..data", stamp) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_symlink() and entry.name not in top_level:
            entry.unlink()
    return True


def _same_content(directory: Path, files: dict[str, bytes], modes: dict[str, int]) -> bool:
    existing = {}
    for path in directory.rglob("*"):
        if path.is_file():
            existing[path.relative_to(directory).as_posix()] = path
    if set(existing) != set(files):
        return False
    for rel, path in existing.items():
        if path.read_bytes() != files[rel] or (path.stat().st_mode & 0o777) != modes.get(rel, 0o644):
            return False
    return True


@dataclass
class SourceContext:
    """What a volume source needs to resolve itself."""

    namespace: str
    pod: Any  # V1Pod
    get_configmap: Callable[[str, str], Any]
    get_secret: Callable[[str, str], Any]
    request_token: Callable[[Any, str, list[str] | None, int], tuple[str, dt.datetime]]
    field_value: Callable[[Any, str], str]
    get_claim: Callable[[str, str], Any]
    get_volume: Callable[[str], Any]


def _select(
    data: dict[str, bytes], items: list | None, default_mode: int | None, kind: str, name: str
) -> tuple[dict, dict]:
    files, modes = {}, {}
    mode = default_mode if default_mode is not None else 0o644
    if items:
        for item in items:
            if item.key not in data:
                raise VolumeNotReady(f"{kind} {name} has no key {item.key!r}")
            files[item.path] = data[item.key]
            modes[item.path] = item.mode if item.mode is not None else mode
    else:
        for key, value in data.items():
            files[key] = value
            modes[key] = mode
    return files, modes


def _configmap_files(ctx: SourceContext, src: Any, default_mode: int | None) -> tuple[dict, dict]:
    try:
        cm = ctx.get_configmap(ctx.namespace, src.name)
    except ApiException as e:
        if e.status == 404:
            if src.optional:
                return {}, {}
            raise VolumeNotReady(f'configmap "{src.name}" not found') from e
        raise
    data = {k: v.encode() for k, v in (cm.data or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (cm.binary_data or {}).items()})
    return _select(data, src.items, default_mode, "configmap", src.name)


def _secret_files(ctx: SourceContext, name: str, items, optional, default_mode: int | None) -> tuple[dict, dict]:
    try:
        secret = ctx.get_secret(ctx.namespace, name)
    except ApiException as e:
        if e.status == 404:
            if optional:
                return {}, {}
            raise VolumeNotReady(f'secret "{name}" not found') from e
        raise
    data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
    return _select(data, items, default_mode, "secret", name)


def _downward_files(ctx: SourceContext, items: list, default_mode: int | None) -> tuple[dict, dict]:
    files, modes = {}, {}
    for item in items or []:
        if item.field_ref is None:
            continue  # resourceFieldRef: not needed here
        files[item.path] = ctx.field_value(ctx.pod, item.field_ref.field_path).encode()
        modes[item.path] = item.mode if item.mode is not None else (default_mode or 0o644)
    return files, modes


class TokenCache:
    """Service-account tokens of projected volumes, renewed at 80% of their lifetime."""

    def __init__(self) -> None:
        self._tokens: dict[tuple, tuple[str, dt.datetime, dt.datetime]] = {}

    def get(self, ctx: SourceContext, sa: Any) -> str:
        audiences = [sa.audience] if sa.audience else None
        ttl = sa.expiration_seconds or 3607
        key = (ctx.pod.metadata.uid, sa.audience, ttl)
        now = dt.datetime.now(dt.UTC)
        cached = self._tokens.get(key)
        if cached and now < cached[2]:
            return cached[0]
        token, expires = ctx.request_token(ctx.pod, ctx.pod.spec.service_account_name or "default", audiences, ttl)
        refresh_at = now + (expires - now) * 0.8
        self._tokens[key] = (token, expires, refresh_at)
        return token

    def forget(self, pod_uid: str) -> None:
        for key in [k for k in self._tokens if k[0] == pod_uid]:
            del self._tokens[key]


def volume_files(ctx: SourceContext, volume: Any, tokens: TokenCache) -> tuple[dict, dict] | None:
    """Files of an atomic-writer volume, or None for a volume that is a plain folder."""
    if volume.config_map is not None:
        return _configmap_files(ctx, volume.config_map, volume.config_map.default_mode)
    if volume.secret is not None:
        s = volume.secret
        return _secret_files(ctx, s.secret_name, s.items, s.optional, s.default_mode)
    if volume.downward_api is not None:
        return _downward_files(ctx, volume.downward_api.items, volume.downward_api.default_mode)
    if volume.projected is not None:
        files: dict[str, bytes] = {}
        modes: dict[str, int] = {}
        default_mode = volume.projected.default_mode
        for source in volume.projected.sources or []:
            if source.config_map is not None:
                f, m = _configmap_files(ctx, source.config_map, default_mode)
            elif source.secret is not None:
                s = source.secret
                f, m = _secret_files(ctx, s.name, s.items, s.optional, default_mode)
            elif source.downward_api is not None:
                f, m = _downward_files(ctx, source.downward_api.items, default_mode)
            elif source.service_account_token is not None:
                sa = source.service_account_token
                f, m = {sa.path: tokens.get(ctx, sa).encode()}, {sa.path: default_mode or 0o644}
            else:
                continue
            files.update(f)
            modes.update(m)
        return files, modes
    return None


def claim_path(ctx: SourceContext, claim_name: str) -> Path:
    """The folder behind a persistentVolumeClaim volume: the hostPath of the volume bound
    to the claim. VolumeNotReady while the claim is missing, unbound or being deleted (the
    pod waits, as the kubelet's FailedMount does; the scheduler does not even place a pod
    whose claim is unbound, but a claim can go away in between)."""
    try:
        claim = ctx.get_claim(ctx.namespace, claim_name)
    except ApiException as e:
        if e.status == 404:
            raise VolumeNotReady(f'persistentvolumeclaim "{claim_name}" not found') from e
        raise
    if claim.metadata.deletion_timestamp is not None:
        raise VolumeNotReady(f'persistentvolumeclaim "{claim_name}" is being deleted')
    bound_to = claim.spec.volume_name
    if not bound_to or (claim.status and claim.status.phase) != "Bound":
        raise VolumeNotReady(f'persistentvolumeclaim "{claim_name}" is not bound to a volume yet')
    volume = ctx.get_volume(bound_to)
    if volume.spec.host_path is None:
        raise VolumeNotReady(
            f'persistentvolumeclaim "{claim_name}" is bound to persistentvolume "{bound_to}", which is not a '
            "hostPath volume: the podlet mounts only folders of this machine"
        )
    path = Path(volume.spec.host_path.path)
    if not path.is_dir():
        raise VolumeNotReady(f'persistentvolume "{bound_to}": folder {path} does not exist')
    return path


def unsupported(volume: Any) -> str | None:
    """Name of the volume type if the podlet cannot provide it."""
    for attr in (
        "config_map",
        "secret",
        "downward_api",
        "projected",
        "empty_dir",
        "host_path",
        "persistent_volume_claim",
    ):
        if getattr(volume, attr, None) is not None:
            return None
    kinds = [k for k, v in volume.to_dict().items() if v is not None and k != "name"]
    return kinds[0] if kinds else "unknown"
