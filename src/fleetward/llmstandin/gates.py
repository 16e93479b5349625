"""Named gates: a rule with `waitForGate` answers only once the test has opened its gate.

Delays guess how long the other side of a test takes; on a busy machine the guess is wrong
one run in a hundred. A gate lets a test hold a model call exactly until it has arranged
what must happen meanwhile (a replica joining, a halt arriving), then let it go.

Gates live on the server's event loop; `open`/`close` are called there (the HTTP routes) or
handed to it with `call_soon_threadsafe` (StandinServer). They start closed, stay as they are
when the scenario is replaced, and an opened gate lets every waiting and later request through.
"""

from __future__ import annotations

import asyncio


class Gates:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def _event(self, name: str) -> asyncio.Event:
        return self._events.setdefault(name, asyncio.Event())

    def open(self, name: str) -> None:
        self._event(name).set()

    def close(self, name: str) -> None:
        self._event(name).clear()

    async def wait(self, name: str) -> None:
        await self._event(name).wait()

    def states(self) -> dict[str, bool]:
        """Every gate named so far (by a route or a waiting request): open or not."""
        return {name: event.is_set() for name, event in sorted(self._events.items())}
