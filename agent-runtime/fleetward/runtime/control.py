"""Kill-switch control (SPEC §7): `halt`, `resume`, `rotate_keys` from the control topic,
acks on control-acks.

Every instance reads every control message: its consumer group is its own (pod name), so a
container restarted in the same pod re-reads what it has not acknowledged, and a new pod
starts from the latest message. Orders for other agents, and orders older than the last
generation seen from the same KillSwitch, are ignored; at equal generations a `resume` wins
over a `halt` (a release always follows its engage), as in the gateway (control.rs).

Before intake starts, `recover` reads the topic's history once: a runtime (re)started while
a switch covers its agent (a crashed container of a halted agent whose pods were kept,
`scaleToZero: false`) starts halted instead of taking work again, even though the halt
order lies behind its committed offset. The history is the operator's orders, a few per
engage and release.

halt: intake takes no new command at once and pauses its partitions (ack `halted`); each
run in flight finishes its current graph step, is checkpointed and parks at the next step
boundary (`drain`), or is cancelled at once (`abort`: the in-flight model or tool call is
dropped; the last checkpoint stays). A run still busy when `drainTimeoutSeconds` ends is
cancelled too (`forced`). Each gets a `halted` session event; then the ack `drained` lists
them. Their requests stay uncommitted in Kafka.
resume: parked runs go on, cancelled ones restart from their checkpoints, intake resumes;
each halted run gets a `resumed` event; ack `resumed`. A halted run is marked so in the
ledger: when its pod was scaled away (`scaleToZero`), the pod that continues it after the
release sends the `resumed` event instead (runs.py), under the same key.
rotate_keys: the signing key is read again from its mounted file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from fleetward.runtime.config import SigningKey, load_signing_key
from fleetward.runtime.context import RunContext, Services
from fleetward.runtime.intake import Intake
from fleetward.runtime.kafka import AsyncProducer
from fleetward.runtime.persistence import RUN_ACTIVE, RUN_HALTED, halt_mark
from fleetward.runtime.runs import RunRegistry
from fleetward.runtime.telemetry import HALTED

from fleetward.api.envelopes import ControlAck, ControlMessage, EnvelopeError, parse_control

log = logging.getLogger("fleetward.runtime.control")


@dataclass(frozen=True)
class HaltedRun:
    run_id: str
    session_id: str
    trace_id: str
    step: str
    outcome: str
    traceparent: str | None
    halted_by: str
    """The halt's `halt_mark`: the resumed event's key, whoever sends it."""


class Control:
    def __init__(
        self,
        client_config: dict[str, str],
        *,
        services: Services,
        intake: Intake,
        registry: RunRegistry,
        producer: AsyncProducer,
        instance: str,
        group_prefix: str,
    ) -> None:
        self.services = services
        self.client_config = client_config
        self.intake = intake
        self.registry = registry
        self.producer = producer
        self.instance = instance
        self.topic = services.config.topics.control
        self.acks_topic = services.config.topics.control_acks
        self.consumer = Consumer(
            {
                **client_config,
                "group.id": f"{group_prefix}.control.{instance}",
                "client.id": f"{group_prefix}.control.{instance}",
                "enable.auto.commit": False,
                "auto.offset.reset": "latest",
            }
        )
        self.generations: dict[str, int] = {}
        self.sent_at: dict[str, Any] = {}
        self.released: dict[str, bool] = {}
        """Per KillSwitch, whether its last order applied here was a `resume`."""
        self.halted_runs: list[HaltedRun] = []
        self.halted_by: tuple[str, int] | None = None
        self.history_ends: dict[int, int] = {}
        """Per partition, the offset `recover` read the history up to: a new instance's
        consumer starts there, so an order sent between the two is not missed by both."""
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()

    @property
    def agent(self) -> str:
        return self.services.agent

    async def recover(self, within: float = 15.0) -> None:
        """Start halted when the last order of some KillSwitch for this agent is `halt`
        (see the module docstring). No ack: the instance acked when the order came (or the
        switch's drain counted it out)."""
        try:
            last = await asyncio.to_thread(self._last_orders, within)
        except KafkaException as e:
            log.warning("could not read the control topic's history (%s); starting as not halted", e)
            self.history_ends.clear()
            return
        for switch, order in last.items():
            self.generations[switch] = order.generation
            self.sent_at[switch] = order.timestamp
            self.released[switch] = order.type == "resume"
        halts = [o for o in last.values() if o.type == "halt"]
        if halts:
            order = halts[-1]
            self.intake.halt()
            self.registry.halt()
            HALTED.labels(self.agent).set(1)
            self.halted_by = (order.kill_switch, order.generation)
            log.warning(
                "starting halted: KillSwitch %s (generation %d) covers this agent; waiting for its release",
                order.kill_switch,
                order.generation,
            )

    def _last_orders(self, within: float) -> dict[str, ControlMessage]:
        """The last halt or resume for this agent per KillSwitch, from the whole topic (a
        switch's orders share its key, so they are in one partition, in offset order; a
        switch created again under the same name restarts its generations, so the offset,
        not the generation, tells the last one)."""
        deadline = time.monotonic() + within
        reader = Consumer(
            {
                **self.client_config,
                "group.id": f"{self.instance}.control-history.{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        try:
            topic = reader.list_topics(self.topic, timeout=10).topics.get(self.topic)
            if topic is None or topic.error is not None:
                return {}  # no orders were ever sent
            ends: dict[int, int] = {}
            starts: list[TopicPartition] = []
            for p in topic.partitions:
                low, high = reader.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)
                self.history_ends[p] = high
                if high > low:
                    ends[p] = high
                    starts.append(TopicPartition(self.topic, p, low))
            reader.assign(starts)
            last: dict[str, ControlMessage] = {}
            while ends:
                if time.monotonic() > deadline:
                    raise KafkaException(f"the history was not read within {within:.0f} s")
                message = reader.poll(0.5)
                if message is None:
                    continue
                if message.error():
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        ends.pop(message.partition(), None)
                    continue
                if message.offset() >= ends.get(message.partition(), 0) - 1:
                    ends.pop(message.partition(), None)
                try:
                    order = parse_control(message.value() or b"")
                except EnvelopeError:
                    continue
                if order.type == "rotate_keys" or not order.covers(self.agent):
                    continue
                last[order.kill_switch] = order  # read in offset order: the later one wins
            return last
        finally:
            reader.close()

    def _take_all_partitions(self) -> bool:
        """Assign every partition of the control topic at this instance's committed offsets.

        Assigned, not subscribed: the group is this instance's alone, so there is nothing to
        balance, and joining it cost a restarted container the old member's session timeout
        (45 s by default) before the first order could arrive; a halt sent meanwhile waited
        that long. Commits without membership are fine for a group nobody joins. A new
        instance starts where `recover` read the history up to (else at the end of the
        topic), fixed here rather than by
        auto.offset.reset=latest, which is resolved lazily: an order sent right after the
        runtime reported ready would otherwise be skipped. False while the topic has no
        partitions yet."""
        topic = self.consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            return False
        partitions = [TopicPartition(self.topic, p) for p in sorted(topic.partitions)]
        committed = self.consumer.committed(partitions, timeout=10)
        for tp in committed:
            if tp.offset < 0:
                end = self.history_ends.get(tp.partition)
                tp.offset = end if end is not None else self.consumer.get_watermark_offsets(tp, timeout=10)[1]
        self.consumer.assign(committed)
        return True

    async def run(self) -> None:
        while not self.stopping.is_set():
            try:
                if await asyncio.to_thread(self._take_all_partitions):
                    break
                problem = f"topic {self.topic} has no partitions yet"
            except KafkaException as e:
                problem = str(e)
            log.warning("control topic not readable yet (%s); retrying", problem)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 1.0)
        self.ready.set()
        try:
            while not self.stopping.is_set():
                message = await asyncio.to_thread(self.consumer.poll, 0.25)
                if message is None:
                    continue
                if message.error():
                    if message.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("control topic: %s", message.error())
                    continue
                try:
                    order = parse_control(message.value() or b"")
                except EnvelopeError as e:
                    log.warning("ignoring an invalid control message at offset %d: %s", message.offset(), e)
                else:
                    await self.handle(order)
                await asyncio.to_thread(self.consumer.commit, message=message, asynchronous=False)
        finally:
            await asyncio.to_thread(self.consumer.close)

    def _applies(self, order: ControlMessage) -> bool:
        if not order.covers(self.agent):
            return False
        last = self.generations.get(order.kill_switch)
        sent = self.sent_at.get(order.kill_switch)
        # Stale: an older generation sent no later than the last order seen. A KillSwitch
        # deleted and created again under the same name starts at generation 1 again; its
        # orders are newer, and must not be ignored.
        older = last is not None and order.generation < last and (sent is None or order.timestamp <= sent)
        released = order.type == "halt" and order.generation == last and self.released.get(order.kill_switch, False)
        if older or released:
            log.info("ignoring %s of %s generation %d (seen %d)", order.type, order.kill_switch, order.generation, last)
            return False
        self.generations[order.kill_switch] = order.generation
        self.sent_at[order.kill_switch] = order.timestamp
        if order.type in ("halt", "resume"):
            self.released[order.kill_switch] = order.type == "resume"
        return True

    async def handle(self, order: ControlMessage) -> None:
        if not self._applies(order):
            return
        log.info("control: %s from %s (generation %d)", order.type, order.kill_switch, order.generation)
        if order.type == "halt":
            await self._halt(order)
        elif order.type == "resume":
            await self._resume(order)
        else:
            self._rotate_keys()

    async def _ack(self, type_: str, order: ControlMessage, counts: dict[str, int], runs: list[HaltedRun]) -> None:
        ack = ControlAck.new(
            type_,  # type: ignore[arg-type]
            kill_switch=order.kill_switch,
            generation=order.generation,
            instance=self.instance,
            component="runtime",
            agents=[self.agent],
            counts=counts,
            runs=[{"sessionId": r.session_id, "runId": r.run_id, "step": r.step, "outcome": r.outcome} for r in runs],
        )
        await self.producer.send(self.acks_topic, ack.to_json(), key=self.agent)

    async def _halt(self, order: ControlMessage) -> None:
        started = time.monotonic()
        self.intake.halt()
        self.registry.halt()
        HALTED.labels(self.agent).set(1)
        in_flight = list(self.registry.active.values())
        await self._ack("halted", order, {"runsInFlight": len(in_flight)}, [])
        outcomes: dict[str, str] = {}
        if order.halt_mode == "abort":
            for ctx in in_flight:
                outcomes[ctx.run_id] = "aborted"
                if ctx.task is not None:
                    ctx.task.cancel()
        else:
            # Until the order's deadline less the time to force, record and ack the rest, so
            # the drain is over within drainTimeoutSeconds of the engage (SPEC §7).
            timeout = order.drain_wait(time.time())
            waits = {ctx.run_id: asyncio.ensure_future(self._parked_or_done(ctx)) for ctx in in_flight}
            if waits:
                await asyncio.wait(waits.values(), timeout=timeout)
            for ctx in in_flight:
                w = waits[ctx.run_id]
                if w.done():
                    outcomes[ctx.run_id] = "drained"
                else:
                    w.cancel()
                    outcomes[ctx.run_id] = "forced"
                    if ctx.task is not None:
                        ctx.task.cancel()
        runs = []
        for ctx in in_flight:
            if outcomes[ctx.run_id] == "drained" and not ctx.parked:
                continue  # it finished its last step instead of parking: nothing is halted
            mark = halt_mark(order.kill_switch, order.generation)
            run = HaltedRun(
                ctx.run_id, ctx.session_id, ctx.trace_id, ctx.current_step, outcomes[ctx.run_id], ctx.traceparent, mark
            )
            runs.append(run)
            await self._emit_for(
                run,
                f"halted/{order.kill_switch}/{order.generation}",
                "halted",
                {
                    "killSwitch": order.kill_switch,
                    "reason": order.reason,
                    "step": run.step,
                },
            )
            # Recorded, so that a pod that continues the run after the release (this one is
            # scaled away, `scaleToZero`) sends its `resumed` event (runs.py).
            await self._mark(run, RUN_HALTED, mark)
        self.halted_runs = runs
        self.halted_by = (order.kill_switch, order.generation)
        counts = {
            "runsDrained": sum(r.outcome == "drained" for r in runs),
            "runsAborted": sum(r.outcome == "aborted" for r in runs),
            "runsForced": sum(r.outcome == "forced" for r in runs),
            "drainMillis": int((time.monotonic() - started) * 1000),
        }
        await self._ack("drained", order, counts, runs)

    @staticmethod
    async def _parked_or_done(ctx: RunContext) -> None:
        parked = asyncio.ensure_future(ctx.parked_event.wait())
        waits: set[asyncio.Future[Any]] = {parked}
        if ctx.task is not None:
            waits.add(ctx.task)  # type: ignore[arg-type]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            parked.cancel()

    async def _emit_for(self, run: HaltedRun, key: str, type_: str, data: dict[str, Any]) -> None:
        await self.services.events.emit(
            f"{run.run_id}/{key}",
            type_,  # type: ignore[arg-type]
            session_id=run.session_id,
            run_id=run.run_id,
            trace_id=run.trace_id,
            data={k: v for k, v in data.items() if v is not None},
            traceparent=run.traceparent,
        )

    async def _mark(self, run: HaltedRun, status: str, waiting_for: str | None = None) -> None:
        """Best effort: a database error must not cost the drain its ack (or the resume its
        intake); the cost is a `resumed` event missing if another pod continues the run."""
        try:
            await self.services.ledger.set_run_status(run.run_id, status, waiting_for)
        except Exception as e:
            log.warning("could not record run %s as %s: %s", run.run_id, status, e)

    async def _resume(self, order: ControlMessage) -> None:
        runs, self.halted_runs = self.halted_runs, []
        # The resumed events go out before the runs move, so they precede the runs' next events.
        for run in runs:
            halted_by = run.halted_by.removeprefix("killswitch/")
            # The switch that halted it, as a pod continuing it after a restart says (runs.py).
            switch = halted_by.rsplit("/", 1)[0]
            await self._emit_for(run, f"resumed/{halted_by}", "resumed", {"killSwitch": switch})
            await self._mark(run, RUN_ACTIVE)
        self.registry.resume()
        self.intake.resume()
        HALTED.labels(self.agent).set(0)
        await self._ack("resumed", order, {"runsResumed": len(runs)}, [])

    def _rotate_keys(self) -> None:
        config = self.services.config
        key_id_file = Path(config.credentials.signing_key_file).with_name("key-id")
        key_id = config.credentials.key_id
        with contextlib.suppress(OSError):
            key_id = key_id_file.read_text().strip() or key_id
        try:
            fresh = load_signing_key(config)
        except Exception as e:
            log.error("rotate_keys: the signing key could not be read again: %s", e)
            return
        self.services.signing_key = SigningKey(key_id, fresh.private_key)
        log.info("rotate_keys: signing key reloaded (kid %s)", key_id)
