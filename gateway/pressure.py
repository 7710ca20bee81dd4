"""Is the pipeline saturated? The processor group's lag on the audio topic, measured in the background.

Lag per partition = high-water mark - the group's committed offset. The high-water mark is the larger of
the broker's answer (ListOffsets) and one past the last offset this replica produced there: some
Kafka-compatible brokers (Tansu) answer ListOffsets with the start of the last batch, which undercounts, while
our own delivery reports are exact (``core/metrics.py`` LagMonitor reads fetch responses for the same reason;
the gateway does not fetch the audio topic). Above ``max_lag_messages`` new work is refused with 503 and
``Retry-After`` instead of queueing into timeouts.

A fixed lag bound is blind to how fast the fleet drains: 500 references are a second of work for a GPU fleet and
a minute for one CPU. So the probe also measures the drain rate (the group's committed offsets per second, smoothed
over busy intervals), and :meth:`PipelineLag.expected_wait` predicts how long a reference accepted *now* waits:
(lag + references this replica produced since the probe) / rate. Above ``max_queue_seconds`` the request gets 503
at once, so overload sheds within milliseconds instead of queueing into 504s and client timeouts; every accepted
reference counts at once, not a probe later.
"""

from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import Consumer, KafkaException, TopicPartition

from emofleet.core.config import KafkaSettings
from emofleet.core.logs import kafka_logger

log = logging.getLogger(__name__)


class PipelineLag:
    def __init__(self, kafka: KafkaSettings, *, interval: float = 1.0) -> None:
        self._kafka = kafka
        self._interval = interval
        self._produced: dict[int, int] = {}  # partition -> highest offset this replica produced
        self._since_probe = 0  # references this replica produced since the last measurement
        self._drained: tuple[float, int] | None = None  # (monotonic time, committed offsets) at the last probe
        self._rate: float | None = None  # references per second the group drains, while it has a backlog
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.lag: int | None = None  # None until measured
        self._thread = threading.Thread(target=self._run, name="pipeline-lag", daemon=True)

    def produced(self, partition: int, offset: int) -> None:
        """A delivery report of a reference (producer thread)."""
        with self._lock:
            self._since_probe += 1
            if offset > self._produced.get(partition, -1):
                self._produced[partition] = offset

    def expected_wait(self) -> float | None:
        """Seconds a reference accepted now would wait for a processor; None while the drain rate is unknown."""
        with self._lock:
            lag, rate, extra = self.lag, self._rate, self._since_probe
        if lag is None or not rate:
            return None
        return (lag + extra) / rate

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
            self._since_probe = 0
        total = 0
        for tp in partitions:
            low, high = consumer.get_watermark_offsets(tp, timeout=5.0)
            high = max(high, produced.get(tp.partition, -1) + 1)
            done = committed.get(tp.partition, -1)
            total += max(0, high - (done if done >= 0 else low))
        now, drained = time.monotonic(), sum(max(0, offset) for offset in committed.values())
        with self._lock:
            if self._drained is not None:
                self._rate = drain_rate(self._rate, drained - self._drained[1], now - self._drained[0], total)
            self._drained = (now, drained)
        return total


def drain_rate(previous: float | None, drained: int, seconds: float, backlog: int, *, weight: float = 0.3) -> float | None:
    """The group's drain rate after an interval in which it committed ``drained`` references in ``seconds`` with
    ``backlog`` left. Intervals without a backlog say nothing about capacity (the fleet may be idle), so they keep
    the previous rate; busy ones are smoothed in (exponential moving average)."""
    if seconds <= 0 or (drained <= 0 and backlog == 0):
        return previous
    measured = max(drained, 0) / seconds
    return measured if previous is None else (1 - weight) * previous + weight * measured
