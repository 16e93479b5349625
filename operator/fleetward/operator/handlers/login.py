"""How Kopf reaches the API server: its own credentials discovery (kubeconfig or service
account, `kopf.login_via_client`), with a bounded pool of connections.

Kopf's built-in session has no connection limit: with 1000 Agents created at once its
workers patched them (finalizers, handled-state annotations) over ~100 TLS connections at
the same time. Each costs the operator a 256 KiB asyncio TLS buffer plus its OpenSSL state
(about 26 MiB of the peak in bench/operator_scale.py), and the API server a handshake.
Bounded, the patches wait for a connection instead (64 + the watch streams by default;
the time to 1000 Agents Ready did not change, docs/bench/operator.md). The pool leaves
room for Kopf's long-lived watch streams, one per watched kind and namespace, so a watch
never waits behind patches."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import kopf
from fleetward.operator.settings import OperatorSettings

# Kinds Kopf watches: Agents, SOPs, Guardrails, Deployments, KillSwitches, the peering
# object, and a few spare (CRD and namespace observation).
WATCHED_KINDS = 8


def kopf_connection_limit(settings: OperatorSettings) -> int:
    streams = WATCHED_KINDS * max(1, len(settings.watch_namespaces))
    return settings.api_connections + streams


def register(settings: OperatorSettings) -> None:
    limit = kopf_connection_limit(settings)

    @kopf.on.login(id="bounded_session")
    async def bounded_session(
        logger: logging.Logger | logging.LoggerAdapter, **kwargs: Any
    ) -> kopf.AiohttpSession | None:
        info = kopf.login_via_client(logger=logger, **kwargs)
        if info is None:
            return None
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, ssl=info.as_ssl_context()),
            headers=info.as_http_headers(),
            proxy=info.proxy_url,
            trust_env=bool(info.trust_env),
        )
        return kopf.AiohttpSession(
            aiohttp_session=session,
            server=info.server,
            default_namespace=info.default_namespace,
            priority=info.priority,
            expiration=info.expiration,
        )
