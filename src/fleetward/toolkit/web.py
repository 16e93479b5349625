"""aiohttp helpers for tool services: verify the request's token for one tool, and turn a
refusal into the HTTP answer (401/403/503 with a JSON reason, RFC 6750 header).

    call = verify_request(request, verifier, tool="issue_refund")   # raises TokenRefused
    ...
    except TokenRefused as refused:
        return refusal_response(refused)
"""

from __future__ import annotations

from aiohttp import web

from fleetward.toolkit.errors import TokenRefused
from fleetward.toolkit.verify import ToolTokenVerifier, VerifiedCall

_ERRORS = {401: "unauthorized", 403: "forbidden", 503: "unavailable"}


def verify_request(request: web.Request, verifier: ToolTokenVerifier, tool: str) -> VerifiedCall:
    """The verified call behind `Authorization: Bearer`, for the tool `tool` (its audience).
    An `Idempotency-Key` header, when present, must equal the token's claim."""
    return verifier.verify_authorization(
        request.headers.get("Authorization"), tool, request.headers.get("Idempotency-Key")
    )


def refusal_response(refused: TokenRefused) -> web.Response:
    status = refused.http_status
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = f'Bearer error="invalid_token", error_description="{refused.reason.value}"'
    elif status == 403:
        headers["WWW-Authenticate"] = f'Bearer error="insufficient_scope", error_description="{refused.reason.value}"'
    else:
        headers["Retry-After"] = "1"
    body = {"error": _ERRORS[status], "reason": refused.reason.value, "message": refused.detail}
    return web.json_response(body, status=status, headers=headers)
