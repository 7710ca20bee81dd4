"""Publishing AudioReference events: the library class upstream platforms embed, and `emofleet produce`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from emofleet.schemas.codec import Codec
from emofleet.streams.config import KafkaSettings
from emofleet.streams.references import message_key


@dataclass
class DeliveryReport:
    """Running totals of delivery reports: where each reference landed, and (audio_id, error) failures."""

    delivered: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return len(self.delivered)


def idempotent_producer_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """acks=all + idempotence: no duplicates or reordering from producer retries."""
    return kafka.client_config() | {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "compression.type": "lz4",
        "delivery.timeout.ms": 60_000,
    } | overrides


class AudioReferenceProducer:
    """Encodes AudioReference records as Avro and publishes them keyed by call (or audio id).

    Usage::

        with AudioReferenceProducer(settings.kafka, make_codec()) as producer:
            producer.send({"audio_id": "a1", "uri": "s3://bucket/a1.wav", ...})
        print(producer.report.sent, producer.report.failed)
    """

    def __init__(self, kafka: KafkaSettings, codec: Codec, *,
                 on_delivery: Callable[[str, str | None], None] | None = None,
                 **producer_overrides: Any) -> None:
        self.topic = kafka.audio_topic
        self.codec = codec
        self.report = DeliveryReport()
        self._on_delivery = on_delivery
        self._producer = Producer(idempotent_producer_config(kafka, **producer_overrides))

    def send(self, reference: Mapping[str, Any]) -> None:
        """Queue one reference; raises SchemaError for an invalid record (nothing is queued then)."""
        value = self.codec.encode("audio_reference", reference, topic=self.topic)
        audio_id = str(reference["audio_id"])
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=message_key(reference),
                                       on_delivery=lambda error, message: self._delivered(audio_id, error, message))
                break
            except BufferError:
                self._producer.poll(0.1)  # local queue full: serve delivery reports to make room
        self._producer.poll(0)

    def _delivered(self, audio_id: str, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.report.delivered.append((message.partition(), message.offset()))
        else:
            self.report.failed.append((audio_id, error.str()))
        if self._on_delivery:
            self._on_delivery(audio_id, None if error is None else error.str())

    def flush(self, timeout: float = 60.0) -> DeliveryReport:
        """Wait for every queued reference's delivery report; anything still queued counts as failed."""
        remaining = self._producer.flush(timeout)
        if remaining:
            self.report.failed.append(("*", f"{remaining} message(s) not delivered within {timeout:.0f}s"))
        return self.report

    def __enter__(self) -> AudioReferenceProducer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.flush()
