"""LangChain middleware built from Guardrail specs, for the runtime to compose.

`pii_middleware(specs)` returns one `PIIMiddleware` per PII entity, with our detectors plugged
in as PIIMiddleware custom detectors: LangChain brings the agent wiring (before_model on the
last user message and on tool results, after_model on the AI message, the streaming
transformer that scrubs deltas and tool events on the wire), we bring detection for the
types LangChain lacks (phone, us_ssn, iban, api_key, jwt, IPv6, custom) and the wider
email/credit_card/ip detection the scan engine uses (see detectors.py), so the runtime redacts
exactly what `fleetward guardrail scan` reports.

Rendering. PIIMiddleware renders matches itself. `redact` and `block` render exactly like the
scan engine; for `mask` and `hash` LangChain's output differs from ours (its email mask keeps
the local part and hides the domain; its hash is unkeyed and not canonicalised), so
`FleetwardPIIMiddleware` overrides the state-level rendering (`_process_content`, the
canonical enforcer in before_model/after_model) to use the engine's `render`. The streaming
transformer, which LangChain builds from a strategy name, is given `redact` for `mask`/`hash`
entities: the wire then shows `[REDACTED_TYPE]` while the state shows the mask or hash,
never more than the state shows.

The runtime runs all of them in one graph step before the model and one after it
(middleware/steps.py), not two steps per entity.

Injection, policy and limits have no LangChain counterpart; the runtime's own middleware
calls `GuardrailEngine.scan` for them (the engine is the single implementation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fleetward.runtime.guardrails.detectors import SPECIFICITY, USER_REGEX_SPECIFICITY, detector_for, regex_detector
from fleetward.runtime.guardrails.engine import STRATEGY_RANK, Strategy, compile_user_regex, render
from fleetward.runtime.guardrails.userregex import GuardrailRegex
from langchain.agents.middleware import PIIMatch, PIIMiddleware

from fleetward.api.guardrail import GuardrailSpec


class FleetwardPIIMiddleware(PIIMiddleware):
    """PIIMiddleware whose state-level rendering of mask/hash is the scan engine's."""

    def __init__(
        self,
        pii_type: str,
        *,
        strategy: Strategy,
        detector: Callable[[str], list[PIIMatch]],
        hash_key: bytes | None = None,
        apply_to_input: bool = True,
        apply_to_output: bool = False,
        apply_to_tool_results: bool = False,
        stages: set[str] | None = None,
    ) -> None:
        stream_strategy = "redact" if strategy in ("mask", "hash") else strategy
        super().__init__(
            pii_type,
            strategy=stream_strategy,
            detector=detector,
            apply_to_input=apply_to_input,
            apply_to_output=apply_to_output,
            apply_to_tool_results=apply_to_tool_results,
        )
        self.strategy = strategy  # the state-level strategy; the stream keeps stream_strategy
        self._hash_key = hash_key
        self._stages = "+".join(sorted(stages)) if stages else ""

    @property
    def name(self) -> str:
        # Unique per type and stage group: create_agent refuses two middlewares of one name
        # (and LangGraph node names must not contain ":" or "|").
        return f"FleetwardPIIMiddleware[{self.pii_type},{self.strategy},{self._stages}]"

    def _render(self, text: str, matches: list[PIIMatch]) -> str:
        pieces, pos = [], 0
        for m in sorted(matches, key=lambda m: m["start"]):
            if m["start"] < pos:
                continue
            pieces.append(text[pos : m["start"]])
            pieces.append(render(m["type"], m["value"], self.strategy, self._hash_key))
            pos = m["end"]
        pieces.append(text[pos:])
        return "".join(pieces)

    def _process_content(self, content: Any) -> tuple[Any, bool]:
        if self.strategy not in ("mask", "hash"):
            return super()._process_content(content)
        if isinstance(content, str):
            matches = self.detector(content)
            return (self._render(content, matches), True) if matches else (content, False)
        new_blocks: list[Any] = []
        changed = False
        for block in content:
            text = block if isinstance(block, str) else block.get("text")
            if isinstance(text, str) and (matches := self.detector(text)):
                rendered = self._render(text, matches)
                block = rendered if isinstance(block, str) else {**block, "text": rendered}
                changed = True
            new_blocks.append(block)
        return (new_blocks, True) if changed else (content, False)


def pii_middleware(
    specs: Sequence[GuardrailSpec],
    *,
    names: Sequence[str] | None = None,
    hash_key: bytes | None = None,
) -> list[PIIMiddleware]:
    """PIIMiddleware instances for every PII entity of the specs, composed like the engine does.

    Per (type, stage) the strictest strategy of all Guardrails applies and all their detectors
    run; stages that end up with the same strategy and detectors share one middleware. Order:
    user regexes first, then built-ins from the most specific (jwt, api_key, ...) to the least
    (phone), so that on overlapping matches the more specific type redacts first, as in the
    engine's overlap resolution.
    """
    names = list(names) if names is not None else [f"guardrail[{i}]" for i in range(len(specs))]
    # label -> stage -> [strategy, builtin?, regex patterns]
    plan: dict[str, dict[str, tuple[Strategy, bool, tuple[str, ...]]]] = {}
    for name, spec in zip(names, specs, strict=True):
        if spec.pii is None:
            continue
        for i, entity in enumerate(spec.pii.entities):
            label = entity.label
            if entity.detector is not None:
                compile_user_regex(entity.detector, f"{name}: spec.pii.entities[{i}].detector")
            for stage in spec.pii.apply_to:
                strategy, builtin, regexes = plan.setdefault(label, {}).get(stage, (entity.strategy, False, ()))
                if STRATEGY_RANK[entity.strategy] > STRATEGY_RANK[strategy]:
                    strategy = entity.strategy
                if entity.detector is None:
                    builtin = True
                elif entity.detector not in regexes:
                    regexes = (*regexes, entity.detector)
                plan[label][stage] = (strategy, builtin, regexes)

    def order(label: str) -> tuple[int, str]:
        return (-SPECIFICITY.get(label, USER_REGEX_SPECIFICITY), label)

    out: list[PIIMiddleware] = []
    for label in sorted(plan, key=order):
        groups: dict[tuple[Strategy, bool, tuple[str, ...]], set[str]] = {}
        for stage, key in plan[label].items():
            groups.setdefault(key, set()).add(stage)
        for (strategy, builtin, regexes), stages in sorted(groups.items(), key=lambda kv: sorted(kv[1])):
            out.append(
                FleetwardPIIMiddleware(
                    label,
                    strategy=strategy,
                    detector=_combined_detector(label, builtin, regexes),
                    hash_key=hash_key,
                    apply_to_input="input" in stages,
                    apply_to_output="output" in stages,
                    apply_to_tool_results="toolResults" in stages,
                    stages=stages,
                )
            )
    return out


def _combined_detector(label: str, builtin: bool, regexes: tuple[str, ...]) -> Callable[[str], list[PIIMatch]]:
    parts = [detector_for(label)] if builtin else []
    parts += [regex_detector(label, GuardrailRegex(r)) for r in regexes]
    if len(parts) == 1:
        return parts[0]

    def detect(content: str) -> list[PIIMatch]:
        return [m for part in parts for m in part(content)]

    return detect
