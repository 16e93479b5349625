"""`fleetward llm serve`: the scripted OpenAI-compatible stand-in for a language model.

A STAND-IN, not a model: a real HTTP server speaking the OpenAI Chat Completions protocol
(tool calls, structured output, streaming, usage) whose every answer comes from scenario
rules (docs/llm-standin.md). Tests and the offline demo point the runtime's model endpoint
at it. A request no rule matches gets a 404 naming the request, never an invented answer.

Control routes beside /v1: GET/DELETE /_standin/requests (what reached "the model"),
GET/POST /_standin/scenario (replace the rules at run time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def register(sub: argparse._SubParsersAction) -> None:
    llm = sub.add_parser(
        "llm",
        help="the scripted LLM stand-in (not a model)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    llm_sub = llm.add_subparsers(dest="llm_command", metavar="SUBCOMMAND", required=True)
    serve = llm_sub.add_parser(
        "serve",
        help="serve the scripted OpenAI-compatible stand-in until Ctrl-C/SIGTERM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback)")
    serve.add_argument("--port", type=int, default=18000, help="port (default: %(default)s; 0 picks a free one)")
    serve.add_argument(
        "--scenario",
        action="append",
        default=[],
        metavar="FILE_OR_DIR",
        help="scenario file (YAML/JSON) or folder of them; repeatable, rules keep the order given",
    )
    serve.add_argument("--record", type=Path, metavar="FILE", help="also append every request, as a JSON line, to FILE")
    serve.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from fleetward.llmstandin import ScenarioError, serve

    if not 0 <= args.port <= 65535:
        print(f"error: --port must be 0..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK:
        print(
            f"warning: listening on {args.host}, beyond loopback; the stand-in has no authentication", file=sys.stderr
        )
    try:
        serve(args.host, args.port, args.scenario, args.record, announce=lambda line: print(line, flush=True))
    except ScenarioError as e:
        print(f"error: bad scenario:\n{e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0
