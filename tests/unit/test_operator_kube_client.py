"""The operator's API client against an HTTP server that answers like an overloaded API
server: 429 (priority and fairness refused the request) is sent again after Retry-After,
any other error is not."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from fleetward.operator.kube import Kube, KubeError
from kubernetes import client as k8s_client


async def _serve(answers: list[int]) -> tuple[web.AppRunner, str, list[str]]:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.method)
        status = answers.pop(0) if answers else 200
        if status == 200:
            return web.json_response({"kind": "Secret", "metadata": {"name": "s"}})
        body = {"kind": "Status", "status": "Failure", "reason": "TooManyRequests", "message": "slow down"}
        return web.json_response(body, status=status, headers={"Retry-After": "0"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}", seen


async def _client(host: str) -> Kube:
    cfg = k8s_client.Configuration()
    cfg.host = host
    kube = Kube(cfg)
    kube._session = aiohttp.ClientSession(base_url=host + "/")
    return kube


def test_a_refused_request_is_sent_again_until_it_gets_through():
    async def scenario() -> None:
        runner, host, seen = await _serve([429, 429])
        kube = await _client(host)
        try:
            secret = await kube.get("Secret", "ns", "s")
            assert secret is not None and secret["metadata"]["name"] == "s"
            assert seen == ["GET", "GET", "GET"]
        finally:
            await kube.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_other_errors_are_not_retried():
    async def scenario() -> None:
        runner, host, seen = await _serve([500])
        kube = await _client(host)
        try:
            with pytest.raises(KubeError) as e:
                await kube.replace({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "n"}})
            assert e.value.status == 500 and seen == ["PUT"]
        finally:
            await kube.close()
            await runner.cleanup()

    asyncio.run(scenario())
