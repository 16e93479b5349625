"""Running the stand-in: `StandinServer` (background thread, for tests) and `serve` (the CLI, foreground)."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from aiohttp import web

from fleetward.llmstandin.app import build_app
from fleetward.llmstandin.gates import Gates
from fleetward.llmstandin.matching import RuleBook
from fleetward.llmstandin.recorder import Recorder
from fleetward.llmstandin.scenario import Scenario, load_scenarios, parse_scenario

# Held and delayed requests must not keep a stopping server waiting for long.
SHUTDOWN_TIMEOUT_SECONDS = 1.0

ScenarioLike = Scenario | dict[str, Any] | list[Any] | str | Path | None


def to_scenario(scenario: ScenarioLike) -> Scenario:
    """A Scenario from a Scenario, a document (mapping or list of rules), or a file/folder path."""
    if scenario is None:
        return Scenario()
    if isinstance(scenario, Scenario):
        return scenario
    if isinstance(scenario, str | Path):
        return load_scenarios([scenario])
    return parse_scenario(scenario, "scenario given in Python")


async def _start_site(
    rulebook: RuleBook, recorder: Recorder, host: str, port: int, gates: Gates | None = None
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(
        build_app(rulebook, recorder, gates),
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
        access_log=None,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


def http_root(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class StandinServer:
    """The stand-in on a free loopback port in a background thread.

        with StandinServer({"rules": [...]}) as llm:
            ChatOpenAI(base_url=llm.url, api_key="any", model="m")
            llm.requests()

    `url` is the OpenAI base URL (ending in /v1); `root_url` serves /_standin/... too.
    """

    def __init__(
        self, scenario: ScenarioLike = None, *, host: str = "127.0.0.1", port: int = 0, record: Path | str | None = None
    ):
        self.rulebook = RuleBook(to_scenario(scenario))
        self.recorder = Recorder(record)
        self.gates = Gates()
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    @property
    def root_url(self) -> str:
        return http_root(self.host, self.port)

    @property
    def url(self) -> str:
        return f"{self.root_url}/v1"

    def start(self) -> StandinServer:
        if self._thread is not None:
            raise RuntimeError("stand-in already started")
        started = threading.Event()
        failure: list[OSError] = []

        async def run() -> None:
            self._stop = asyncio.Event()
            try:
                runner, self.port = await _start_site(self.rulebook, self.recorder, self.host, self.port, self.gates)
            except OSError as e:  # address in use, bad host: re-raised in the caller's thread
                failure.append(e)
                return
            finally:
                started.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

        def thread_main() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(run())
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=thread_main, name="fleetward-llm-standin", daemon=True)
        self._thread.start()
        started.wait()
        if failure or not self._thread.is_alive():
            self._thread.join()
            self._thread = None
            raise failure[0] if failure else RuntimeError("the LLM stand-in failed to start (see the log)")
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=SHUTDOWN_TIMEOUT_SECONDS + 10)
        self._thread = None
        self.recorder.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def set_scenario(self, scenario: ScenarioLike) -> None:
        """Replace the rules (use counts start again); raises ScenarioError for a bad scenario."""
        self.rulebook.replace(to_scenario(scenario))

    def requests(
        self, model: str | None = None, rule: str | None = None, outcome: str | None = None
    ) -> list[dict[str, Any]]:
        """The recorded requests (see docs/llm-standin.md), optionally filtered."""
        return self.recorder.list(model=model, rule=rule, outcome=outcome)

    def clear_requests(self) -> int:
        return self.recorder.clear()

    def open_gate(self, name: str) -> None:
        """Let the requests waiting on gate `name` (rules with `waitForGate`) be answered, and later ones too."""
        self._on_loop(self.gates.open, name)

    def close_gate(self, name: str) -> None:
        self._on_loop(self.gates.close, name)

    def _on_loop(self, fn: Callable[[str], None], name: str) -> None:
        # The gates' events belong to the server's loop: change them there.
        if self._loop is None or self._thread is None:
            raise RuntimeError("the stand-in is not running")
        done = threading.Event()

        def call() -> None:
            fn(name)
            done.set()

        self._loop.call_soon_threadsafe(call)
        done.wait(5)


def serve(
    host: str,
    port: int,
    scenario_paths: Sequence[str | Path],
    record: Path | None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve in the foreground until SIGINT or SIGTERM. Scenario errors raise before anything listens."""
    scenario = load_scenarios(scenario_paths) if scenario_paths else Scenario()
    asyncio.run(_serve(RuleBook(scenario), Recorder(record), host, port, announce))


async def _serve(rulebook: RuleBook, recorder: Recorder, host: str, port: int, announce: Callable[[str], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner, bound_port = await _start_site(rulebook, recorder, host, port)
    try:
        rules = len(rulebook.scenario.rules)
        root = http_root(host, bound_port)
        announce(
            f"fleetward LLM stand-in (scripted, NOT a language model) listening on {root}/v1 "
            f"with {rules} scenario rule{'s' if rules != 1 else ''}"
            + (f" from {rulebook.scenario.name}" if rulebook.scenario.name else "")
            + f"; control: {root}/_standin"
        )
        await stop.wait()
        announce("fleetward LLM stand-in: stopping")
    finally:
        await runner.cleanup()
        recorder.close()
