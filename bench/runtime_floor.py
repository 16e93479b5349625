"""Benchmark: what the runtime's mandated stack costs by itself, per request, with the model
answering instantly (the floor under `bench/runtime_overhead.py`'s overhead).

    .venv/bin/python bench/runtime_floor.py                   # every layer, 300 requests each
    .venv/bin/python bench/runtime_floor.py --requests 1000 --no-write

In one process, one request at a time, against the LLM stand-in (`fleetward llm serve`, its
own process, answering at once), each layer adding one thing to the one before:

  embedding       the runtime's SOP embedding of one request (all-MiniLM-L6-v2 int8, ONNX;
                  retrieval.py), not a layer: every request pays it besides the graph
  model           ChatOpenAI.ainvoke (langchain-openai, the openai SDK, httpx)
  agent           a bare LangChain 1.x `create_agent` graph (no middleware, no tools)
  agent+memory    the same, checkpointed in memory (InMemorySaver), durability "sync"
                  (and with +N hooks, below: LangGraph's own cost per step)
  agent+sqlite    the same, checkpointed in SQLite (AsyncSqliteSaver, WAL), durability "sync"
  +N hooks        the same with N no-op middleware hooks (before_agent / after_agent): each
                  is a graph step, checkpointed before the next starts

Measured: the process's CPU time per request (all threads: /proc, user + system) and the
wall time per request (p50). The stand-in's own CPU is in its own process, not counted.
Results: docs/bench/runtime-floor.json (appended) and docs/bench/runtime.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from results import record  # noqa: E402
from runtime_overhead import FLEETWARD, SCENARIOS, Process  # noqa: E402

from fleetward.devcluster.process import free_port  # noqa: E402

RESULTS = REPO / "docs" / "bench" / "runtime-floor.json"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread (aiosqlite's, httpx's, ...)."""
    t = os.times()
    return t.user + t.system


def no_op_hooks(n: int) -> list[Any]:
    """`n` middleware hooks that change nothing: what one graph step costs (half before the
    agent, half after, like the runtime's retrieval / memory / review / respond steps)."""
    from langchain.agents.middleware import AgentMiddleware

    class Before(AgentMiddleware):
        async def abefore_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
            return None

    class After(AgentMiddleware):
        async def aafter_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
            return None

    hooks: list[Any] = []
    for i in range(n):
        kind = Before if i % 2 == 0 else After
        hooks.append(type(f"{kind.__name__}{i}", (kind,), {})())
    return hooks


async def measure(name: str, call: Any, requests: int, warmup: int) -> dict[str, Any]:
    for i in range(warmup):
        await call(f"warm-{i}")
    walls: list[float] = []
    cpu0 = cpu_seconds()
    for i in range(requests):
        t0 = time.perf_counter()
        await call(f"{name}-{i}")
        walls.append((time.perf_counter() - t0) * 1000)
    cpu_ms = (cpu_seconds() - cpu0) * 1000 / requests
    walls.sort()
    result = {
        "cpu_ms_per_request": round(cpu_ms, 2),
        "wall_p50_ms": round(statistics.median(walls), 2),
        "wall_p90_ms": round(walls[int(0.9 * (len(walls) - 1))], 2),
    }
    say(f"{name}: {result}")
    return result


async def run(args: argparse.Namespace, base_url: str, work: Path) -> dict[str, Any]:
    from fleetward.runtime.retrieval import Embedder
    from langchain.agents import create_agent
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    embedder = Embedder()

    async def embedding(key: str) -> None:
        embedder.embed([f"I was charged twice this month, please refund the duplicate charge ({key})"])

    results: dict[str, Any] = {"embedding": await measure("embedding", embedding, args.requests, args.warmup)}
    model = ChatOpenAI(model="bench", base_url=base_url, api_key="unused", max_retries=0, stream_usage=True)

    async def model_call(key: str) -> None:
        await model.ainvoke([HumanMessage(content=f"refund please ({key})")])

    results["model"] = await measure("model", model_call, args.requests, args.warmup)

    def graph_call(graph: Any, checkpointed: bool) -> Any:
        async def call(key: str) -> None:
            config = {"configurable": {"thread_id": key}} if checkpointed else None
            # durability only with a checkpointer (LangGraph 1.0 fails on it without one)
            extra = {"durability": "sync"} if checkpointed else {}
            graph_input = {"messages": [HumanMessage(content=f"refund please ({key})")]}
            async for _ in graph.astream(graph_input, config, stream_mode="updates", **extra):
                pass

        return call

    results["agent"] = await measure("agent", graph_call(create_agent(model, []), False), args.requests, args.warmup)
    for hooks in [0, *args.hooks]:
        graph = create_agent(model, [], middleware=no_op_hooks(hooks), checkpointer=InMemorySaver())
        name = "agent+memory" if hooks == 0 else f"agent+memory+{hooks} hooks"
        results[name] = await measure(name, graph_call(graph, True), args.requests, args.warmup)
    async with AsyncSqliteSaver.from_conn_string(str(work / "checkpoints.db")) as saver:
        await saver.conn.execute("PRAGMA journal_mode=WAL")
        for hooks in [0, *args.hooks]:
            graph = create_agent(model, [], middleware=no_op_hooks(hooks), checkpointer=saver)
            name = "agent+sqlite" if hooks == 0 else f"agent+sqlite+{hooks} hooks"
            results[name] = await measure(name, graph_call(graph, True), args.requests, args.warmup)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="measured requests per layer")
    parser.add_argument("--warmup", type=int, default=30, help="requests before measuring, per layer")
    parser.add_argument(
        "--hooks", type=int, nargs="*", default=[4, 8], help="no-op middleware hook counts to add (default 4 8)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the result only")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fleetward-floor-") as tmp:
        work = Path(tmp)
        (work / "scenario.json").write_text(json.dumps({"rules": SCENARIOS["plain"]}))
        port = free_port()
        standin = Process(
            [FLEETWARD, "llm", "serve", "--port", str(port), "--scenario", str(work / "scenario.json")],
            work / "standin.log",
        )
        try:
            standin.wait_http(f"http://127.0.0.1:{port}/_standin")
            loadavg = [round(x, 2) for x in os.getloadavg()]
            layers = asyncio.run(run(args, f"http://127.0.0.1:{port}/v1", work))
        finally:
            standin.stop()
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "bench/runtime_floor.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": loadavg},
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "layers": layers,
    }
    record(result, RESULTS, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
