"""The GitHouse tool service over real HTTP (aiohttp test server on loopback): token checks,
idempotency, domain rules, metrics, and that it serves exactly what the example's agents list."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetward.toolkit import ToolTokenVerifier, TrustBundle, jwks_document, mint_tool_token, public_jwk
from fleetward.toolkit.examples.githouse.app import create_app
from fleetward.toolkit.examples.githouse.backend import TOOLS

REPO = Path(__file__).resolve().parents[2]
BILLING, ACCOUNT = "githouse/billing", "githouse/account-security"


class Agents:
    def __init__(self) -> None:
        self.keys = {BILLING: Ed25519PrivateKey.generate(), ACCOUNT: Ed25519PrivateKey.generate()}
        self.kids = {BILLING: "billing-1", ACCOUNT: "account-1"}

    def jwks(self, *agents: str) -> str:
        return jwks_document([public_jwk(self.keys[a].public_key(), self.kids[a], a) for a in agents])

    def headers(
        self, agent: str, tool: str, run_id: str = "run-1", key: str | None = None, with_header: bool = True
    ) -> dict[str, str]:
        key = key or uuid.uuid4().hex
        token = mint_tool_token(self.keys[agent], self.kids[agent], agent, tool, run_id, key)
        out = {"Authorization": f"Bearer {token}", "traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"}
        if with_header:
            out["Idempotency-Key"] = key
        return out


Scenario = Callable[[TestClient, Agents, TrustBundle], Awaitable[None]]


def run(scenario: Scenario) -> None:
    agents = Agents()
    bundle = TrustBundle.from_jwks(agents.jwks(BILLING, ACCOUNT))

    async def main() -> None:
        app = create_app(bundle, ToolTokenVerifier(bundle))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await scenario(client, agents, bundle)

    asyncio.run(main())


async def post(client: TestClient, tool: str, args: Any, headers: dict[str, str]) -> tuple[int, Any, Any]:
    resp = await client.post(f"/tools/{tool}", json=args, headers=headers)
    return resp.status, await resp.json(), resp.headers


def test_calls_without_a_valid_token_are_refused_with_a_reason():
    async def scenario(client, agents, bundle):
        status, body, headers = await post(client, "verify_transaction", {"account": "jdoe"}, {})
        assert (status, body["reason"]) == (401, "missing_token")
        assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
        status, body, _ = await post(client, "verify_transaction", {}, {"Authorization": "Bearer abc.def.ghi"})
        assert (status, body["reason"]) == (401, "malformed")
        # a token for verify_transaction used on issue_refund
        status, body, _ = await post(
            client,
            "issue_refund",
            {"transaction_id": "txn_1002", "amount_cents": 1},
            agents.headers(BILLING, "verify_transaction", with_header=False),
        )
        assert (status, body["reason"]) == (403, "wrong_audience")
        # the same token twice
        headers = agents.headers(BILLING, "verify_transaction")
        args = {"account": "jdoe", "transaction_id": "txn_1002"}
        assert (await post(client, "verify_transaction", args, headers))[0] == 200
        status, body, _ = await post(client, "verify_transaction", args, headers)
        assert (status, body["reason"]) == (401, "replayed")
        assert (await client.get("/_effects")).status == 200 and await (await client.get("/_effects")).json() == []

    run(scenario)


def test_two_calls_with_one_idempotency_key_apply_the_refund_once():
    async def scenario(client, agents, bundle):
        args = {"account": "jdoe", "transaction_id": "txn_1002"}
        status, body, _ = await post(client, "verify_transaction", args, agents.headers(BILLING, "verify_transaction"))
        assert status == 200 and body["verified"] is True and body["amountCents"] == 2100
        refund = {"transaction_id": "txn_1002", "amount_cents": 2100}
        # a retry mints a new token (new jti) under the same idempotency key
        first = await post(client, "issue_refund", refund, agents.headers(BILLING, "issue_refund", key="refund-1"))
        second = await post(client, "issue_refund", refund, agents.headers(BILLING, "issue_refund", key="refund-1"))
        assert first[0] == second[0] == 200 and first[1] == second[1]
        assert first[1]["status"] == "succeeded" and second[2]["Idempotent-Replayed"] == "true"
        effects = await (await client.get("/_effects")).json()
        assert [(e["tool"], e["idempotencyKey"], e["agent"]) for e in effects] == [
            ("issue_refund", "refund-1", BILLING)
        ]
        # same key, other arguments: conflict; nothing applied
        status, body, _ = await post(
            client,
            "issue_refund",
            {**refund, "amount_cents": 5},
            agents.headers(BILLING, "issue_refund", key="refund-1"),
        )
        assert (status, body["error"]) == (409, "idempotency_key_reused")
        # a new key cannot refund the same transaction again
        status, body, _ = await post(client, "issue_refund", refund, agents.headers(BILLING, "issue_refund"))
        assert (status, body["error"]) == (409, "already_refunded")
        assert len(await (await client.get("/_effects")).json()) == 1
        metrics = await (await client.get("/metrics")).text()
        assert 'githouse_tool_calls_total{outcome="ok",tool="issue_refund"} 1.0' in metrics
        assert 'githouse_tool_calls_total{outcome="idempotent_replay",tool="issue_refund"} 1.0' in metrics
        assert 'githouse_tool_calls_total{outcome="idempotency_conflict",tool="issue_refund"} 1.0' in metrics

    run(scenario)


def test_the_token_idempotency_key_is_used_when_the_header_is_absent_and_must_match_when_present():
    async def scenario(client, agents, bundle):
        args = {"post_id": "post_1337"}
        status, _, _ = await post(
            client, "hide_post", args, agents.headers(ACCOUNT, "hide_post", key="hide-1", with_header=False)
        )
        assert status == 200
        again = await post(client, "hide_post", args, agents.headers(ACCOUNT, "hide_post", key="hide-1"))
        assert again[0] == 200 and again[2]["Idempotent-Replayed"] == "true"
        headers = agents.headers(ACCOUNT, "hide_post", key="hide-2")
        headers["Idempotency-Key"] = "hide-3"
        status, body, _ = await post(client, "hide_post", args, headers)
        assert (status, body["reason"]) == (403, "idempotency_key_mismatch")

    run(scenario)


def test_refunds_need_a_transaction_verified_in_the_same_run():
    async def scenario(client, agents, bundle):
        await post(
            client,
            "verify_transaction",
            {"account": "octo-admin", "transaction_id": "txn_1001"},
            agents.headers(BILLING, "verify_transaction", run_id="run-a"),
        )
        refund = {"transaction_id": "txn_1001", "amount_cents": 4900}
        status, body, _ = await post(
            client, "issue_refund", refund, agents.headers(BILLING, "issue_refund", run_id="run-b")
        )
        assert (status, body["error"]) == (409, "transaction_not_verified")
        status, body, _ = await post(
            client,
            "issue_refund",
            {**refund, "amount_cents": 99999},
            agents.headers(BILLING, "issue_refund", run_id="run-a"),
        )
        assert (status, body["error"]) == (422, "amount_exceeds_charge")
        status, body, _ = await post(
            client,
            "verify_transaction",
            {"account": "jdoe", "transaction_id": "txn_1001"},
            agents.headers(BILLING, "verify_transaction"),
        )
        # A failed check is not a success: the SOP gate counts only 2xx answers.
        assert status == 422 and body == {
            "error": "not_verified",
            "message": "the transaction does not belong to this account",
        }
        status, body, _ = await post(
            client,
            "verify_transaction",
            {"account": "jdoe", "transaction_id": "txn_nope"},
            agents.headers(BILLING, "verify_transaction"),
        )
        assert (status, body["error"]) == (404, "unknown_transaction")
        assert await (await client.get("/_effects")).json() == []

    run(scenario)


def test_2fa_reset_and_token_revocation_need_a_verified_identity():
    async def scenario(client, agents, bundle):
        status, body, _ = await post(client, "reset_2fa", {"account": "jdoe"}, agents.headers(ACCOUNT, "reset_2fa"))
        assert (status, body["error"]) == (409, "identity_not_verified")
        status, body, _ = await post(
            client, "verify_identity", {"account": "mallory"}, agents.headers(ACCOUNT, "verify_identity")
        )
        assert (status, body["error"]) == (422, "not_verified") and "fraud review" in body["message"]
        status, body, _ = await post(client, "reset_2fa", {"account": "mallory"}, agents.headers(ACCOUNT, "reset_2fa"))
        assert (status, body["error"]) == (409, "identity_not_verified")
        status, body, _ = await post(
            client,
            "verify_identity",
            {"account": "jdoe", "evidence": "signed request"},
            agents.headers(ACCOUNT, "verify_identity"),
        )
        assert body == {"account": "jdoe", "verified": True, "method": "evidence_review"}
        status, body, _ = await post(client, "reset_2fa", {"account": "jdoe"}, agents.headers(ACCOUNT, "reset_2fa"))
        assert status == 200 and body["twoFactor"] == "reset"
        status, body, _ = await post(
            client,
            "revoke_token",
            {"account": "jdoe", "token_id": "pat_leak01"},
            agents.headers(ACCOUNT, "revoke_token"),
        )
        assert status == 200 and body["alreadyRevoked"] is False
        status, body, _ = await post(
            client,
            "revoke_token",
            {"account": "jdoe", "token_id": "pat_leak01"},
            agents.headers(ACCOUNT, "revoke_token"),
        )
        assert status == 200 and body["alreadyRevoked"] is True
        effects = await (await client.get("/_effects")).json()
        assert [e["tool"] for e in effects] == ["reset_2fa", "revoke_token"]

    run(scenario)


def test_invalid_arguments_are_rejected_naming_the_field():
    async def scenario(client, agents, bundle):
        status, body, _ = await post(
            client,
            "issue_refund",
            {"transaction_id": "txn_1002", "amount_cents": 0},
            agents.headers(BILLING, "issue_refund"),
        )
        assert (status, body["error"]) == (422, "invalid_arguments")
        assert (
            body["details"][0]["field"] == "amount_cents"
            and "greater than or equal to 1" in body["details"][0]["message"]
        )
        status, body, _ = await post(
            client,
            "open_incident",
            {"org": "o", "summary": "s", "severity": "sev9", "extra": 1},
            agents.headers(BILLING, "open_incident"),
        )
        assert status == 422 and {d["field"] for d in body["details"]} == {"severity", "extra"}
        status, body, _ = await post(client, "verify_identity", ["account"], agents.headers(ACCOUNT, "verify_identity"))
        assert (status, body["error"]) == (400, "invalid_json")
        resp = await client.post("/tools/no_such_tool", json={})
        assert resp.status == 404 and (await resp.json())["error"] == "unknown_tool"

    run(scenario)


def test_a_revoked_key_is_refused_by_the_service_and_counted():
    async def scenario(client, agents, bundle):
        headers = agents.headers(BILLING, "platform_status")
        bundle.load(agents.jwks(ACCOUNT))
        status, body, _ = await post(client, "platform_status", {}, headers)
        assert (status, body["reason"]) == (401, "revoked")
        status, body, _ = await post(client, "platform_status", {}, agents.headers(ACCOUNT, "platform_status"))
        assert status == 200 and body["status"] == "operational"
        metrics = await (await client.get("/metrics")).text()
        assert 'githouse_tool_token_refusals_total{reason="revoked",tool="platform_status"} 1.0' in metrics
        assert "githouse_trust_bundle_keys 1.0" in metrics

    run(scenario)


def test_healthz_follows_the_trust_bundle():
    async def scenario(client, agents, bundle):
        resp = await client.get("/healthz")
        assert resp.status == 200 and (await resp.json())["keys"] == 2
        bundle.load("not a bundle")
        resp = await client.get("/healthz")
        assert resp.status == 503 and "trust bundle invalid" in (await resp.json())["reason"]

    run(scenario)


def test_logs_carry_the_caller_but_never_the_token(caplog):
    tokens: list[str] = []

    async def scenario(client, agents, bundle):
        for tool, args, agent in (
            ("runner_status", {"org": "octo-enterprise"}, BILLING),
            ("runner_status", {"org": "octo-enterprise"}, "expired"),
        ):
            headers = (
                agents.headers(agent, tool)
                if agent != "expired"
                else {
                    "Authorization": "Bearer "
                    + mint_tool_token(
                        agents.keys[BILLING], "billing-1", BILLING, tool, "run-1", "k", now=time.time() - 600
                    )
                }
            )
            tokens.append(headers["Authorization"].split()[1])
            await post(client, tool, args, headers)

    with caplog.at_level(logging.DEBUG):
        run(scenario)
    assert "agent=githouse/billing run=run-1" in caplog.text and "reason=expired" in caplog.text
    for token in tokens:
        assert not any(part in caplog.text for part in token.split(".")), "a token leaked into the logs"


def example_tools() -> dict[str, dict]:
    tools = {}
    for doc in yaml.safe_load_all((REPO / "examples" / "githouse" / "30-agents.yaml").read_text()):
        for tool in (doc or {}).get("spec", {}).get("tools", []):
            assert tools.get(tool["name"], tool) == tool, f"{tool['name']} declared differently by two agents"
            tools[tool["name"]] = tool
    return tools


def test_the_service_serves_every_tool_of_the_example_with_its_schema():
    declared = example_tools()
    assert set(declared) == set(TOOLS)
    for name, tool in declared.items():
        spec = TOOLS[name]
        assert tool["endpoint"] == f"http://127.0.0.1:18080/tools/{name}"
        assert spec.mutating == tool["mutating"], name
        ours = spec.arguments.model_json_schema()
        schema = tool["inputSchema"]
        assert set(ours.get("properties", {})) == set(schema["properties"]), name
        assert set(ours.get("required", [])) == set(schema.get("required", [])), name
        assert ours.get("additionalProperties") is False and schema["additionalProperties"] is False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_service_runs_as_a_module_on_a_file_bundle_and_stops_on_sigterm(tmp_path):
    agents = Agents()
    bundle_file = tmp_path / "jwks.json"
    bundle_file.write_text(agents.jwks(BILLING))
    port = _free_port()
    log_file = (tmp_path / "service.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetward.toolkit.examples.githouse",
            f"--listen=127.0.0.1:{port}",
            f"--trust-bundle-file={bundle_file}",
            "--installation-id=fleetward-test",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    async def exercise() -> None:
        base = f"http://127.0.0.1:{port}"
        async with ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with http.get(f"{base}/healthz") as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "service.log").read_text()
                await asyncio.sleep(0.1)
            token = mint_tool_token(
                agents.keys[BILLING], "billing-1", BILLING, "platform_status", "r", "k", issuer="fleetward-test"
            )
            async with http.post(
                f"{base}/tools/platform_status", json={}, headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == 200, await resp.text()
            wrong_issuer = mint_tool_token(agents.keys[BILLING], "billing-1", BILLING, "platform_status", "r", "k")
            async with http.post(
                f"{base}/tools/platform_status", json={}, headers={"Authorization": f"Bearer {wrong_issuer}"}
            ) as resp:
                assert resp.status == 401 and (await resp.json())["reason"] == "wrong_issuer"

    try:
        asyncio.run(exercise())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
    assert "serving GitHouse tools on 127.0.0.1" in (tmp_path / "service.log").read_text()


@pytest.mark.parametrize("flag", ["--listen=127.0.0.1", "--listen=127.0.0.1:99999", "--listen=:80"])
def test_bad_listen_addresses_are_rejected_naming_the_flag(flag):
    proc = subprocess.run(
        [sys.executable, "-m", "fleetward.toolkit.examples.githouse", flag], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "--listen must be HOST:PORT" in proc.stderr


def test_without_any_kubernetes_configuration_the_service_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    command = [sys.executable, "-m", "fleetward.toolkit.examples.githouse", f"--listen=127.0.0.1:{_free_port()}"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**env, "HOME": str(tmp_path)})
    assert proc.returncode == 1
    assert "no Kubernetes API configuration" in proc.stderr and "file trust bundle" in proc.stderr
