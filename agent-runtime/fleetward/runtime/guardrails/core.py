"""The compiled guardrail core: the engine's hot path, in Rust (agent-runtime/guardrail-core).

One engine, two executions of it. The Python modules (`detectors`, `injection`, `normalize`)
define every pattern, table and rule; at import the compiled core is built from exactly those
patterns and tables (PCRE2 runs Python `re` patterns with the same match semantics) and takes
over the passes over ASCII text: the digit-led pass and its checksums, emails, key/JWT runs,
IPv6, overlap resolution, the injection phrase scan and base64 payload decoding. Text views
of non-ASCII input stay in Python (Unicode normalisation), and so do the two rare cases that
need Python's own Unicode or JSON rules (the core calls back for them) and texts on which a
pattern exceeds a PCRE2 resource limit (`LimitError`, pathological input only).

`FLEETWARD_GUARDRAIL_CORE` selects the execution:
- `compiled` (default): the core must be installed; a missing core is an ImportError naming
  the build command, never a silent 2-3x slower scan;
- `python`: the pure-Python reference, kept because it is what the core is tested against
  (tests/unit/test_guardrail_core.py compares both on the corpus, the bench messages and
  generated text: same findings, offsets, verdicts and rendered text).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ENV = "FLEETWARD_GUARDRAIL_CORE"
BUILD_HINT = "run `make build` (or hack/build-guardrail-core.sh) to build and install it"
_MODES = ("compiled", "python")

_core: Any = None  # fleetward_guardrail_core.Core once loaded
_module: Any = None  # the fleetward_guardrail_core module once loaded
_use_compiled = True


class _NeverRaised(Exception):
    """Stands in for the core's MatchLimitError when the core is not loaded."""


LimitError: type[Exception] = _NeverRaised
"""Raised by a core call when a pattern hits a PCRE2 resource limit (JIT stack, match or depth
limit) on a pathological text (e.g. a domain of thousands of labels). Python's `re` has no
such limits, so every caller of the built-in passes catches it and runs the Python code for
that one text: the result is the same, only slower. Not so for a Guardrail's own regular
expressions (userregex.py): their patterns are not ours to trust, `re` could run forever on
them, so there it means the budget ran out and the scan fails closed."""


def _mode_from_env() -> str:
    mode = os.environ.get(ENV, "compiled")
    if mode not in _MODES:
        raise ValueError(f"{ENV}={mode!r}: allowed values are {', '.join(_MODES)}")
    return mode


def _config() -> dict[str, object]:
    """What the compiled core needs from the Python detectors: their own objects, so the two
    executions cannot drift apart."""
    from fleetward.runtime.guardrails import detectors as d
    from fleetward.runtime.guardrails import injection as inj
    from fleetward.runtime.guardrails import normalize as n

    return {
        "num": d._NUM.pattern,
        "plus": d._PLUS.pattern,
        "paren": d._PAREN.pattern,
        "ssn_context": d._SSN_CONTEXT.pattern,
        "email_domain": d._EMAIL_DOMAIN.pattern,
        "local_chars": d._LOCAL_CHAR_STR,
        "secret_hint": d._SECRET_HINT.pattern,
        "secret": d._SECRET.pattern,
        "ipv6_seed": d._IPV6_SEED.pattern,
        "next_group": d._NEXT_GROUP.pattern,
        "national_max_digits": d.NATIONAL_MAX_DIGITS,
        "iban_lengths": d.IBAN_LENGTHS,
        "specificity": d.SPECIFICITY,
        "token_chars": n._TOKEN_CHARS,
        "spaced": inj._SPACED_RX.pattern.decode("ascii"),
        "squashed": inj._SQUASHED_RX.pattern.decode("ascii"),
        "families": [
            (family, inj._SPACED_BY_FAMILY[family].pattern.decode("ascii"), rx.pattern.decode("ascii"))
            for family, rx in inj._SQUASHED_BY_FAMILY.items()
        ],
        "split_evidence": inj._SPLIT_EVIDENCE.pattern.decode("ascii"),
        "squash_stems": list(inj._SQUASH_STEMS),
        "joined_token_bytes": inj.JOINED_TOKEN_BYTES,
        "short_token_run": inj.SHORT_TOKEN_RUN,
        "base64_run": inj._BASE64_RUN.pattern,
        "nested_token_run": inj._TOKEN_RUN_FOR_NESTED.pattern,
        "injection_bytes": n._INJECTION_BYTES,
        "jwt_header_fallback": d._jwt_header_valid,
        "chunk_fallback": inj._chunk_family,
    }


def load() -> None:
    """Builds the compiled core (called once, when the package is imported)."""
    global _core, _module, _use_compiled, LimitError
    _use_compiled = _mode_from_env() == "compiled"
    if not _use_compiled:
        return
    try:
        import fleetward_guardrail_core
    except ImportError as e:
        raise ImportError(
            f"the compiled guardrail core (Python module fleetward_guardrail_core) is not installed: {BUILD_HINT}; "
            f"{ENV}=python runs the slower pure-Python reference engine instead"
        ) from e
    _core = fleetward_guardrail_core.Core(_config())
    _module = fleetward_guardrail_core
    LimitError = fleetward_guardrail_core.MatchLimitError


def active() -> Any:
    """The compiled core, or None when the pure-Python reference is selected."""
    return _core if _use_compiled else None


def module() -> Any:
    """The compiled core's module when it is loaded (also within `reference_python`), for
    building its programs (userregex.py); None in the pure-Python mode."""
    return _module


@contextmanager
def reference_python() -> Iterator[None]:
    """Runs the pure-Python reference within the block (differential tests)."""
    global _use_compiled
    previous = _use_compiled
    _use_compiled = False
    try:
        yield
    finally:
        _use_compiled = previous
