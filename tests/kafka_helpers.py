"""Reading topics back in tests: bounded polling until the expected count arrives (no sleeps)."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 60.0,
               isolation: str = "read_uncommitted") -> list[Message]:
    """All messages of ``topic`` from the beginning, once at least ``expected`` arrived (or timeout)."""
    partitions = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10).topics[topic].partitions
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{time.monotonic_ns()}",
                         "enable.auto.commit": False, "log_level": 0, "isolation.level": isolation})
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=10_000, timeout=0.5):
                if message.error() is None:
                    messages.append(message)
    finally:
        consumer.close()
    return messages


class TopicReader:
    """Accumulates everything on a topic, from the beginning, across calls."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        partitions = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{time.monotonic_ns()}",
                                   "enable.auto.commit": False, "log_level": 0})
        self._consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        self.messages: list[Message] = []

    def poll(self, timeout: float = 0.2) -> list[Message]:
        for message in self._consumer.consume(num_messages=10_000, timeout=timeout):
            if message.error() is None:
                self.messages.append(message)
        return self.messages

    def close(self) -> None:
        self._consumer.close()
