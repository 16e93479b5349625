"""`fleetward guardrail scan`: run Guardrails over texts, as the agent runtime does.

Reads JSON lines {"id": ..., "text": "..."} on standard input and writes one JSON line per
input on standard output:

    {"id": ..., "verdict": "allow"|"block"|"escalate", "text": <after redaction/masking/
     hashing, null when blocked>, "findings": [{"kind": "pii"|"injection"|"policy"|"limit",
     "type": ..., "start": ..., "end": ...}]}

Offsets are character offsets (Unicode code points, as Python counts them) into the input
text. Fields of an input line other than "id" and "text" are ignored, so a labelled corpus
can be piped in as it is; a UTF-8 byte-order mark before the first line is skipped. Output
is UTF-8 whatever the locale, one line per record: line and paragraph separators inside a
text (U+0085, U+2028, U+2029) are written as JSON escapes, so any line splitter reads it.
Several -f files (and several YAML documents per file, or the items of a `kind: List`)
compose: all Guardrails apply, block beats escalate beats allow; documents of other kinds
(the Agent or Namespace of the same file) are skipped and named on standard error. The
"id" may be any JSON scalar and is echoed back as given. Which parts apply at which --stage: PII per its
applyTo; injection on input and toolResults; policy (bannedPhrases) per its applyTo
(default input and output); maxInputChars on input, maxOutputChars on output. A bad
input line gets no output line: it is reported on standard error with its line number and
the scan goes on; the exit code is then 1. A bad Guardrail file stops before scanning
(exit 2).

Example:
    echo '{"id": 1, "text": "mail me at jane@example.com"}' |
      fleetward guardrail scan -f examples/githouse/10-guardrails.yaml --stage input
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import yaml
from pydantic import ValidationError

from fleetward.api.guardrail import Guardrail

EXIT_BAD_LINES = 1
EXIT_BAD_CONFIG = 2
# json.dumps(ensure_ascii=False) leaves these raw, and str.splitlines() (unlike the JSON
# lines convention) breaks a line at them; they only occur inside JSON strings, where the
# escape means the same character.
_LINE_BREAKS_IN_STRINGS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
_INPUT_FIELDS = {"id", "text"}


class ManifestError(Exception):
    """A Guardrail manifest that cannot be used; the message names file, document and field."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("guardrail", help="test Guardrails locally", description="Test Guardrails locally.")
    gsub = p.add_subparsers(dest="guardrail_command", metavar="ACTION", required=True)
    scan = gsub.add_parser(
        "scan",
        help="scan JSON lines from stdin with Guardrail manifests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scan.add_argument(
        "-f",
        "--file",
        dest="files",
        type=Path,
        action="append",
        required=True,
        metavar="GUARDRAIL.yaml",
        help="Guardrail manifest (kind Guardrail; several documents allowed); repeatable",
    )
    scan.add_argument(
        "--stage",
        choices=["input", "output", "toolResults"],
        default="input",
        help="where the text is in the agent's flow (default: input)",
    )
    scan.add_argument(
        "--hash-key-file",
        type=Path,
        metavar="FILE",
        help="installation key for the 'hash' strategy (HMAC-SHA256); without it hashes are plain SHA-256",
    )
    scan.set_defaults(handler=run_scan)


def load_guardrails(paths: Iterable[Path]) -> list[Guardrail]:
    """Every Guardrail document in the files, validated; raises ManifestError."""
    guardrails: list[Guardrail] = []
    for path in paths:
        try:
            docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except OSError as e:
            raise ManifestError(f"{path}: cannot read: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise ManifestError(f"{path}: not valid YAML: {e}") from e
        found, skipped = 0, []
        for where, doc in _documents(path, docs):
            if not isinstance(doc, dict):
                raise ManifestError(f"{where}: expected a mapping (a Guardrail manifest), got {type(doc).__name__}")
            if doc.get("kind") != "Guardrail":
                # The file a team applies may hold the Agent and SOPs too: what is not a
                # Guardrail is left out, and said so, unless nothing is left to scan with.
                if not isinstance(doc.get("kind"), str) or not doc["kind"]:
                    raise ManifestError(f"{where}: no kind; a Guardrail manifest starts with kind: Guardrail")
                skipped.append(f"{where} (kind {doc['kind']})")
                continue
            name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
            if name:
                where += f" ({name})"
            try:
                # Wire (camelCase) names only, as the API server reads them: `apply_to` would
                # pass here and be refused (or dropped) by `kubectl apply`.
                guardrail = Guardrail.model_validate(doc, by_alias=True, by_name=False)
            except ValidationError as e:
                raise ManifestError(f"{where}: {_describe(e)}") from e
            _check_rules_beyond_schema(guardrail, where)
            guardrails.append(guardrail)
            found += 1
        if not found:
            raise ManifestError(
                f"{path}: no Guardrail document in the file" + (f" (skipped: {', '.join(skipped)})" if skipped else "")
            )
        for what in skipped:
            print(f"fleetward guardrail scan: skipped {what}: not a Guardrail", file=sys.stderr)
    return guardrails


def _documents(path: Path, docs: list[Any]) -> Iterable[tuple[str, Any]]:
    """The YAML documents of a file, with the items of a `kind: List` (what `kubectl get -o
    yaml` prints) taken one by one; empty documents dropped."""
    for number, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        where = f"{path}: document {number}"
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            for index, item in enumerate(doc["items"]):
                yield f"{where}, items[{index}]", item
        else:
            yield where, doc


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        # spec.pii.entities[0].type, as the API server and the engine's own errors write it
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        got = item.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        problems.append(f"{field}: {item['msg']}{shown}")
    return "; ".join(problems)


def _check_rules_beyond_schema(guardrail: Guardrail, where: str) -> None:
    """The CEL rules the API server enforces, so a file that would be rejected fails here too."""
    spec = guardrail.spec
    if spec.pii is None and spec.injection is None and spec.policy is None and spec.limits is None:
        raise ManifestError(f"{where}: spec: a Guardrail needs at least one of pii, injection, policy or limits")
    for i, entity in enumerate(spec.pii.entities if spec.pii else ()):
        if entity.type == "custom" and entity.detector is None:
            raise ManifestError(
                f"{where}: spec.pii.entities[{i}]: a custom PII entity needs 'detector' (a regular expression)"
            )


def run_scan(args: argparse.Namespace) -> int:
    try:
        from fleetward.runtime.guardrails import GuardrailConfigError, GuardrailEngine
    except ImportError as e:  # the compiled core is missing: one line saying how to get it
        print(f"fleetward guardrail scan: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    try:
        guardrails = load_guardrails(args.files)
        key = _read_key(args.hash_key_file) if args.hash_key_file else None
        engine = GuardrailEngine(
            [g.spec for g in guardrails],
            names=[str(g.metadata.get("name", f"guardrail[{i}]")) for i, g in enumerate(guardrails)],
            hash_key=key,
        )
    except (ManifestError, GuardrailConfigError) as e:
        print(f"fleetward guardrail scan: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(encoding="utf-8")  # not the locale's: input is UTF-8 too
        bad = scan_lines(engine, args.stage, sys.stdin.buffer, sys.stdout, sys.stderr)
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as a Unix filter does; stdout is
        # pointed at /dev/null so the interpreter's final flush cannot fail on it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return EXIT_BAD_LINES if bad else 0


def _read_key(path: Path) -> bytes:
    from fleetward.runtime.config import read_pii_hash_key  # the runtime's own reading

    try:
        return read_pii_hash_key(path)
    except ValueError as e:
        raise ManifestError(f"--hash-key-file {path}: {e}") from e


def scan_lines(engine: Any, stage: str, source: IO[bytes], out: IO[str], err: IO[str]) -> int:
    """Scan every JSON line of `source`; returns the number of bad lines."""
    bad = 0
    for number, raw in enumerate(source, start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark (Notepad, PowerShell)
        if not raw.strip():
            continue
        try:
            item = _parse_line(raw)
        except ValueError as e:
            bad += 1
            print(f"fleetward guardrail scan: line {number}: {e}", file=err, flush=True)
            continue
        result = engine.scan(item["text"], stage)
        record = {
            "id": item["id"],
            "verdict": result.verdict,
            "text": result.text,
            "findings": [f.to_json() for f in result.findings],
        }
        out.write(json.dumps(record, ensure_ascii=False).translate(_LINE_BREAKS_IN_STRINGS) + "\n")
        out.flush()
    return bad


def _parse_line(raw: bytes) -> dict[str, Any]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte {e.start})") from e
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(item, dict):
        raise ValueError(f'expected a JSON object {{"id": ..., "text": "..."}}, got {type(item).__name__}')
    missing = sorted(_INPUT_FIELDS - item.keys())
    if missing:
        raise ValueError(f'missing field(s) {", ".join(repr(m) for m in missing)}; each line needs "id" and "text"')
    if not isinstance(item["text"], str):
        raise ValueError(f'"text" must be a string, got {_json_type(item["text"])}')
    if isinstance(item["id"], (dict, list)):
        # Any JSON scalar is echoed back as it came (string, number, true/false, null).
        raise ValueError(f'"id" must be a JSON string, number, boolean or null, got {_json_type(item["id"])}')
    for field in ("text", "id"):
        # JSON can escape a lone UTF-16 surrogate ("\ud800"), which is no Unicode character:
        # such text cannot be written out as UTF-8, so the line is refused here, not mid-output.
        value = item[field]
        if isinstance(value, str) and (at := _lone_surrogate(value)) is not None:
            raise ValueError(
                f'"{field}" is not valid Unicode: lone surrogate \\u{ord(value[at]):04x} at character {at} '
                "(an unpaired UTF-16 escape in the JSON)"
            )
    return item


def _lone_surrogate(text: str) -> int | None:
    """The position of the first lone surrogate in `text`, if any."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )
