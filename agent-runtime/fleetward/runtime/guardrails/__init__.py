"""Guardrail detection engine: PII, prompt injection, banned phrases and size limits.

Layers: `normalize` (text views with offset maps) -> `detectors` (PII), `injection`,
`policy` -> `engine` (composition of Guardrails, strategies, verdict) -> `middleware`
(LangChain PIIMiddleware built from Guardrail specs). The runtime and
`fleetward guardrail scan` both run `GuardrailEngine`.
"""

from fleetward.runtime.guardrails.engine import (
    STAGES,
    Finding,
    GuardrailConfigError,
    GuardrailEngine,
    ScanResult,
    Stage,
    Verdict,
)
from fleetward.runtime.guardrails.middleware import FleetwardPIIMiddleware, pii_middleware

__all__ = [
    "STAGES",
    "Finding",
    "FleetwardPIIMiddleware",
    "GuardrailConfigError",
    "GuardrailEngine",
    "ScanResult",
    "Stage",
    "Verdict",
    "pii_middleware",
]
