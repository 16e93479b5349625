"""`fleetward sessions tail SESSION_ID`: watch one session's events (SPEC §6).

Reads the session events topic (default fleetward.events) straight from Kafka and prints
the events of one session, one line each: time (UTC), sequence, agent, type, and what
matters for that type. It joins no consumer group and commits nothing: it assigns itself
every partition of the topic and keeps the records keyed with the session id whose
envelope names that session (the same rule as the gateway's resume). Within the session's
partition that is the order the agents produced them in (increasing `sequence`).

Where to start:
  (default)          from the beginning of the topic (as far as retention reaches)
  --since-now        only events produced from now on

When to stop:
  (default)          follow: keep waiting for new events until Ctrl-C
  --no-follow        exit once everything already in the topic has been read
  --until-idle S     follow, but exit after S seconds without a new event of the session
                     (counted once the backlog has been read)
  --timeout S        exit after S seconds in any case (with any of the above)

Kafka: --bootstrap-server, or $KAFKA_BOOTSTRAP (`source .fleetward/dev.env` after
`make up` sets it). For SASL: --security-protocol, --sasl-mechanism, --username and the
password from --password-file or $KAFKA_PASSWORD; any other librdkafka setting with
-X KEY=VALUE.

Output: one line per event; --json prints the envelopes as they are on the topic, one
JSON object per line (for jq). A record keyed with the session that is not a valid
session event is reported on standard error with its partition and offset, and skipped.

Exit codes: 0 when it stops by --no-follow, --until-idle or --timeout; 1 when Kafka
cannot be reached within --connect-timeout, refuses the login, or the topic does not
exist; 2 bad usage (also an unknown -X setting); 130 on Ctrl-C.

Examples:
  source .fleetward/dev.env
  fleetward sessions tail gh-web:7f3c2a
  fleetward sessions tail gh-web:7f3c2a --no-follow --json | jq -c '{type, sequence}'
  fleetward sessions tail gh-web:7f3c2a --since-now --until-idle 60
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from fleetward.api.envelopes import SessionEvent

EXIT_OK, EXIT_KAFKA, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
BOOTSTRAP_ENV, PASSWORD_ENV = "KAFKA_BOOTSTRAP", "KAFKA_PASSWORD"
DEFAULT_TOPIC = "fleetward.events"
TEXT_LIMIT = 300
POLL_SECONDS = 0.5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sessions",
        help="watch sessions: print a session's events from the events topic",
        description="Watch sessions. `fleetward sessions tail SESSION_ID` prints one session's events.",
    )
    ssub = p.add_subparsers(dest="sessions_command", metavar="ACTION", required=True)
    tail = ssub.add_parser(
        "tail",
        help="print one session's events from the events topic (follows until Ctrl-C by default)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tail.add_argument("session_id", metavar="SESSION_ID", help="the session (the events' Kafka key and sessionId)")
    tail.add_argument(
        "--topic", default=DEFAULT_TOPIC, help="the session events topic (default: %(default)s)", metavar="NAME"
    )
    start = tail.add_mutually_exclusive_group()
    start.add_argument(
        "--from-beginning",
        dest="since_now",
        action="store_false",
        default=False,
        help="read the topic from its beginning (the default)",
    )
    start.add_argument(
        "--since-now", action="store_true", default=False, help="only events produced after the command started"
    )
    stop = tail.add_mutually_exclusive_group()
    stop.add_argument(
        "-f",
        "--follow",
        dest="follow",
        action="store_true",
        default=True,
        help="keep waiting for new events until Ctrl-C (the default)",
    )
    stop.add_argument(
        "--no-follow",
        dest="follow",
        action="store_false",
        help="exit once the events already in the topic have been read",
    )
    stop.add_argument(
        "--until-idle",
        type=_seconds,
        metavar="SECONDS",
        help="follow, but exit after SECONDS without a new event of the session (once the backlog is read)",
    )
    tail.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS", help="exit after SECONDS in any case (default: no limit)"
    )
    tail.add_argument("--json", action="store_true", help="print the raw envelopes, one JSON object per line")
    tail.add_argument(
        "--full", action="store_true", help=f"do not shorten long texts (default: cut at {TEXT_LIMIT} characters)"
    )
    _kafka_options(tail)
    tail.set_defaults(handler=run_tail)

    decide = ssub.add_parser(
        "decide",
        help="answer a review a run waits for (approve, edit or reject), as a reviewer",
        description=DECIDE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    decide.add_argument("session_id", metavar="SESSION_ID", help="the session of the run")
    decide.add_argument("run_id", metavar="RUN_ID", help="the run that waits (runId of its approval_required event)")
    decide.add_argument(
        "--agent",
        required=True,
        metavar="NAMESPACE/NAME",
        help="the agent that asked for the review (the approval_required event's agent)",
    )
    decide.add_argument("--decision", required=True, choices=("approve", "edit", "reject"))
    decide.add_argument(
        "--edit",
        metavar="TEXT",
        help="with --decision edit: the new draft text, or for a tool call a JSON object of its arguments",
    )
    decide.add_argument(
        "--reviewer",
        default=os.environ.get("USER") or None,
        help="your identity as recorded in the session and the audit log (default: $USER)",
    )
    decide.add_argument(
        "--request-topic-prefix",
        default="fleetward.requests",
        metavar="PREFIX",
        help="agents' request topics are PREFIX.<namespace>.<name> (default: %(default)s)",
    )
    _kafka_options(decide)
    decide.set_defaults(handler=run_decide)


def _kafka_options(parser: argparse.ArgumentParser) -> None:
    kafka = parser.add_argument_group("Kafka")
    kafka.add_argument(
        "--bootstrap-server",
        metavar="HOST:PORT[,...]",
        help=f"Kafka bootstrap servers (default: ${BOOTSTRAP_ENV})",
    )
    kafka.add_argument(
        "--security-protocol",
        choices=("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"),
        help="default: PLAINTEXT, or SASL_PLAINTEXT with --sasl-mechanism",
    )
    kafka.add_argument("--sasl-mechanism", choices=("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"))
    kafka.add_argument("--username", help="SASL user name")
    kafka.add_argument(
        "--password-file", metavar="FILE", help=f"file holding the SASL password (default: ${PASSWORD_ENV})"
    )
    kafka.add_argument(
        "-X",
        dest="kafka_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other librdkafka setting, e.g. -X ssl.ca.location=ca.pem (repeatable)",
    )
    kafka.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up when Kafka cannot be reached within SECONDS (default: %(default)s)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    return value


# --- Formatting ---------------------------------------------------------------------------------


def _cut(text: str, limit: int | None) -> str:
    if limit is not None and len(text) > limit:
        return f"{text[:limit]}... (+{len(text) - limit} chars)"
    return text


def _quote(text: str, limit: int | None) -> str:
    """A text as one line: JSON-quoted, so newlines and quotes stay visible."""
    if limit is not None and len(text) > limit:
        return f"{json.dumps(text[:limit], ensure_ascii=False)}... (+{len(text) - limit} chars)"
    return json.dumps(text, ensure_ascii=False)


def _compact(value: Any, limit: int | None) -> str:
    return _cut(json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str), limit)


def _when(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def describe(event: SessionEvent, *, limit: int | None = TEXT_LIMIT) -> str:
    """What matters in an event's payload, on one line (without time, agent and type)."""
    d: Any = event.data
    kind = event.type
    if kind == "message":
        return f"{d.role}: {_quote(d.text, limit)}"
    if kind == "status":
        out = d.state
        if d.step:
            out += f" at step {d.step}"
        return out + (f": {_quote(d.detail, limit)}" if d.detail else "")
    if kind == "tool_call":
        return f"{d.tool} {_compact(d.arguments, limit)} (call {d.call_id})"
    if kind == "tool_result":
        took = f", {d.duration_ms} ms" if d.duration_ms is not None else ""
        if not d.ok:
            return f"{d.tool} error: {_quote(d.error or '', limit)} (call {d.call_id}{took})"
        shown = f" {_compact(d.result, limit)}" if d.result is not None else ""
        return f"{d.tool} ok{shown} (call {d.call_id}{took})"
    if kind == "approval_required":
        if d.kind == "draft":
            what = f"draft {_quote(d.draft or '', limit)}"
        elif d.kind == "tool":
            what = f"tool {d.tool}" + (f" {_compact(d.arguments, limit)}" if d.arguments is not None else "")
        else:
            what = f"step {d.step}"
        review = f", review {d.review_id}" if d.review_id else ""
        return (
            f"{what}; reason: {_quote(d.reason, limit)}; run {event.run_id}{review}, waits {d.timeout_seconds} s"
            f" -- answer with: fleetward sessions decide {event.session_id} {event.run_id} --agent {event.agent}"
            " --decision approve|edit|reject; or as a reviewer on the gateway: "
            f'{{"type": "approval_decision", "runId": "{event.run_id}", "decision": "approve|edit|reject"}}'
        )
    if kind == "approval_decision":
        out = f"{d.decision} by {d.reviewer}"
        return out + (f": {_quote(d.edit, limit)}" if d.edit else "")
    if kind == "escalated":
        out = f"to queue {d.queue}: {_quote(d.reason, limit)}"
        return out + (f" (topic {_quote(d.topic, limit)})" if d.topic else "")
    if kind == "resolved":
        out = _quote(d.summary, limit)
        if d.verify and d.verify.url:
            delay = f" after {d.verify.delay_seconds} s" if d.verify.delay_seconds is not None else ""
            out += f" (verify {d.verify.url}{delay})"
        return out
    if kind == "failed":
        out = _quote(d.reason, limit)
        return out + (f" (error: {_quote(d.error, limit)})" if d.error else "")
    if kind == "budget_exceeded":
        out = f"{d.budget}: used {d.used} of {d.limit}"
        return out + (f"; partial answer: {_quote(d.partial, limit)}" if d.partial else "")
    if kind == "halted":
        out = f"by KillSwitch {d.kill_switch}"
        if d.step:
            out += f" after step {d.step}"
        return out + (f": {_quote(d.reason, limit)}" if d.reason else "")
    if kind == "resumed":
        return f"released KillSwitch {d.kill_switch}" if d.kill_switch else "run resumes"
    return ""  # pragma: no cover - EventType is closed


def format_event(event: SessionEvent, *, limit: int | None = TEXT_LIMIT) -> str:
    """One line: time (UTC), #sequence, agent, type, details."""
    head = f"{_when(event.timestamp)}  #{event.sequence:<3} {event.agent:<24} {event.type:<17}"
    return f"{head} {describe(event, limit=limit)}"


def json_line(raw: bytes) -> str:
    """The envelope as produced, on one line (re-serialized only if it spans several)."""
    text = raw.decode("utf-8")
    if "\n" in text or "\r" in text:
        text = json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
    return text


def classify(session_id: str, key: bytes | None, value: bytes | None) -> SessionEvent | str | None:
    """The record's event when it belongs to the session; a warning (str) when it is keyed
    with the session but is no valid event of it; None when it is another session's."""
    if key != session_id.encode("utf-8"):
        return None
    if value is None:
        return "keyed with the session but empty (a tombstone?); skipped"
    try:
        event = SessionEvent.parse(value)
    except ValueError as e:  # EnvelopeError, or bytes that are no UTF-8/JSON
        return f"not a valid session event; skipped: {_cut(' '.join(str(e).split()), 400)}"
    if event.session_id != session_id:
        return f"keyed with the session but its sessionId is {event.session_id!r}; skipped"
    return event


# --- Kafka --------------------------------------------------------------------------------------


class UsageError(Exception):
    pass


DECIDE_HELP = """`fleetward sessions decide SESSION_ID RUN_ID --agent NS/NAME --decision D`: answer the
review a run waits for, from the command line (an operator's tool, for the local demo and for
on-call without a reviewer client; reviewers normally answer on the gateway with an
`approval_decision` frame, where their identity comes from their token).

It produces a `resume` command (fleetward.command.v1) to the agent's request topic, keyed by
the session, with the reviewer's name as the command's user (role reviewer). Whoever may
write to the agents' request topics can therefore act as any reviewer: that is what the
Kafka ACLs are for. A run waiting for several reviews gets the decision for the oldest one.

Examples:
  fleetward sessions decide gh-7f3c2a run-1b2c... --agent githouse/billing --decision approve
  fleetward sessions decide gh-7f3c2a run-1b2c... --agent githouse/billing --decision edit \\
      --edit "lead-dev can now raise the budget."
"""


def run_decide(args: argparse.Namespace) -> int:
    from confluent_kafka import KafkaException, Producer

    from fleetward.api.envelopes import AgentCommand, EnvelopeError

    try:
        if (args.decision == "edit") != (args.edit is not None):
            raise UsageError("--edit goes with --decision edit, and --decision edit needs --edit")
        if not args.reviewer:
            raise UsageError("no reviewer: pass --reviewer NAME ($USER is not set)")
        namespace, sep, name = args.agent.partition("/")
        if not sep or not namespace or not name:
            raise UsageError(f"--agent {args.agent!r}: expected NAMESPACE/NAME")
        cfg = kafka_config(args)
        data: dict[str, Any] = {"runId": args.run_id, "decision": args.decision, "reviewer": args.reviewer}
        if args.edit is not None:
            data["edit"] = args.edit
        command = AgentCommand.new(
            "resume",
            session_id=args.session_id,
            agent=args.agent,
            idempotency_key=f"cli-decide-{uuid.uuid4().hex}",
            user={"sub": args.reviewer, "role": "reviewer"},
            data=data,
        )
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except EnvelopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    topic = f"{args.request_topic_prefix}.{namespace}.{name}"
    producer = Producer({**cfg, "enable.idempotence": True, "acks": "all", "logger": _quiet_logger()})
    outcome: dict[str, Any] = {}

    def report(err: Any, msg: Any) -> None:
        outcome["error"] = err
        if err is None:
            outcome["at"] = f"{msg.partition()}:{msg.offset()}"

    try:
        producer.produce(topic, command.to_json().encode(), key=args.session_id.encode(), on_delivery=report)
        producer.flush(args.connect_timeout)
    except KafkaException as e:
        print(f"error: could not send to {topic} on {cfg['bootstrap.servers']}: {_why(e)}", file=sys.stderr)
        return EXIT_KAFKA
    if "at" not in outcome:
        why = outcome.get("error") or f"no acknowledgement within {args.connect_timeout:g} s"
        print(f"error: could not send to {topic} on {cfg['bootstrap.servers']}: {why}", file=sys.stderr)
        return EXIT_KAFKA
    print(f"sent {args.decision} for run {args.run_id} by {args.reviewer} to {topic} at {outcome['at']}")
    return EXIT_OK


def kafka_config(args: argparse.Namespace) -> dict[str, Any]:
    """librdkafka settings from the options and the environment."""
    bootstrap = args.bootstrap_server or os.environ.get(BOOTSTRAP_ENV)
    if not bootstrap:
        raise UsageError(
            f"no Kafka: pass --bootstrap-server or set ${BOOTSTRAP_ENV} (after `make up`: source .fleetward/dev.env)"
        )
    cfg: dict[str, Any] = {"bootstrap.servers": bootstrap}
    protocol = args.security_protocol or ("SASL_PLAINTEXT" if args.sasl_mechanism else None)
    if protocol:
        cfg["security.protocol"] = protocol
    if args.sasl_mechanism:
        if not args.username:
            raise UsageError("--sasl-mechanism needs --username")
        if args.password_file:
            try:
                with open(args.password_file, encoding="utf-8") as f:
                    password = f.read().strip()
            except OSError as e:
                raise UsageError(f"--password-file {args.password_file}: {e.strerror}") from None
        else:
            password = os.environ.get(PASSWORD_ENV)
            if not password:
                raise UsageError(f"--sasl-mechanism needs --password-file or ${PASSWORD_ENV}")
        cfg.update({"sasl.mechanism": args.sasl_mechanism, "sasl.username": args.username, "sasl.password": password})
    elif args.username or args.password_file:
        raise UsageError("--username and --password-file go with --sasl-mechanism")
    for option in args.kafka_options:
        name, sep, value = option.partition("=")
        if not sep or not name:
            raise UsageError(f"-X {option!r}: expected KEY=VALUE")
        cfg[name.strip()] = value
    return cfg


def _quiet_logger() -> logging.Logger:
    """librdkafka logs connection failures to stderr by itself; the command reports them."""
    log = logging.getLogger("fleetward.sessions.kafka")
    log.propagate = False
    if not log.handlers:
        log.addHandler(logging.NullHandler())
    return log


def run_tail(args: argparse.Namespace) -> int:
    from confluent_kafka import KafkaException

    try:
        cfg = kafka_config(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    bootstrap = cfg["bootstrap.servers"]
    try:
        return _tail(args, cfg)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except KafkaException as e:
        print(f"error: Kafka at {bootstrap}: {_why(e)}", file=sys.stderr)
        return EXIT_KAFKA
    except BrokenPipeError:  # `fleetward sessions tail ... | head`
        # So the interpreter's final flush of stdout does not fail again (Python docs, signal).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _why(e: Exception) -> str:
    first = e.args[0] if e.args else None
    return first.str() if hasattr(first, "str") else str(e)


class _Errors:
    """Kafka errors reported through error_cb: a notice per outage, not per retry. Only
    errors that mean no events can come (every broker down, authentication refused) are
    shown; librdkafka reconnects by itself after single disconnects."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka import KafkaError

        self.bootstrap = bootstrap
        self.serious = {KafkaError._ALL_BROKERS_DOWN, KafkaError._AUTHENTICATION}
        self.fatal: str | None = None
        self.last: str | None = None
        self.refused = False
        self.transport: str | None = None
        self.warned = False

    def __call__(self, err: Any) -> None:
        from confluent_kafka import KafkaError

        if err.fatal():
            self.fatal = err.str()
        if err.code() == KafkaError._TRANSPORT and self.transport is None:
            self.transport = err.str()  # e.g. "Connect to ipv4#127.0.0.1:9092 failed: Connection refused"
        if err.fatal() or err.code() in self.serious:
            self.last = err.str()
            self.refused = err.code() == KafkaError._AUTHENTICATION

    def reset(self) -> None:
        self.last, self.refused, self.warned = None, False, False

    def warn_once(self) -> None:
        if self.last and not self.warned:
            _warn(f"Kafka at {self.bootstrap}: {self.last} (still trying)")
            self.warned = True


def _warn(message: str) -> None:
    sys.stdout.flush()
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _tail(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

    bootstrap = cfg["bootstrap.servers"]
    started = time.monotonic()
    deadline = started + args.timeout if args.timeout else None
    errors = _Errors(bootstrap)
    settings = {
        **cfg,
        # Never used for commits: partitions are assigned, not subscribed.
        "group.id": f"fleetward-sessions-tail-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "client.id": "fleetward-sessions-tail",
        "log.connection.close": False,
        "error_cb": errors,
        "logger": _quiet_logger(),
    }
    try:
        consumer = Consumer(settings)
    except (KafkaException, ValueError, TypeError) as e:  # e.g. a misspelt -X setting
        print(f"error: Kafka settings: {_why(e)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            md = consumer.list_topics(args.topic, timeout=args.connect_timeout)
        except KafkaException as e:
            consumer.poll(0.2)  # serves error_cb: the cause (refused login, connection refused, ...)
            why = (errors.last if errors.refused else errors.transport or errors.last) or _why(e)
            if errors.refused:
                print(f"error: Kafka at {bootstrap} refused the login: {why}", file=sys.stderr)
            else:
                print(
                    f"error: cannot reach Kafka at {bootstrap} within {args.connect_timeout:g} s: {why}",
                    file=sys.stderr,
                )
            return EXIT_KAFKA
        topic = md.topics.get(args.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            why = f" ({topic.error.str()})" if topic is not None and topic.error is not None else ""
            print(f"error: topic {args.topic} does not exist on Kafka at {bootstrap}{why}", file=sys.stderr)
            return EXIT_KAFKA
        errors.reset()
        partitions = sorted(topic.partitions)
        # The backlog: what is in each partition now. --no-follow stops there; --until-idle
        # starts counting once it has been read.
        ends: dict[int, int] = {}
        starts: dict[int, int] = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(args.topic, p), timeout=args.connect_timeout)
            ends[p] = high if not args.since_now and high > low else 0
            # --since-now starts at the end read here, not at OFFSET_END: librdkafka resolves
            # that only at the first fetch, and events produced until then would be skipped.
            starts[p] = high if args.since_now else OFFSET_BEGINNING
        consumer.assign([TopicPartition(args.topic, p, starts[p]) for p in partitions])
        pending = {p for p in partitions if ends[p] > 0}
        follow = args.follow or args.until_idle is not None
        limit = None if args.full else TEXT_LIMIT
        last_event = None  # monotonic time of the session's last event, or when the backlog was read
        if not pending:
            last_event = time.monotonic()
        seen: set[str] = set()
        last_error: str | None = None
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return EXIT_OK
            if not pending and not follow:
                return EXIT_OK
            if args.until_idle is not None and last_event is not None and now - last_event >= args.until_idle:
                return EXIT_OK
            wait = POLL_SECONDS
            if deadline is not None:
                wait = min(wait, max(deadline - now, 0.01))
            msg = consumer.poll(wait)
            if msg is None:
                errors.warn_once()
                if errors.fatal:
                    print(f"error: Kafka at {bootstrap}: {errors.fatal}", file=sys.stderr)
                    return EXIT_KAFKA
                continue
            errors.reset()
            err = msg.error()
            p = msg.partition()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if p in pending and msg.offset() >= ends.get(p, 0):
                        pending.discard(p)
                        if not pending and last_event is None:
                            last_event = time.monotonic()
                    continue
                if err.fatal():
                    raise KafkaException(err)
                if err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
                    # librdkafka looks up the coordinator of the (unused) group.id; a
                    # principal with no group ACL is refused that, and needs none.
                    continue
                if err.str() != last_error:  # once, not on every poll
                    _warn(f"Kafka at {bootstrap}: {err.str()}")
                last_error = err.str()
                continue
            last_error = None
            offset = msg.offset()
            if p in pending and offset + 1 >= ends[p]:
                pending.discard(p)
                if not pending and last_event is None:
                    last_event = time.monotonic()
            found = classify(args.session_id, msg.key(), msg.value())
            if found is None:
                continue
            if isinstance(found, str):
                _warn(f"{args.topic} partition {p} offset {offset}: {found}")
                continue
            if args.json:
                try:
                    line = json_line(msg.value())
                except ValueError:  # parsed as an event, so this cannot really happen
                    line = found.to_json()
            else:
                line = format_event(found, limit=limit)
                if found.id in seen:
                    line += "  (repeated: this event was shown before)"
            seen.add(found.id)
            print(line, flush=True)
            if not pending:
                last_event = time.monotonic()
    finally:
        consumer.close()
