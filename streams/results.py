"""Reading emofleet's topics from Python: decoded records, a consumer group, at-least-once commits.

For downstream services (a CRM updater, an alerting bridge) and for the operator commands (`emofleet results`,
`emofleet dead-letters`). Two ways to read:

* :class:`ResultStream` - a member of a consumer group, on the pipeline's one consumer loop
  (:class:`emofleet.streams.consumer.ConsumerLoop`) with a small strategy that hands each message to the
  caller's ``for`` loop. An event counts as handled when the loop body returned and the caller asks for the
  next one; only then may the loop commit past it (about once a second, and on a clean exit). If the body
  raises (or ``break`` s), that event and everything after it in its partition stay uncommitted: the next
  member of the group gets them again. At-least-once, so handlers should be idempotent (``event_id``,
  ``dead_letter_id`` and ``aggregate_id`` are deterministic keys for that)::

      from emofleet.core.config import from_env
      from emofleet.streams.results import ResultStream

      with ResultStream(from_env().kafka, group="crm-updater") as stream:
          for delivery in stream:
              upsert(delivery.record["event_id"], delivery.record["label"])

* :func:`scan` - no group, no commits: every partition from the beginning (or a time), to the end or
  following new messages. What `emofleet results` reads ranges with.

Records are plain dicts decoded by :mod:`emofleet.schemas.codec` (either wire format) into the *current*
schema, whatever version wrote them (older writers' missing fields take their defaults).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from emofleet.core.config import KafkaSettings
from emofleet.core.errors import UserFacingError
from emofleet.schemas.codec import Codec, SchemaError, SchemaName, make_codec
from emofleet.streams.consumer import ConsumerLoop, LoopLimits, Reporter, consumer_config
from emofleet.streams.offsets import TopicPartition as TP

log = logging.getLogger(__name__)


def topic_schemas(kafka: KafkaSettings) -> dict[str, SchemaName]:
    """The schema of each of the pipeline's topics."""
    return {kafka.audio_topic: "audio_reference", kafka.results_topic: "emotion_event",
            kafka.dead_letter_topic: "dead_letter", kafka.aggregates_topic: "emotion_aggregate",
            kafka.alerts_topic: "emotion_alert"}


@dataclass(frozen=True)
class Delivery:
    """One decoded message and where it sits."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    timestamp_ms: int  # the Kafka message timestamp (producer time)
    schema: SchemaName
    record: dict[str, Any]


def decode_message(codec: Codec, schemas: dict[str, SchemaName], message: Message) -> Delivery:
    """The message decoded with its topic's schema; raises :class:`SchemaError` for bytes that are no such record."""
    topic = message.topic()
    schema = schemas[topic]
    record = codec.decode(schema, message.value() or b"", topic=topic)
    return Delivery(topic, message.partition(), message.offset(), message.key(), message.timestamp()[1],
                    schema, record)


def _log_undecodable(message: Message, error: SchemaError) -> None:
    log.warning("skipping %s[%d]@%d: %s", message.topic(), message.partition(), message.offset(), error)


def unreachable(kafka: KafkaSettings, error: KafkaException) -> UserFacingError:
    detail = error.args[0].str() if error.args and hasattr(error.args[0], "str") else str(error)
    return UserFacingError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {detail}",
                           "is the broker up? `emofleet stack start` runs the embedded one; else set "
                           "EMOFLEET_KAFKA_BOOTSTRAP_SERVERS or --bootstrap-servers")


# ---------------------------------------------------------------------------------------------- group member


class _HandOverStrategy:
    """The loop's strategy for one assignment: queue messages for the caller, report those it handled."""

    def __init__(self, outbox: queue.SimpleQueue, stopping: threading.Event, report: Reporter) -> None:
        self._outbox = outbox
        self._stopping = stopping
        self._report = report
        self._open: set[tuple[TP, int]] = set()
        self._lock = threading.Condition()
        self.closed = False

    def submit(self, message: Message) -> None:
        with self._lock:
            self._open.add(((message.topic(), message.partition()), message.offset()))
        self._outbox.put((self, message))

    def poll(self) -> None:
        pass

    def join(self, timeout: float) -> None:
        with self._lock:
            self._lock.wait_for(lambda: not self._open or self._stopping.is_set(), timeout)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            left, self._open = self._open, set()
        for tp, offset in left:
            self._report(tp, offset, finished=False)

    def handled(self, message: Message) -> None:
        """The caller is done with ``message``: report it finished, unless this strategy was closed meanwhile
        (its partitions were revoked; the next owner reads the message again)."""
        position = ((message.topic(), message.partition()), message.offset())
        with self._lock:
            if self.closed or position not in self._open:
                return
            self._open.discard(position)
            self._report(position[0], position[1], finished=True)
            self._lock.notify_all()


class ResultStream:
    """A consumer-group member over emofleet topics (default: the results topic) for a ``for`` loop.

    ``kafka``: the settings (``from_env().kafka``: brokers, SASL, registry) or just a bootstrap string.
    ``group``: your service's consumer group; a new group starts at the beginning of the topics
    (``from_beginning=False``: at their end). ``on_undecodable(message, error)`` is called for bytes that
    are not a record of the topic's schema (default: log a warning); the message then counts as handled.
    """

    def __init__(self, kafka: KafkaSettings | str, group: str, topics: Sequence[str] | None = None, *,
                 codec: Codec | None = None, from_beginning: bool = True, max_in_flight: int = 500,
                 commit_interval_seconds: float = 1.0, join_timeout_seconds: float = 10.0,
                 on_undecodable: Callable[[Message, SchemaError], None] = _log_undecodable) -> None:
        from emofleet.core.metrics import Metrics

        self._kafka = KafkaSettings(bootstrap_servers=kafka) if isinstance(kafka, str) else kafka
        self._schemas = topic_schemas(self._kafka)
        self.topics = list(topics or [self._kafka.results_topic])
        unknown = [t for t in self.topics if t not in self._schemas]
        if unknown:
            raise ValueError(f"not an emofleet topic: {', '.join(unknown)} (known: {', '.join(self._schemas)})")
        self._codec = codec or make_codec(self._kafka.schema_registry_url, self._kafka.registry_config)
        self._on_undecodable = on_undecodable
        self._outbox: queue.SimpleQueue[tuple[_HandOverStrategy, Message]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        config = consumer_config(self._kafka, group,
                                 **{"auto.offset.reset": "earliest" if from_beginning else "latest"})
        limits = LoopLimits(max_in_flight=max_in_flight, commit_interval_seconds=commit_interval_seconds,
                            join_timeout_seconds=join_timeout_seconds)
        self._loop = ConsumerLoop(config, self.topics, self._strategy, limits, metrics=Metrics("reader"),
                                  leave_group=self._kafka.leave_group_on_close)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run_loop, name=f"result-stream-{group}", daemon=True)

    def _strategy(self, _partitions: frozenset[TP], report: Reporter) -> _HandOverStrategy:
        return _HandOverStrategy(self._outbox, self._stopping, report)

    def _run_loop(self) -> None:
        try:
            self._loop.run()
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            self._error = error

    @property
    def assigned(self) -> set[TP]:
        return set(self._loop.assigned)

    def __enter__(self) -> ResultStream:
        if self._thread.ident is None:
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self, timeout: float = 30.0) -> None:
        """Stop: commit what was handled, leave the group; unhandled messages stay uncommitted."""
        self._stopping.set()
        self._loop.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __iter__(self) -> Iterator[Delivery]:
        if self._thread.ident is None:  # iterated without `with`
            self._thread.start()
        while (item := self._next()) is not None:
            strategy, message = item
            if strategy.closed:
                continue  # its partitions moved on; whoever owns them now reads it again
            try:
                delivery = decode_message(self._codec, self._schemas, message)
            except SchemaError as error:
                self._on_undecodable(message, error)
                strategy.handled(message)
                continue
            yield delivery
            strategy.handled(message)  # reached only when the caller's loop body returned

    def _next(self) -> tuple[_HandOverStrategy, Message] | None:
        while not self._stopping.is_set():
            try:
                return self._outbox.get(timeout=0.1)
            except queue.Empty:
                if self._error is not None:
                    raise self._error
                if not self._thread.is_alive():
                    return None
        return None


# ---------------------------------------------------------------------------------------------- scan


@dataclass(frozen=True)
class ScanPlan:
    """What a scan reads: partitions, the first offset of each (by ``since``), and roughly how many messages."""

    starts: list[TopicPartition]
    estimated: int


def plan_scan(consumer: Consumer, kafka: KafkaSettings, topics: Sequence[str], since_ms: int | None,
              timeout: float = 10.0) -> ScanPlan:
    """Every partition of ``topics``, from the first message at or after ``since_ms`` (the beginning without).

    Brokers that cannot look offsets up by time answer 0 (Tansu): the scan then reads from the beginning and
    the caller's time filter does the rest.
    """
    try:
        metadata = consumer.list_topics(timeout=timeout)  # all topics: a missing one is not auto-created
    except KafkaException as error:
        raise unreachable(kafka, error) from None
    missing = [t for t in topics if t not in metadata.topics]
    if missing:
        raise UserFacingError(f"topic {', '.join(missing)} does not exist on {kafka.bootstrap_servers}",
                              "`emofleet topics list` shows the topics; names come from EMOFLEET_KAFKA_*_TOPIC")
    partitions = [TopicPartition(t, p, since_ms if since_ms is not None else 0)
                  for t in topics for p in sorted(metadata.topics[t].partitions)]
    if since_ms is not None:
        partitions = consumer.offsets_for_times(partitions, timeout=timeout)
    estimated = 0
    for tp in partitions:
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
        if tp.offset < 0:  # no message at or after the time: start at the end
            tp.offset = high
        estimated += max(0, high - max(low, tp.offset))
    return ScanPlan([TopicPartition(tp.topic, tp.partition, tp.offset) for tp in partitions], estimated)


def scan(kafka: KafkaSettings, topics: Sequence[str], *, since_ms: int | None = None, follow: bool = False,
         codec: Codec | None = None, on_plan: Callable[[ScanPlan], None] = lambda _plan: None,
         on_message: Callable[[], None] = lambda: None,
         on_undecodable: Callable[[Message, SchemaError], None] = _log_undecodable,
         stop: threading.Event | None = None) -> Iterator[Delivery]:
    """Decoded messages of ``topics``, no consumer group: to the end of every partition, or forever with
    ``follow`` (until ``stop`` is set). ``on_message`` is called once per message read (progress)."""
    schemas = topic_schemas(kafka)
    codec = codec or make_codec(kafka.schema_registry_url, kafka.registry_config)
    consumer = Consumer(kafka.client_config() | {
        "group.id": f"emofleet-scan-{time.monotonic_ns()}",  # required by librdkafka; never joined or committed
        "enable.auto.commit": False, "enable.partition.eof": True, "fetch.wait.max.ms": 100,
        "socket.timeout.ms": 10_000, "log_level": 0})
    try:
        plan = plan_scan(consumer, kafka, topics, since_ms)
        on_plan(plan)
        consumer.assign(plan.starts)
        reading = {(tp.topic, tp.partition) for tp in plan.starts}
        while (follow or reading) and not (stop and stop.is_set()):
            for message in consumer.consume(num_messages=1000, timeout=0.2):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        reading.discard((message.topic(), message.partition()))
                    elif error.fatal():
                        raise unreachable(kafka, KafkaException(error))
                    continue
                on_message()
                try:
                    yield decode_message(codec, schemas, message)
                except SchemaError as decode_error:
                    on_undecodable(message, decode_error)
    finally:
        consumer.close()
