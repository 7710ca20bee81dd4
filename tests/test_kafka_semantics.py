"""Kafka guarantees the pipeline relies on, checked on whichever backend runs.

Tansu's ListOffsets "latest" answers the start of the last batch + 1 rather than the log end
(../shared/FACTS.md), so the watermark test runs on real Kafka only. FACTS also reports aborted
transactional messages reaching read_committed consumers on Tansu; for a transaction aborted before
the next one commits, Tansu 0.6.0 behaved correctly here, so that test runs everywhere.
"""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from emofleet.core.config import Settings

from kafka_helpers import read_topic


def _topic(settings: Settings, partitions: int = 1) -> str:
    name = f"{settings.kafka.audio_topic}.semantics"
    admin = AdminClient(settings.kafka.client_config())
    for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        future.result()
    return name


@pytest.mark.backend("external", "containers", reason="Tansu's ListOffsets 'latest' is not the log end")
def test_high_watermark_from_list_offsets_is_the_log_end(settings: Settings) -> None:
    topic = _topic(settings)
    producer = Producer(settings.kafka.client_config() | {"linger.ms": 50})
    for i in range(250):
        producer.produce(topic, value=str(i).encode())
    assert producer.flush(30) == 0
    consumer = Consumer(settings.kafka.client_config() | {"group.id": f"lag-{uuid.uuid4().hex}"})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
    finally:
        consumer.close()

    assert (low, high) == (0, 250), "consumer lag = high watermark - committed needs the true log end"


def test_read_committed_consumers_never_see_aborted_messages(settings: Settings) -> None:
    topic = _topic(settings)
    producer = Producer(settings.kafka.client_config() | {"transactional.id": f"tx-{uuid.uuid4().hex}"})
    producer.init_transactions(30)
    for outcome, values in (("abort", [b"a1", b"a2"]), ("commit", [b"c1", b"c2"])):
        producer.begin_transaction()
        for value in values:
            producer.produce(topic, value=value)
        (producer.abort_transaction if outcome == "abort" else producer.commit_transaction)(30)

    # Ask for more than can come, so anything aborted that is delivered is seen within the timeout.
    messages = read_topic(settings.kafka.bootstrap_servers, topic, 4, timeout=8, isolation="read_committed")

    assert [m.value() for m in messages] == [b"c1", b"c2"]
