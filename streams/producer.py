"""Publishing AudioReference events: the library class upstream platforms embed, and `emofleet produce`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from emofleet.schemas.codec import Codec
from emofleet.core.config import KafkaSettings
from emofleet.streams.references import message_key


@dataclass
class DeliveryReport:
    """Running totals of delivery reports, in constant memory per partition: how many references
    landed, the offset range they span per partition, and (audio_id, error) per failure."""

    sent: int = 0
    ranges: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # partition: (first, last, count)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def landed(self, partition: int, offset: int) -> None:
        first, last, count = self.ranges.get(partition, (offset, offset, 0))
        self.ranges[partition] = (min(first, offset), max(last, offset), count + 1)
        self.sent += 1


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
                 on_delivery: Callable[[bool], None] | None = None,
                 **producer_overrides: Any) -> None:
        self.topic = kafka.audio_topic
        self.codec = codec
        self.report = DeliveryReport()
        self._on_delivery = on_delivery
        self._producer = Producer(idempotent_producer_config(kafka, **producer_overrides))

    def send(self, reference: Mapping[str, Any]) -> None:
        """Queue one reference; raises SchemaError for an invalid record (nothing is queued then)."""
        value = self.codec.encode("audio_reference", reference, topic=self.topic)
        key = message_key(reference)
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, on_delivery=self._delivered)
                break
            except BufferError:
                self._producer.poll(0.1)  # local queue full: serve delivery reports to make room
        self._producer.poll(0)

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        """One bound callback for all messages (no closure per message); the audio id of a failed
        reference is read back from its bytes, which only failures pay for."""
        if error is None:
            self.report.landed(message.partition(), message.offset())
        else:
            self.report.failed.append((self._audio_id(message), error.str()))
        if self._on_delivery:
            self._on_delivery(error is None)

    def _audio_id(self, message: Message) -> str:
        try:
            return str(self.codec.decode("audio_reference", message.value() or b"", topic=self.topic)["audio_id"])
        except Exception:  # noqa: BLE001 - only used to label a failure
            return f"{message.topic()}[{message.partition()}]"

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
