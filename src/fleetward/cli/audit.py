"""`fleetward audit`: check and read the audit log (SPEC §8).

The audit log is append-only and hash-chained: each record carries the SHA-256 hash of
the one before. `verify` recomputes every hash and link and names the first broken record
and what is wrong with it:
  edited     its content no longer matches its hash
  deleted    a gap in the sequence (or records missing at the end)
  reordered  its prevHash does not link to the record before (moved or inserted)
  inserted   a record of another chain, or past the chain head
  invalid    not an audit record (no integer sequence, a field of the wrong shape)
Record format: docs/audit.md.

The database is given by --dsn or $FLEETWARD_AUDIT_DSN:
  postgresql://USER:PASSWORD@HOST:PORT/DATABASE   (the shared store of an installation)
  sqlite:///ABSOLUTE/PATH                          (the embedded default)

Exit codes: 0 the chain verifies; 1 the chain is broken; 2 bad usage, or the database
cannot be read.

Examples:
  fleetward audit verify --dsn postgresql://fleetward:secret@127.0.0.1:5432/fleetward
  FLEETWARD_AUDIT_DSN=sqlite:///var/lib/fleetward/state.db fleetward audit list --action tool.call
  kafka-console-consumer ... --topic fleetward.audit | fleetward audit verify --jsonl -
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import IO, Any, get_args

EXIT_OK, EXIT_BROKEN, EXIT_USAGE = 0, 1, 2


def register(sub: argparse._SubParsersAction) -> None:
    from fleetward.api.envelopes import AuditAction

    p = sub.add_parser(
        "audit",
        help="verify and read the hash-chained audit log",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    def dsn_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--dsn",
            default=None,
            help="audit database: postgresql://USER:PASSWORD@HOST:PORT/DB or sqlite:///PATH "
            "(default: $FLEETWARD_AUDIT_DSN)",
        )

    verify = asub.add_parser(
        "verify",
        help="recompute the hash chain; name the first broken record",
        description="Recompute every record's hash and its link to the record before, in sequence order, and "
        "check the chain head. Prints how many records were checked and the head hash (exit 0), or the first "
        "broken record: its sequence number, id, and whether it was edited (hash mismatch), deleted (gap in "
        "the sequence), reordered/inserted (prevHash link broken) or invalid (not an audit record) (exit 1). "
        "Exit 2: bad usage or unreadable database.",
    )
    dsn_option(verify)
    verify.add_argument(
        "--jsonl",
        type=Path,
        metavar="FILE",
        help="verify records given as JSON lines (e.g. consumed from the audit topic) instead of a database; "
        "'-' reads standard input",
    )
    verify.add_argument(
        "--chain",
        metavar="ID",
        help="with --jsonl: verify only this chain's records. Without it, a stream that carries several chains "
        "(the audit topic: the operator's, one per runtime on SQLite) is verified chain by chain, one line each "
        "('chain ID: ...'); exit 1 if any is broken",
    )
    verify.add_argument(
        "--json", action="store_true", help="print the result as one JSON object (one line per chain with --jsonl)"
    )
    verify.set_defaults(handler=run_verify)

    listing = asub.add_parser(
        "list",
        help="print records as JSON lines (not verified)",
        description="Print stored records, oldest first, one JSON object per line (the wire form mirrored to "
        "the audit topic). This does not verify them: run `fleetward audit verify` for that.",
    )
    dsn_option(listing)
    listing.add_argument("--after", type=int, default=0, metavar="SEQ", help="only records after this sequence")
    listing.add_argument("--limit", type=int, default=None, metavar="N", help="at most N records")
    listing.add_argument("--action", choices=get_args(AuditAction), help="only records of this action")
    listing.set_defaults(handler=run_list)


def _dsn(args: argparse.Namespace) -> str | None:
    from fleetward.audit import DSN_ENV

    dsn = args.dsn or os.environ.get(DSN_ENV)
    if not dsn:
        print(f"error: no audit database: pass --dsn or set {DSN_ENV}", file=sys.stderr)
    return dsn


def _report(result: Any, as_json: bool, prefix: str = "") -> int:
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        print(prefix + result.summary())
    if not result.ok:
        if not as_json:
            print(f"error: {prefix}{result.summary()}", file=sys.stderr)
        return EXIT_BROKEN
    return EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    from fleetward.audit import AuditError, AuditLog, verify_chains, verify_documents

    if args.jsonl is not None:
        if args.dsn:
            print("error: --jsonl and --dsn exclude each other", file=sys.stderr)
            return EXIT_USAGE
    elif args.chain:
        print("error: --chain goes with --jsonl (a database holds one chain)", file=sys.stderr)
        return EXIT_USAGE
    if args.jsonl is not None:
        try:
            stream = sys.stdin if str(args.jsonl) == "-" else args.jsonl.open(encoding="utf-8")
        except OSError as e:
            print(f"error: --jsonl {args.jsonl}: {e.strerror}", file=sys.stderr)
            return EXIT_USAGE
        with stream:
            docs = _json_lines(stream)
            if args.chain:
                docs = (d for d in docs if isinstance(d, Exception) or d.get("chain") == args.chain)
                return _report(verify_documents(docs, skip_duplicates=True), args.json)
            results = verify_chains(docs) or [verify_documents([])]
        if len(results) == 1:
            return _report(results[0], args.json)
        codes = [_report(r, args.json, prefix=f"chain {r.chain or '?'}: ") for r in results]
        return max(codes)
    dsn = _dsn(args)
    if not dsn:
        return EXIT_USAGE
    try:
        with AuditLog.open(dsn, create=False) as log:
            result = log.verify()
    except AuditError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return _report(result, args.json)


def _json_lines(stream: IO[str]):
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as e:
            yield ValueError(f"line {number} is not JSON: {e}")
            return
        yield doc if isinstance(doc, dict) else ValueError(f"line {number} is not a JSON object")


def run_list(args: argparse.Namespace) -> int:
    from fleetward.api.envelopes import canonical_json
    from fleetward.audit import AuditError, AuditLog

    if args.limit is not None and args.limit < 1:
        print(f"error: --limit {args.limit}: must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    dsn = _dsn(args)
    if not dsn:
        return EXIT_USAGE
    try:
        with AuditLog.open(dsn, create=False) as log:
            for count, doc in enumerate(log.records(args.after, action=args.action), 1):
                sys.stdout.write(canonical_json(doc).decode("utf-8") + "\n")
                if args.limit is not None and count >= args.limit:
                    break
    except AuditError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `fleetward audit list | head`
        sys.stderr.close()
    return EXIT_OK
