"""Is the pipeline saturated? The processor group's lag on the audio topic, measured in the background.

Lag per partition = high-water mark - the group's committed offset. The high-water mark is the larger of
the broker's answer (ListOffsets) and one past the last offset this replica produced there: some
Kafka-compatible brokers (Tansu) answer ListOffsets with the start of the last batch, which undercounts, while
our own delivery reports are exact (``core/metrics.py`` LagMonitor reads fetch responses for the same reason;
the gateway does not fetch the audio topic). Above ``max_lag_messages`` new work is refused with 503 and
``Retry-After`` instead of queueing into timeouts.
"""

from __future__ import annotations

import logging
import threading

from confluent_kafka import Consumer, KafkaException, TopicPartition

from emofleet.core.config import KafkaSettings
from emofleet.core.logs import kafka_logger

log = logging.getLogger(__name__)


class PipelineLag:
    def __init__(self, kafka: KafkaSettings, *, interval: float = 1.0) -> None:
        self._kafka = kafka
        self._interval = interval
        self._produced: dict[int, int] = {}  # partition -> highest offset this replica produced
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.lag: int | None = None  # None until measured
        self._thread = threading.Thread(target=self._run, name="pipeline-lag", daemon=True)

    def produced(self, partition: int, offset: int) -> None:
        """A delivery report of a reference (producer thread)."""
        with self._lock:
            if offset > self._produced.get(partition, -1):
                self._produced[partition] = offset

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        # group.id names the processors' group only to read its committed offsets: this consumer never joins it
        consumer = Consumer(self._kafka.client_config() | {
            "group.id": self._kafka.processor_group, "enable.auto.commit": False, "logger": kafka_logger()})
        try:
            while not self._stop.is_set():
                try:
                    self.lag = self.measure(consumer)
                except (KafkaException, KeyError) as error:
                    log.debug("pipeline lag unavailable: %s", error)
                self._stop.wait(self._interval)
        finally:
            consumer.close()

    def measure(self, consumer: Consumer) -> int:
        topic = self._kafka.audio_topic
        partitions = [TopicPartition(topic, p) for p in consumer.list_topics(topic, timeout=5.0).topics[topic].partitions]
        committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=5.0)}
        with self._lock:
            produced = dict(self._produced)
        total = 0
        for tp in partitions:
            low, high = consumer.get_watermark_offsets(tp, timeout=5.0)
            high = max(high, produced.get(tp.partition, -1) + 1)
            done = committed.get(tp.partition, -1)
            total += max(0, high - (done if done >= 0 else low))
        return total
