"""Kafka for the operator: topics (shared and per Agent) and, when the cluster runs
SASL/SCRAM with an authorizer, a SCRAM user and ACLs per Agent.

confluent-kafka's AdminClient is synchronous (futures); calls run in worker threads so
the operator's event loop never blocks. Topic creations that arrive together are sent
as one request, which matters when 1000 Agents are applied at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)
from fleetward.operator.settings import KafkaSettings

log = logging.getLogger("fleetward.operator.kafka")


class KafkaUnavailable(Exception):
    """Kafka did not answer or refused the operator's admin request."""


@dataclass(frozen=True)
class AgentAccess:
    """What one Agent's principal may do (least privilege, SPEC §3)."""

    principal: str
    read_topics: tuple[str, ...]
    write_topics: tuple[str, ...]
    group_prefix: str
    """Its consumer groups: this one and the groups under it ("" for none)."""

    @classmethod
    def reporting(cls, principal: str, group_prefix: str, *, control: str, events: str, acks: str) -> AgentAccess:
        """Under a kill switch until the drain is over: the runtime must still hear the halt
        (read the control topic, in its control consumer's group) and report (write its
        `halted` events and drain acks). Its request topic, and every other write, are gone.
        (The halt is published after the revocation, so without these the runtime never
        heard it and its pods were stopped by force at the drain timeout.) Group READ alone
        gives nothing without READ on a topic."""
        return cls(principal, (control,), (events, acks), group_prefix)

    def bindings(self) -> set[tuple[ResourceType, str, ResourcePatternType, AclOperation]]:
        """(resource type, name, pattern type, operation) tuples, all ALLOW for this principal."""
        topic, group = ResourceType.TOPIC, ResourceType.GROUP
        literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
        out = set()
        for t in self.read_topics:
            out |= {(topic, t, literal, AclOperation.READ), (topic, t, literal, AclOperation.DESCRIBE)}
        for t in self.write_topics:
            out |= {(topic, t, literal, AclOperation.WRITE), (topic, t, literal, AclOperation.DESCRIBE)}
        # Its own group, and groups under it ("<group>.control.<pod>"); the dot keeps agent
        # "a" out of agent "ab"'s groups (Agent names cannot contain dots).
        if not self.group_prefix:
            return out
        out.add((group, self.group_prefix, literal, AclOperation.READ))
        out.add((group, f"{self.group_prefix}.", prefixed, AclOperation.READ))
        return out


class KafkaAdmin:
    def __init__(self, settings: KafkaSettings):
        self.settings = settings
        self._admin: AdminClient | None = None
        self._known_topics: set[str] = set()
        self._known_at = 0.0
        self._pending: dict[str, int] = {}
        self._waiters: list[tuple[set[str], asyncio.Future]] = []
        self._configs: dict[str, dict[str, str]] = {}  # topic config to create a topic with
        self._batch_task: asyncio.Task | None = None
        self._listing: asyncio.Task | None = None

    @property
    def admin(self) -> AdminClient:
        if self._admin is None:
            cfg = {**self.settings.admin_config(), "socket.timeout.ms": int(self.settings.timeout_seconds * 1000)}
            self._admin = AdminClient(cfg)
        return self._admin

    async def _call(self, fn, *args, **kwargs) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except KafkaException as e:
            raise KafkaUnavailable(str(e.args[0]) if e.args else repr(e)) from e
        except ValueError as e:  # the admin client cannot be built (e.g. SASL without a password)
            raise KafkaUnavailable(str(e)) from e

    def _errors(self, futures: dict[Any, Any], ignore: tuple[int, ...] = ()) -> dict[str, str]:
        """Per-key errors of admin futures (keys whose error is in `ignore` count as done)."""
        out: dict[str, str] = {}
        for key, fut in futures.items():
            try:
                fut.result(self.settings.timeout_seconds)
            except KafkaException as e:
                err = e.args[0]
                if not (isinstance(err, KafkaError) and err.code() in ignore):
                    out[str(key)] = str(err)
            except Exception as e:  # concurrent.futures.TimeoutError and friends
                out[str(key)] = repr(e)
        return out

    def _wait_all(self, futures: dict[Any, Any], ignore: tuple[int, ...] = ()) -> None:
        errors = self._errors(futures, ignore)
        if errors:
            raise KafkaUnavailable("; ".join(f"{k}: {e}" for k, e in errors.items()))

    # -- topics -------------------------------------------------------------------------

    async def refresh_topics(self) -> set[str]:
        """The broker's topic list, read again. Callers that arrive while a read is in
        flight share it: when the cache expires during a burst of reconciles, one metadata
        request for every topic goes out, not one per reconcile (each a thread of the
        default pool, blocked for the broker's answer)."""
        if self._listing is None or self._listing.done():
            self._listing = asyncio.create_task(self._list_topics())
        return await asyncio.shield(self._listing)

    async def _list_topics(self) -> set[str]:
        md = await self._call(lambda: self.admin.list_topics(timeout=self.settings.timeout_seconds))
        self._known_topics = set(md.topics)
        self._known_at = time.monotonic()
        return set(md.topics)  # the callers' copy: the cache grows as topics are created

    async def ensure_topics(
        self, names: list[str], partitions: int, configs: dict[str, dict[str, str]] | None = None
    ) -> None:
        """Create the topics that do not exist (with `configs[name]` as their topic config);
        concurrent calls share one request. An existing topic's config is left alone."""
        self._configs.update(configs or {})
        if time.monotonic() - self._known_at > 60:
            await self.refresh_topics()
        missing = {n for n in names if n not in self._known_topics}
        if not missing:
            return
        fut = asyncio.get_running_loop().create_future()
        for n in missing:
            self._pending[n] = partitions
        self._waiters.append((missing, fut))
        if self._batch_task is None or self._batch_task.done():
            self._batch_task = asyncio.create_task(self._create_batch())
        await fut

    async def _create_batch(self) -> None:
        # Loops until nothing is pending: requests that arrive while a batch is in flight
        # are sent in the next round, never left waiting.
        while self._pending:
            await asyncio.sleep(0.05)
            pending, waiters = self._pending, self._waiters
            self._pending, self._waiters = {}, []
            errors: dict[str, str] = {}
            try:
                rf = self.settings.replication_factor
                topics = [NewTopic(n, p, rf, config=self._configs.get(n, {})) for n, p in sorted(pending.items())]
                futures = await self._call(
                    self.admin.create_topics, topics, request_timeout=self.settings.timeout_seconds
                )
                errors = await asyncio.to_thread(self._errors, futures, (KafkaError.TOPIC_ALREADY_EXISTS,))
            except KafkaUnavailable as e:
                errors = {n: str(e) for n in pending}
            self._known_topics |= {n for n in pending if n not in errors}
            # Each caller hears about its own topics only: one bad topic fails no one else.
            for names, fut in waiters:
                if fut.done():
                    continue
                mine = {n: errors[n] for n in names if n in errors}
                if mine:
                    fut.set_exception(KafkaUnavailable("; ".join(f"{n}: {e}" for n, e in mine.items())))
                else:
                    fut.set_result(None)

    async def delete_topic(self, name: str) -> None:
        futures = await self._call(self.admin.delete_topics, [name], request_timeout=self.settings.timeout_seconds)
        await asyncio.to_thread(self._wait_all, futures, (KafkaError.UNKNOWN_TOPIC_OR_PART,))
        self._known_topics.discard(name)

    # -- principals (SCRAM mode) ----------------------------------------------------------

    def _mechanism(self) -> ScramMechanism:
        return (
            ScramMechanism.SCRAM_SHA_512
            if self.settings.agent_sasl_mechanism == "SCRAM-SHA-512"
            else ScramMechanism.SCRAM_SHA_256
        )

    async def ensure_principal(self, username: str, password: str) -> None:
        upsert = UserScramCredentialUpsertion(username, ScramCredentialInfo(self._mechanism(), 8192), password.encode())
        futures = await self._call(self.admin.alter_user_scram_credentials, [upsert])
        await asyncio.to_thread(self._wait_all, futures)

    async def delete_user(self, username: str) -> None:
        """Delete the SCRAM credential: no new logins (open connections keep theirs, which
        is why the ACLs are what revokes access at once)."""
        deletion = UserScramCredentialDeletion(username, self._mechanism())
        futures = await self._call(self.admin.alter_user_scram_credentials, [deletion])
        await asyncio.to_thread(self._wait_all, futures, (KafkaError.RESOURCE_NOT_FOUND,))

    async def delete_principal(self, username: str) -> None:
        await self.delete_user(username)
        await self.set_acls(AgentAccess(username, (), (), ""), only_delete=True)

    async def withdraw_access(self, keep: list[AgentAccess]) -> None:
        """The kill switch's fast path: delete the SCRAM logins of many principals and every
        ACL of theirs outside `keep` (a subset of what they had: nothing is created here),
        in one request per kind."""
        if not keep:
            return
        principals = [k.principal for k in keep]
        deletions = [UserScramCredentialDeletion(p, self._mechanism()) for p in principals]
        futures = await self._call(self.admin.alter_user_scram_credentials, deletions)
        await asyncio.to_thread(self._wait_all, futures, (KafkaError.RESOURCE_NOT_FOUND,))
        kept = {f"User:{k.principal}": k.bindings() for k in keep}
        every = AclBindingFilter(
            ResourceType.ANY, None, ResourcePatternType.ANY, None, None, AclOperation.ANY, AclPermissionType.ANY
        )
        found = await self._call(self.admin.describe_acls, every, request_timeout=self.settings.timeout_seconds)
        existing = await asyncio.to_thread(found.result, self.settings.timeout_seconds)
        doomed = [
            AclBindingFilter(
                b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation, b.permission_type
            )
            for b in existing
            if b.principal in kept
            and (b.restype, b.name, b.resource_pattern_type, b.operation) not in kept[b.principal]
        ]
        if doomed:
            futures = await self._call(self.admin.delete_acls, doomed, request_timeout=self.settings.timeout_seconds)
            await asyncio.to_thread(self._wait_all, futures)

    async def agent_principals(self) -> set[str]:
        """Every principal that holds an Agent's kind of access: a prefixed group ACL on
        `<principal>.` (AgentAccess grants one, halted or not). Other users of the cluster,
        whatever their names, do not match."""
        groups = AclBindingFilter(
            ResourceType.GROUP, None, ResourcePatternType.PREFIXED, None, None, AclOperation.ANY, AclPermissionType.ANY
        )
        found = await self._call(self.admin.describe_acls, groups, request_timeout=self.settings.timeout_seconds)
        bindings = await asyncio.to_thread(found.result, self.settings.timeout_seconds)
        out = set()
        for b in bindings:
            user = b.principal.removeprefix("User:")
            if b.principal.startswith("User:") and b.name == f"{user}.":
                out.add(user)
        return out

    def _principal_filter(self, principal: str) -> AclBindingFilter:
        return AclBindingFilter(
            ResourceType.ANY,
            None,
            ResourcePatternType.ANY,
            f"User:{principal}",
            None,
            AclOperation.ANY,
            AclPermissionType.ANY,
        )

    async def set_acls(self, access: AgentAccess, *, only_delete: bool = False) -> None:
        """Make the principal's ACLs exactly `access` (stale ones, e.g. a removed route, go)."""
        want = set() if only_delete else access.bindings()
        found = await self._call(
            self.admin.describe_acls,
            self._principal_filter(access.principal),
            request_timeout=self.settings.timeout_seconds,
        )
        existing = await asyncio.to_thread(found.result, self.settings.timeout_seconds)
        have = {(b.restype, b.name, b.resource_pattern_type, b.operation): b for b in existing}
        stale = [b for key, b in have.items() if key not in want]
        new = [
            AclBinding(t, n, p, f"User:{access.principal}", "*", o, AclPermissionType.ALLOW)
            for (t, n, p, o) in sorted(want - set(have), key=str)
        ]
        if new:
            futures = await self._call(self.admin.create_acls, new, request_timeout=self.settings.timeout_seconds)
            await asyncio.to_thread(self._wait_all, futures)
        if stale:
            filters = [
                AclBindingFilter(
                    b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation, b.permission_type
                )
                for b in stale
            ]
            futures = await self._call(self.admin.delete_acls, filters, request_timeout=self.settings.timeout_seconds)
            await asyncio.to_thread(self._wait_all, futures)
