"""KillSwitches watched by the verifier itself: the kill switch's fast path (SPEC §7).

The operator withdraws a covered agent's key from the trust-bundle ConfigMap, but that is
one more API write after the switch was accepted, and on a loaded API server it took up to
0.8 s (docs/bench/killswitch.md). A verifier that also watches the KillSwitches refuses a
covered agent's keys as soon as the switch itself reaches it: the bundle entries carry the
agent (`<namespace>/<name>`) and its labels, which is all the switch's scope needs
(fleetward.api.scope, the operator's own rules).

This is an accelerator, never a new way to fail: the ConfigMap stays the record of which
keys are trusted. Until the KillSwitches have been listed, or once their watch has been
failing for longer than the bundle's `max_staleness` (so a release this verifier cannot
see would lock fresh keys out), no key is refused on the switches' account; the operator's
withdrawal still applies. RBAC: get/list/watch on killswitches.fleetward.dev (cluster
scope; without it the accelerator stays off and says so in the log and `status()`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fleetward.api.scope import covers, revokes
from fleetward.toolkit.jwks import TrustedKey
from fleetward.toolkit.sources import KubeWatchSource

log = logging.getLogger("fleetward.toolkit.killswitches")

GROUP, VERSION, PLURAL = "fleetward.dev", "v1alpha1", "killswitches"


def covering_switch(switches: Mapping[str, Mapping[str, Any]], key: TrustedKey) -> str | None:
    """The first (by name) engaged switch revoking credentials that covers the key's agent.
    A key bound to no agent (a hand-written bundle entry) is covered by every such switch:
    nothing says it is outside a scope, and a kill switch errs on the side of stopping."""
    for name in sorted(switches):
        switch = switches[name]
        if revokes(switch) and (key.namespace is None or covers(switch, key.namespace, key.labels)):
            return name
    return None


class KillSwitchSource(KubeWatchSource):
    """Lists, then watches every KillSwitch and hands the set to the bundle on each change."""

    thread_name = "kill-switch-watch"
    description = f"{PLURAL}.{GROUP}"

    def __init__(self, *, api_client: Any = None, watch_timeout: int = 60) -> None:
        super().__init__(api_client=api_client, watch_timeout=watch_timeout)
        self._switches: dict[str, dict[str, Any]] = {}

    def _connect(self, api_client: Any) -> None:
        from kubernetes import client

        self._objects = client.CustomObjectsApi(api_client)

    def _list_call(self, **kwargs: Any) -> Any:
        return self._objects.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)

    def _listed(self, items: list[dict[str, Any]]) -> None:
        self._switches = {i["metadata"]["name"]: i for i in items}
        self._push()

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self._switches.pop(name, None)
        else:
            self._switches[name] = obj
        self._push()

    def _push(self) -> None:
        assert self._bundle is not None
        self._bundle.set_kill_switches(dict(self._switches))

    def _up(self) -> None:
        assert self._bundle is not None
        self._bundle.kill_switch_source_up()

    def _down(self, error: str) -> None:
        assert self._bundle is not None
        self._bundle.kill_switch_source_down(error)

    def _hint(self, status: int | None) -> str:
        if status == 403:
            return (
                f" (grant this service account get, list and watch on {PLURAL}.{GROUP}: without it a kill "
                "switch reaches this verifier only through the trust bundle's update)"
            )
        if status == 404:
            return f" (no {PLURAL}.{GROUP} API: the Fleetward CRDs are not installed)"
        return ""
