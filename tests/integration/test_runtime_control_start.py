"""The runtime's control consumer at start-up, against the real Kafka: `recover` reads the
control topic's history, then `run` starts consuming. An order produced between the two
must reach `run` (it used to start at the end of the topic as it was by then, so such an
order was in neither). Intake, the run registry and the ack producer are stand-ins here:
what is under test is which control records the consumer reads."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

from fleetward.runtime.control import Control

from fleetward.api.envelopes import ControlMessage
from tests.support.runtime import ensure_topics, produce

AGENT = "ctl/billing"


class Intake:
    def __init__(self) -> None:
        self.halted = asyncio.Event()

    def halt(self) -> None:
        self.halted.set()

    def resume(self) -> None:
        self.halted.clear()


class Registry:
    def __init__(self) -> None:
        self.active: dict = {}

    def halt(self) -> None: ...

    def resume(self) -> None: ...


class AckProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def send(self, topic: str, value: str, key: str | None = None, headers=None) -> None:
        self.sent.append((topic, value))


def test_an_order_sent_between_reading_the_history_and_consuming_is_not_missed(kafka):
    topic, acks = f"ctl-{uuid.uuid4().hex[:8]}", f"ctl-acks-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka.bootstrap, [topic, acks], partitions=1)
    switch = f"stop-{uuid.uuid4().hex[:6]}"

    def order(type_: str, generation: int, **kw) -> str:
        return ControlMessage.new(type_, kill_switch=switch, generation=generation, agents=[AGENT], **kw).to_json()

    # history: an engage and release long done
    produce(kafka.bootstrap, topic, order("halt", 1, mode="drain", drain_timeout_seconds=5), switch)
    produce(kafka.bootstrap, topic, order("resume", 2), switch)

    async def scenario() -> tuple[bool, bool, list]:
        intake, producer = Intake(), AckProducer()
        services = SimpleNamespace(
            agent=AGENT, config=SimpleNamespace(topics=SimpleNamespace(control=topic, control_acks=acks))
        )
        control = Control(
            {"bootstrap.servers": kafka.bootstrap},
            services=services,
            intake=intake,
            registry=Registry(),
            producer=producer,
            instance=f"pod-{uuid.uuid4().hex[:6]}",
            group_prefix="test",
        )
        await control.recover()
        halted_by_history = intake.halted.is_set()
        # The switch engaged again, between the history read and the consumer's start.
        await asyncio.to_thread(
            produce, kafka.bootstrap, topic, order("halt", 3, mode="drain", drain_timeout_seconds=5), switch
        )
        task = asyncio.create_task(control.run())
        try:
            await asyncio.wait_for(intake.halted.wait(), 30)
        except TimeoutError:
            pass
        control.stopping.set()
        await asyncio.wait_for(task, 30)
        return halted_by_history, intake.halted.is_set(), producer.sent

    halted_by_history, halted, sent = asyncio.run(scenario())
    assert not halted_by_history  # the history ends with a release
    assert halted, "the halt sent between the history read and the consumer's start was missed"
    assert [t for t, _ in sent] == [acks, acks]  # halted, then drained (no run in flight)
