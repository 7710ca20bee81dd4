"""Each gateway replica's reader of the results and dead-letter topics: how results reach waiting requests.

A plain confluent-kafka consumer, ``assign()``-ed to every partition of both topics at their current end when
the replica starts (no consumer group membership, nothing committed): every replica sees every result,
whichever processor produced it, so the replica holding a request's waiter answers it. Messages are keyed
like their reference (``tenant/call_id`` or the audio id), and only keys some waiter wants are decoded, so
a replica's reading costs little more than the fetch. An outcome is matched by the reference's identity:
its ``audio_id``, which the gateway makes the request's unique result id.

Positions are taken from the topics' end *before* the replica reports ready, and a waiter is registered
before its reference is produced, so no result of an accepted request can pass a replica unseen.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from emofleet.core.config import KafkaSettings
from emofleet.core.logs import kafka_logger
from emofleet.gateway.answers import answer_from_events, failure
from emofleet.gateway.waiters import Waiter, Waiters
from emofleet.schemas.codec import Codec, SchemaError

log = logging.getLogger(__name__)

Outcome = Callable[[Waiter, dict[str, Any]], None]
Identity = Callable[[dict[str, Any]], None]


class ResultsReader:
    def __init__(self, kafka: KafkaSettings, codec: Codec, waiters: Waiters, on_outcome: Outcome,
                 on_event: Identity = lambda _event: None, *, poll_seconds: float = 0.1) -> None:
        self._kafka = kafka
        self._codec = codec
        self._waiters = waiters
        self._on_outcome = on_outcome
        self._on_event = on_event
        self._poll = poll_seconds
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.last_turn = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="results-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        consumer = Consumer(self._kafka.client_config() | {
            "group.id": f"emofleet-gateway-{uuid.uuid4().hex[:12]}",  # required by librdkafka; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "logger": kafka_logger(),
        })
        try:
            self._assign_at_end(consumer)
            self.ready.set()
            while not self._stop.is_set():
                self.last_turn = time.monotonic()
                for message in consumer.consume(num_messages=1000, timeout=self._poll):
                    if message.error() is None and self._waiters.wanted(message.key()):
                        self._handle(message.topic(), message.value() or b"")
                for waiter in self._waiters.expire():
                    log.info("stopped waiting for %s after async_wait_seconds; GET finds it once stored",
                             waiter.result_id, extra={"audio_id": waiter.result_id})
        except BaseException as error:  # the replica stops being ready; /healthz reports it
            self.error = error
            log.exception("results reader stopped")
        finally:
            self.ready.clear()
            consumer.close()

    def _assign_at_end(self, consumer: Consumer) -> None:
        topics = (self._kafka.results_topic, self._kafka.dead_letter_topic)
        while not self._stop.is_set():
            try:
                metadata = consumer.list_topics(timeout=5.0)
                partitions = [TopicPartition(t, p) for t in topics for p in metadata.topics[t].partitions]
                ends = [TopicPartition(tp.topic, tp.partition,
                                       consumer.get_watermark_offsets(tp, timeout=5.0)[1]) for tp in partitions]
            except (KafkaException, KeyError) as error:
                log.warning("results topics not readable yet (%s); retrying", error)
                self._stop.wait(1.0)
                continue
            consumer.assign(ends)
            log.info("reading %d partitions of %s from their end", len(ends), " and ".join(topics))
            return

    def _handle(self, topic: str, value: bytes) -> None:
        try:
            if topic == self._kafka.results_topic:
                self._event(self._codec.decode("emotion_event", value, topic=topic))
            else:
                self._dead_letter(self._codec.decode("dead_letter", value, topic=topic))
        except SchemaError as error:
            log.warning("undecodable message on %s: %s", topic, error)

    def _event(self, event: dict[str, Any]) -> None:
        waiter = self._waiters.get(event["audio_id"])
        if waiter is None:
            return
        if event["segment_index"] >= 0:
            waiter.events.append(event)
            return
        self._waiters.remove(waiter.result_id)
        self._on_event(event)
        self._on_outcome(waiter, answer_from_events(waiter.result_id, [*waiter.events, event],
                                                    granularity=waiter.granularity,
                                                    extract_embedding=waiter.extract_embedding))

    def _dead_letter(self, record: dict[str, Any]) -> None:
        waiter = self._waiters.remove(record.get("audio_id") or "")
        if waiter is not None:
            self._on_outcome(waiter, failure(waiter.result_id, record["reason"], record["error_message"]))
