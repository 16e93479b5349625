"""The operator's Kafka admin against the real broker: topic creation and the topic cache."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fleetward.operator.kafka import KafkaAdmin
from fleetward.operator.settings import KafkaSettings


class CountingAdmin(KafkaAdmin):
    """The real admin, counting the blocking calls it hands to threads."""

    def __init__(self, settings: KafkaSettings) -> None:
        super().__init__(settings)
        self.calls = 0

    async def _call(self, fn, *args, **kwargs) -> Any:
        self.calls += 1
        return await super()._call(fn, *args, **kwargs)


def test_concurrent_topic_refreshes_share_one_metadata_request(kafka):
    admin = CountingAdmin(KafkaSettings(bootstrap_servers=kafka.bootstrap))
    name = f"test.refresh.{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[list[set[str]], int, set[str], int]:
        burst = await asyncio.gather(*(admin.refresh_topics() for _ in range(25)))
        calls_for_burst = admin.calls
        await admin.ensure_topics([name], partitions=1)
        after = await admin.refresh_topics()  # the burst is over: a new read, not its result
        return burst, calls_for_burst, after, admin.calls

    burst, calls_for_burst, after, calls = asyncio.run(scenario())
    assert calls_for_burst == 1, "25 concurrent refreshes made one metadata request"
    assert all(topics == burst[0] for topics in burst)
    assert name not in burst[0] and name in after
    assert calls == 3  # the burst's read, the create, the read after it


def test_a_topic_is_created_with_its_config_and_an_existing_one_is_left_alone(kafka):
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = KafkaAdmin(KafkaSettings(bootstrap_servers=kafka.bootstrap))
    kept, plain = f"test.audit.{uuid.uuid4().hex[:8]}", f"test.plain.{uuid.uuid4().hex[:8]}"
    configs = {kept: {"retention.ms": "-1"}}
    asyncio.run(admin.ensure_topics([kept, plain], partitions=1, configs=configs))

    def retention(topic: str) -> str:
        client = AdminClient({"bootstrap.servers": kafka.bootstrap})
        [future] = client.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)]).values()
        return future.result(timeout=30)["retention.ms"].value

    assert retention(kept) == "-1"  # the audit topic's mirrored chains are kept for good
    assert retention(plain) != "-1"  # the broker's default
    # Asked again with another config: the existing topic keeps its own.
    fresh = KafkaAdmin(KafkaSettings(bootstrap_servers=kafka.bootstrap))
    asyncio.run(fresh.ensure_topics([kept], partitions=1, configs={kept: {"retention.ms": "1000"}}))
    assert retention(kept) == "-1"
