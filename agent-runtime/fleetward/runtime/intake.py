"""Durable intake from the agent's request topic (SPEC §4): a consumer group per agent,
key = session id, offsets committed only when the run reached a durable resting point.

- One worker per assigned partition takes that partition's commands in order, one at a
  time: a session's commands (one key, one partition) never overtake each other.
- A command's offset is committed after its run reached a durable checkpoint at which it
  rests: completed, failed, or waiting at an interrupt (a human's answer arrives later as
  its own command). A duplicate (same idempotency key, see the ledger) is committed
  without running again.
- A malformed command, or one that cannot be served, goes to the dead-letter topic with
  the reason; its offset is committed and the worker moves on.
- So does a command whose run failed for good (the model chain exhausted, an unexpected
  error; runs.py sends the user a degradation message and `failed`), with the run's
  history: the executor calls `dead_letter_failed_run` before the command is marked done.
- Stopping (SIGTERM, a lost partition): runs stop at their next step boundary, after the
  current step is checkpointed; their commands and everything not started stay
  uncommitted, so whoever owns the partition next picks them up from the checkpoint.
- Halt (control.py): no command is started; running ones park at a step boundary;
  partitions are paused. Resume restarts from there.

The consumer is confined to one thread of its own (`ConsumerThread`): every call on it
(poll, commit, pause, resume, close, and the rebalance callbacks) is made there. Since
confluent-kafka-python 2.16 a Consumer has a reentrancy gate: a call from another thread
waits until the thread inside the consumer leaves it. With `poll(0.25)` run through
`asyncio.to_thread` over and over, a commit made from another pool thread waited one or
more whole poll timeouts (measured: 0.1-5 s per commit, in steps of 0.25 s; a probe with a
thread polling without pause never got its commit through), and the partition's next
command waited for that commit: the "stalls before a run starts" of docs/bench/runtime.md.
A pause or resume made from the event loop blocked the loop the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from fleetward.runtime.kafka import AsyncProducer, header_value
from fleetward.runtime.runs import Delivery, Outcome, Rejected, RunExecutor, RunRegistry
from fleetward.runtime.telemetry import REQUESTS

from fleetward.api.envelopes import EnvelopeError, parse_command

log = logging.getLogger("fleetward.runtime.intake")

QUEUE_PAUSE_AT = 8
"""Fetched-but-unstarted commands per partition above which the partition is paused."""

POLL_TIMEOUT = 0.1
"""How long the consumer thread waits in one poll: also how late a pause, resume or commit
(queued for the thread) can be carried out. A message ends the wait at once."""
POLL_BATCH = 100
"""Messages taken from the consumer's local queue in one go (handed to the loop together)."""
COMMIT_RETRY_SECONDS = 1.0
REVOKE_TIMEOUT = 20.0


def consumer_config(client_config: dict[str, str], group: str, instance: str) -> dict[str, Any]:
    return {
        **client_config,
        "group.id": group,
        "client.id": f"{group}.{instance}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
        # A run may take long; the poll loop keeps polling, so this only bounds a stuck process.
        "max.poll.interval.ms": 300000,
    }


def dead_letter(
    message: Message, reason: str, agent: str, history: dict[str, Any] | None = None
) -> tuple[str, dict[str, str]]:
    """The DLQ record: the original command (verbatim, as text) with where it came from and
    why; for a command whose run failed, also the run's `history` (runs.py `_history`)."""
    raw = message.value() or b""
    body = {
        "reason": reason,
        "agent": agent,
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "key": message.key().decode(errors="replace") if message.key() else None,
        "value": raw.decode(errors="replace"),
        "deadLetteredAt": datetime.now(UTC).isoformat(),
    }
    if history is not None:
        body["history"] = history
    headers = {
        "fleetward-dlq-kind": "run_failed" if history is not None else "rejected",
        "fleetward-dlq-reason": reason[:1000],
        "fleetward-original-topic": message.topic() or "",
        "fleetward-original-partition": str(message.partition()),
        "fleetward-original-offset": str(message.offset()),
    }
    return json.dumps(body, ensure_ascii=False), headers


class ConsumerThread:
    """The one thread that uses a Consumer (see the module docstring): polls it, hands what
    it fetched to the event loop in batches (one wake-up of the loop per batch, not a thread
    pool hop per poll), and carries out what the loop asks of the consumer between polls.

    Offsets to commit are coalesced per partition (the highest wins: a worker commits its
    partition's offsets in order) and committed synchronously from this thread, where a
    commit takes a broker round trip (~2 ms) instead of waiting for a poll to end. The
    partition worker does not wait for it: its run is already durable and its request
    marked done in the ledger, so a commit lost to a crash only redelivers a command that
    the ledger answers as a duplicate (committed then without running again)."""

    def __init__(
        self,
        consumer: Consumer,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[list[Message]], None],
        *,
        name: str = "kafka-intake",
    ) -> None:
        self.consumer = consumer
        self.loop = loop
        self.deliver = deliver
        self._ops: queue.SimpleQueue[tuple[Callable[[Consumer], Any], concurrent.futures.Future[Any] | None]] = (
            queue.SimpleQueue()
        )
        self._commits: dict[tuple[str, int], int] = {}
        self._commits_lock = threading.Lock()
        self._commit_retry_at = 0.0
        self._stop = threading.Event()
        self.finished: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- called from any thread ------------------------------------------------------------

    def call(self, fn: Callable[[Consumer], Any]) -> None:
        """Run `fn(consumer)` on the consumer thread soon (before its next poll); errors are logged."""
        self._ops.put((fn, None))

    def commit(self, topic: str, partition: int, offset: int) -> None:
        """Commit `offset` (the next one to read) for the partition, soon, from the consumer thread."""
        with self._commits_lock:
            key = (topic, partition)
            if offset > self._commits.get(key, -1):
                self._commits[key] = offset

    def stop(self) -> None:
        """Commit what is pending, close the consumer and end the thread (`finished` resolves)."""
        self._stop.set()

    # -- the consumer thread -------------------------------------------------------------------

    def _main(self) -> None:
        error: BaseException | None = None
        try:
            while not self._stop.is_set():
                self.serve()
                message = self.consumer.poll(POLL_TIMEOUT)
                if message is None:
                    continue
                batch = [message, *self.consumer.consume(POLL_BATCH - 1, 0)]
                self.loop.call_soon_threadsafe(self.deliver, batch)
            self.serve(final=True)
        except BaseException as e:  # a rebalance callback or the client failed: intake ends with it
            error = e
        finally:
            try:
                self.consumer.close()
            except Exception as e:
                log.warning("closing the request topic consumer: %s", e)
            self._fail_pending_ops()
            try:
                self.loop.call_soon_threadsafe(self._settle, error)
            except RuntimeError:  # the event loop is closed: nobody waits any more
                pass

    def _settle(self, error: BaseException | None) -> None:
        if self.finished.done():
            return
        if error is None:
            self.finished.set_result(None)
        else:
            self.finished.set_exception(error)

    def serve(self, *, final: bool = False) -> None:
        """Carry out queued calls and pending commits (on the consumer thread only)."""
        while True:
            try:
                fn, future = self._ops.get_nowait()
            except queue.Empty:
                break
            if future is not None and not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(self.consumer)
            except Exception as e:
                if future is not None:
                    future.set_exception(e)
                else:
                    log.warning("request topic consumer: %s", e)
            else:
                if future is not None:
                    future.set_result(result)
        self._commit_pending(force=final)

    def _commit_pending(self, *, force: bool = False) -> None:
        if not force and time.monotonic() < self._commit_retry_at:
            return
        with self._commits_lock:
            pending, self._commits = self._commits, {}
        if not pending:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in pending.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            self._commit_retry_at = 0.0
        except Exception as e:
            # Try again later, for the partitions still ours (a newer offset wins). Left
            # uncommitted, a command is redelivered and answered by the ledger as a duplicate.
            try:
                assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
            except Exception:
                assigned = set(pending)
            with self._commits_lock:
                for key, offset in pending.items():
                    if key in assigned and offset > self._commits.get(key, -1):
                        self._commits[key] = offset
            self._commit_retry_at = time.monotonic() + COMMIT_RETRY_SECONDS
            log.warning("committing offsets %s failed (retried while assigned): %s", pending, e)

    def _fail_pending_ops(self) -> None:
        while True:
            try:
                _, future = self._ops.get_nowait()
            except queue.Empty:
                return
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the request topic consumer is closed"))

    def wait_serving(self, future: concurrent.futures.Future[Any], timeout: float) -> None:
        """Wait (in a rebalance callback, on the consumer thread) for `future`, carrying out
        queued calls and commits meanwhile: the offsets of runs that finish while their
        partition is being revoked are committed before the partition is given up."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                future.result(timeout=0.02)
                break
            except concurrent.futures.TimeoutError:
                if time.monotonic() >= deadline:
                    raise
                self.serve()
        self.serve(final=True)


@dataclass
class PartitionWorker:
    partition: int
    queue: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    revoked: bool = False
    paused: bool = False


class Intake:
    def __init__(
        self,
        client_config: dict[str, str],
        *,
        topic: str,
        group: str,
        dlq_topic: str,
        instance: str,
        executor: RunExecutor,
        registry: RunRegistry,
        producer: AsyncProducer,
    ) -> None:
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.executor = executor
        self.registry = registry
        self.producer = producer
        self.consumer = Consumer(consumer_config(client_config, group, instance))
        self._consumer_thread: ConsumerThread | None = None
        self.workers: dict[int, PartitionWorker] = {}
        self.stopping = asyncio.Event()
        self.resumed = asyncio.Event()
        self.resumed.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.assigned = asyncio.Event()
        if executor.dead_letter is None:
            executor.dead_letter = self.dead_letter_failed_run

    @property
    def agent(self) -> str:
        return self.executor.agent

    # -- consumer callbacks (run on the polling thread) ---------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._assigned, [p.partition for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._loop is not None and self._consumer_thread is not None
        future = asyncio.run_coroutine_threadsafe(self._revoked([p.partition for p in partitions]), self._loop)
        try:  # let in-flight runs reach a step boundary first (and commit what finished)
            self._consumer_thread.wait_serving(future, REVOKE_TIMEOUT)
        except Exception as e:
            log.warning("revoking partitions %s: %s", [p.partition for p in partitions], e)

    def _assigned(self, partitions: list[int]) -> None:
        for p in partitions:
            worker = PartitionWorker(p)
            self.workers[p] = worker
            worker.task = asyncio.create_task(self._work(worker), name=f"intake-p{p}")
        log.info("assigned partitions %s of %s", partitions, self.topic)
        if not self.resumed.is_set():
            self._pause_all()
        self.assigned.set()

    async def _revoked(self, partitions: list[int]) -> None:
        workers = [self.workers.pop(p) for p in partitions if p in self.workers]
        log.info("revoking partitions %s of %s: runs in flight stop at their next step", partitions, self.topic)
        for w in workers:
            w.revoked = True
            for ctx in list(self.registry.active.values()):
                if ctx.partition == w.partition:
                    ctx.gate.stop.set()
        tasks = [w.task for w in workers if w.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=15)
            for t in pending:
                t.cancel()
        log.info("revoked partitions %s of %s", partitions, self.topic)

    # -- the loop ------------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        thread = self._consumer_thread = ConsumerThread(self.consumer, self._loop, self._dispatch)
        thread.start()
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            # Until stopped, or until the consumer thread ended by itself (its error ends intake).
            await asyncio.wait([stopping, thread.finished], return_when=asyncio.FIRST_COMPLETED)
            if thread.finished.done():
                thread.finished.result()
        finally:
            stopping.cancel()
            await self._shutdown()

    def _dispatch(self, messages: list[Message]) -> None:
        """Messages fetched by the consumer thread, in order: each to its partition's worker
        (on the event loop; assignment callbacks were scheduled before, so they have run)."""
        for message in messages:
            if message.error():
                if message.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("request topic: %s", message.error())
                continue
            worker = self.workers.get(message.partition())
            if worker is None:
                log.warning("message for unassigned partition %d dropped (it stays uncommitted)", message.partition())
                continue
            worker.queue.put_nowait(message)
            if worker.queue.qsize() >= QUEUE_PAUSE_AT and not worker.paused:
                self._pause([worker.partition])
                worker.paused = True

    def _on_consumer_thread(self, fn: Callable[[Consumer], Any]) -> None:
        if self._consumer_thread is not None:
            self._consumer_thread.call(fn)
        else:  # not started yet: nobody else uses the consumer
            fn(self.consumer)

    def _pause(self, partitions: list[int]) -> None:
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self._on_consumer_thread(lambda c: c.pause(tps))

    def _resume(self, partitions: list[int]) -> None:
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self._on_consumer_thread(lambda c: c.resume(tps))

    def _pause_all(self) -> None:
        if self.workers:
            self._pause(list(self.workers))

    def halt(self) -> None:
        """Take no new command; runs in flight park at their next step (registry.halt)."""
        self.resumed.clear()
        self._pause_all()

    def resume(self) -> None:
        self.resumed.set()
        self._resume([p for p, w in self.workers.items() if not w.paused])

    async def _shutdown(self) -> None:
        workers = list(self.workers.values())
        self.registry.stop_all()
        tasks = [w.task for w in workers if w.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.shutdown_timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        thread = self._consumer_thread
        if thread is not None:
            thread.stop()  # commits what the workers left pending, then closes the consumer
            try:
                await asyncio.shield(thread.finished)
            except Exception as e:
                log.warning("request topic consumer ended with: %r", e)
        else:
            self.consumer.close()

    shutdown_timeout: float = 20.0

    # -- one partition ---------------------------------------------------------------------------------

    async def _work(self, worker: PartitionWorker) -> None:
        while not (self.stopping.is_set() or worker.revoked):
            try:
                message = await asyncio.wait_for(worker.queue.get(), 0.5)
            except TimeoutError:
                continue
            if worker.paused and worker.queue.qsize() < QUEUE_PAUSE_AT // 2 and self.resumed.is_set():
                self._resume([worker.partition])
                worker.paused = False
            failures = 0
            while True:
                if not await self._wait_resumed(worker):
                    return  # stopping: the command stays uncommitted
                task = asyncio.create_task(self._process(message, worker.partition))
                try:
                    outcome = await asyncio.shield(task)
                except asyncio.CancelledError:
                    if task.cancelled() and not (self.stopping.is_set() or worker.revoked):
                        # cancelled by a kill switch in abort mode: redo it from its checkpoint after resume
                        log.info("run of offset %d aborted; it resumes from its checkpoint", message.offset())
                        continue
                    task.cancel()
                    raise
                except Exception:
                    # A fault outside the run (e.g. the database briefly refusing a write) must
                    # not end this partition's worker: the command is still uncommitted, and
                    # the request ledger makes a retry safe (it continues from its checkpoint).
                    failures += 1
                    delay = min(30.0, 0.2 * 2 ** min(failures, 8))
                    log.exception(
                        "command at partition %d offset %d failed outside its run (attempt %d); retrying in %.1f s",
                        worker.partition,
                        message.offset(),
                        failures,
                        delay,
                    )
                    try:
                        await asyncio.wait_for(self.stopping.wait(), delay)
                        return  # stopping: the command stays uncommitted
                    except TimeoutError:
                        continue
                break
            REQUESTS.labels(self.agent, outcome.value).inc()
            if not outcome.final:
                return  # stopped at a step boundary: leave it (and what follows) uncommitted
            # Committed by the consumer thread, without waiting here (see ConsumerThread).
            assert self._consumer_thread is not None
            self._consumer_thread.commit(self.topic, worker.partition, message.offset() + 1)

    async def _wait_resumed(self, worker: PartitionWorker) -> bool:
        while not self.resumed.is_set():
            if self.stopping.is_set() or worker.revoked:
                return False
            try:
                await asyncio.wait_for(self.resumed.wait(), 0.5)
            except TimeoutError:
                pass
        return not (self.stopping.is_set() or worker.revoked)

    async def _process(self, message: Message, partition: int) -> Outcome:
        traceparent = header_value(message.headers(), "traceparent")
        try:
            command = parse_command(message.value() or b"")
        except EnvelopeError as e:
            await self._dead_letter(message, str(e), [p for p, _ in e.problems])
            return Outcome.FAILED
        try:
            return await self.executor.handle(Delivery(command, traceparent, partition, source=message))
        except Rejected as e:
            await self._dead_letter(message, str(e), [str(e).split(":", 1)[0]])
            return Outcome.FAILED

    async def dead_letter_failed_run(self, delivery: Delivery, reason: str, history: dict[str, Any]) -> None:
        """The executor's dead-letter sink for a run that failed for good."""
        if delivery.source is None:
            log.error("run %s failed but its command has no Kafka record to dead-letter", history.get("runId"))
            return
        await self._dead_letter(delivery.source, reason, ["run"], history)

    async def _dead_letter(
        self, message: Message, reason: str, fields: list[str], history: dict[str, Any] | None = None
    ) -> None:
        value, headers = dead_letter(message, reason, self.agent, history)
        await self.producer.send(
            self.dlq_topic,
            value,
            key=message.key().decode(errors="replace") if message.key() else None,
            headers=headers,
        )
        REQUESTS.labels(self.agent, "dead_lettered").inc()
        # The reason can quote the input; the log names only the offending fields.
        log.warning(
            "command at %s[%d]@%d dead-lettered (fields: %s)",
            message.topic(),
            message.partition(),
            message.offset(),
            ", ".join(fields) or "-",
        )
