"""References onto the audio topic, one awaitable delivery per request (acks=all, idempotent)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from emofleet.core.config import KafkaSettings
from emofleet.core.logs import kafka_logger
from emofleet.schemas.codec import Codec
from emofleet.streams.producer import idempotent_producer_config
from emofleet.streams.references import message_key


class DeliveryFailed(Exception):
    """Kafka did not take the reference (the request was not accepted)."""


class ReferenceSender:
    def __init__(self, kafka: KafkaSettings, codec: Codec, *, delivered: Callable[[int, int], None],
                 timeout_seconds: float = 10.0) -> None:
        self._topic = kafka.audio_topic
        self._codec = codec
        self._delivered = delivered  # (partition, offset) of every reference that landed
        self._producer = Producer(idempotent_producer_config(kafka, **{
            "linger.ms": 2, "delivery.timeout.ms": int(timeout_seconds * 1000), "logger": kafka_logger()}))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="reference-deliveries", daemon=True)
        self._thread.start()

    async def send(self, reference: dict[str, Any]) -> None:
        """Returns once the reference is in Kafka; raises DeliveryFailed otherwise."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            if error is None:
                self._delivered(message.partition(), message.offset())
            loop.call_soon_threadsafe(_settle, future, None if error is None else error.str())

        value = self._codec.encode("audio_reference", reference, topic=self._topic)
        try:
            self._producer.produce(self._topic, value=value, key=message_key(reference), on_delivery=on_delivery)
        except BufferError:
            raise DeliveryFailed("the producer's queue is full") from None
        error = await future
        if error is not None:
            raise DeliveryFailed(error)

    def _serve(self) -> None:
        while not self._stop.is_set() or len(self._producer):
            self._producer.poll(0.05)

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)
        self._stop.set()
        self._thread.join(timeout)


def _settle(future: asyncio.Future[str | None], error: str | None) -> None:
    if not future.done():
        future.set_result(error)
