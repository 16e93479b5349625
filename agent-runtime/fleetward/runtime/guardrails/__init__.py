"""Guardrail detection engine: PII, prompt injection, banned phrases and size limits.

Layers: `normalize` (text views with offset maps) -> `detectors` (PII), `injection`,
`policy` -> `engine` (composition of Guardrails, strategies, verdict) -> `middleware`
(LangChain PIIMiddleware built from Guardrail specs). The runtime and
`fleetward guardrail scan` both run `GuardrailEngine`. The passes over ASCII text run in the
compiled core built from these modules' own patterns (`core`, agent-runtime/guardrail-core).
"""

from fleetward.runtime.guardrails import core
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

# The compiled core (see core.py): built from the detectors' own patterns once they are
# all imported; fails loudly when it is not installed.
core.load()

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
