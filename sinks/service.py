"""`emofleet sink`: results and dead letters from Kafka into ClickHouse, effectively once.

The sink is a strategy of the consumer loop (streams/consumer.py), like the processor: the loop polls,
pauses, commits and handles rebalances; :class:`SinkStrategy` batches the rows of one assignment and reports
each message finished once its rows are stored (or its dead letter delivered), so the loop commits only what
ClickHouse acknowledged.

- Batches by rows (``batch_rows``) and time (``batch_seconds``); one insert per table per flush.
- Each insert carries an ``insert_deduplication_token`` derived from the positions and ids of the rows it
  covers (:func:`unit_token`), so a retried insert (timeout after the server wrote it) is dropped by
  ClickHouse, and a recreated topic's rows at reused offsets are not.
- Every row records its own Kafka position (``kafka_topic/partition/offset``) and the id of the topic's
  incarnation it was read from (``kafka_topic_id``). When a partition is assigned, the sink asks the
  broker for the topic's current id and skips messages up to the highest position already stored *for
  that id*: a crash between insert and commit replays them, and they are not inserted again. A topic
  deleted and recreated (or a memory-backed broker restarted) numbers its offsets from 0 again under a
  new id, so old rows never hide new messages. A partition's rows are inserted in offset order and a
  batch is retried until it lands, so what is stored is always a prefix.
- A processor killed after producing results but before committing its offsets makes the group process
  those references again: the same ``event_id`` (or ``dead_letter_id``) arrives again at a new position.
  The sink remembers the last ``RECENT_IDS`` ids per table (its own rows, plus the newest stored rows
  read back on every assignment) and drops repeats, so rows are unique without ``FINAL`` as long as a
  replay arrives within that many rows of the original (rows handed back uninserted are forgotten).
- ClickHouse down or an insert failing transiently (and errors of the table, the user or the settings,
  ``SETUP_CODES`` in ``clickhouse.py``): the same batch (same rows, same tokens) is retried with backoff; a
  full batch rejects further messages (``MessageRejected``), so the loop pauses and keeps polling (the group
  keeps the member); nothing is reported finished, so nothing is committed and nothing is lost. When the
  assignment changes, the strategy gets ``join_timeout`` to land its batch; what it could not store is
  reported dropped and read again (by this member's next strategy or the partition's next owner), and its
  ids are forgotten so the replay is not mistaken for a repeat.
- ClickHouse rejecting rows for what is in them (a constraint, a value the column cannot hold:
  ``rejects_rows``): the insert is split in halves, recursively, each part with a deduplication token of its
  own rows (so a retry of the batch drops the parts that landed), until the rejected rows stand alone. Each
  rejected row's message goes to the dead-letter topic (reason ``clickhouse_rejected``, stage ``sink``, the
  ClickHouse error's first line, the original bytes, headers and position), and the producer is flushed
  before any further part is inserted: a partition's stored rows never get ahead of an undelivered dead
  letter, and its offset is committed past the rejected row only after that. The rest of the batch and
  every other partition go on. A rejected row *from the dead-letter topic* is not sent there again (it
  would come back forever): it is logged with its position and counted
  (``emofleet_errors_total{kind="clickhouse_rejected"}``) and stays in Kafka.
- Frame-granularity whole-clip events also write ``emotion_frames`` (``rows.frame_rows``, at most
  ``max_frames_per_clip`` rows per clip, longer clips mean-pooled) in the same flush, before the events
  (see :meth:`Writer.insert`), with their own deduplication token; frame rows count towards
  ``batch_rows``. Frames of an event that ClickHouse then rejects stay stored; a message whose frames are
  rejected is dead-lettered while its event row is stored.
- A record that does not decode goes to the dead-letter topic (from the results topic) or into the
  dead_letters table as a raw row (from the dead-letter topic itself), never silently dropped.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Message, Producer
from confluent_kafka.admin import AdminClient

from emofleet.core.config import Settings
from emofleet.core.logs import kafka_logger
from emofleet.core.metrics import Metrics
from emofleet.schemas.codec import Codec, SchemaError
from emofleet.sinks.clickhouse import dedup_settings, error_line, rejects_rows
from emofleet.sinks.migrations import (AGGREGATES_TABLE, DEAD_LETTERS_TABLE, EVENTS_TABLE, FRAMES_TABLE, last_offsets,
                                       quote_identifier)
from emofleet.sinks.rows import (AGGREGATE_COLUMNS, DEAD_LETTER_COLUMNS, EVENT_COLUMNS, FRAME_COLUMNS, aggregate_row,
                                 dead_letter_row, event_row, frame_rows)
from emofleet.streams.consumer import ConsumerLoop, LoopLimits, MessageRejected, Reporter, consumer_config
from emofleet.streams.dead_letters import Failure, Lineage, dead_letter
from emofleet.streams.offsets import TopicPartition
from emofleet.streams.topics import topic_ids

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 10.0
FIRST_BACKOFF_SECONDS = 0.2
RECENT_IDS = 100_000  # ids remembered per table to drop processor replays (~20 MB each when full)
_COLUMNS = {EVENTS_TABLE: EVENT_COLUMNS, DEAD_LETTERS_TABLE: DEAD_LETTER_COLUMNS,
            AGGREGATES_TABLE: AGGREGATE_COLUMNS, FRAMES_TABLE: FRAME_COLUMNS}
REJECTED = "clickhouse_rejected"  # dead-letter reason of rows ClickHouse refuses for good
assert EVENT_COLUMNS[0] == "event_id" and DEAD_LETTER_COLUMNS[0] == "dead_letter_id"  # RecentIds keys


@dataclass(frozen=True)
class Source:
    """A batched row with the message it came from (its dead letter if ClickHouse rejects the row) and the
    frame rows it writes as well (a frame-granularity whole-clip event)."""

    message: Message
    row: list[Any]
    frames: list[list[Any]]


Unit = tuple[list[list[Any]], Source]
"""The rows one message writes into one table: the unit a rejected insert is split down to."""


@dataclass
class Batch:
    """Rows waiting for one flush, with every message they came from."""

    messages: list[tuple[TopicPartition, int]] = field(default_factory=list)  # reported together after the flush
    sources: dict[TopicPartition, list[Source]] = field(default_factory=dict)  # per partition, in offset order
    started: float = field(default_factory=time.monotonic)  # when its first message arrived
    rows: int = 0  # frame rows included
    inserted_topics: set[str] = field(default_factory=set)  # inserts that already landed
    frames_inserted: bool = False

    def add(self, tp: TopicPartition, offset: int, source: Source) -> None:
        if not self.messages:
            self.started = time.monotonic()  # the time bound counts from the first message, not the last flush
        self.messages.append((tp, offset))
        self.sources.setdefault(tp, []).append(source)
        self.rows += 1 + len(source.frames)

    def sources_for(self, topic: str) -> list[Source]:
        """The topic's rows in (partition, offset) order, so each partition's rows are inserted in order."""
        return [s for tp, sources in sorted(self.sources.items()) if tp[0] == topic for s in sources]


def unit_token(table: str, units: list[Unit]) -> str:
    """Deduplication token of an insert of ``units``, from the messages they came from and their ids: the
    same part of a batch retried gets the same token."""
    digest = hashlib.sha256(table.encode())
    for _, source in units:
        message = source.message
        digest.update(f"|{message.topic()}:{message.partition()}:{message.offset()}:{source.row[0]}".encode())
    return digest.hexdigest()[:32]


class RecentIds:
    """The last ``capacity`` ids remembered, oldest forgotten first; ``capacity`` 0 remembers nothing.
    Thread-safe (a strategy closing and its successor starting may overlap)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: str) -> bool:
        """Remember ``key``; False when it was remembered already (a repeat)."""
        if self.capacity <= 0:
            return True
        with self._lock:
            if key in self._ids:
                return False
            self._ids[key] = None
            if len(self._ids) > self.capacity:
                self._ids.popitem(last=False)
        return True

    def update(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.add(key)

    def discard(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._ids.pop(key, None)

    def __len__(self) -> int:
        return len(self._ids)


def stored_ids(client: Any, database: str, table: str, topic: str, limit: int) -> list[str]:
    """Ids (first column of ``table``) of the newest ``limit`` rows that came from ``topic``, oldest first."""
    column = quote_identifier(_COLUMNS[table][0])
    rows = client.query(f"SELECT {column} FROM {quote_identifier(database)}.{quote_identifier(table)} "
                        f"WHERE kafka_topic = {{topic:String}} ORDER BY inserted_at DESC LIMIT {int(limit)}",
                        parameters={"topic": topic}).result_rows
    return [row[0] for row in reversed(rows)]


class Writer:
    """Rows from messages, inserts into ClickHouse, and the dead letters of what cannot be stored. Shared by the
    strategies of one sink (one client, one lock, one producer)."""

    def __init__(self, settings: Settings, client: Any, lock: threading.Lock, codec: Codec, metrics: Metrics) -> None:
        self.settings = settings
        self.client = client
        self.lock = lock
        self.codec = codec
        self.metrics = metrics
        kafka = settings.kafka
        self.tables = {kafka.results_topic: EVENTS_TABLE, kafka.dead_letter_topic: DEAD_LETTERS_TABLE,
                       kafka.aggregates_topic: AGGREGATES_TABLE}
        self.producer = Producer(kafka.client_config() | {"enable.idempotence": True, "acks": "all",
                                                          "logger": kafka_logger()})

    # ------------------------------------------------------------ rows

    def rows(self, message: Message, topic_id: str) -> tuple[list[Any] | None, list[list[Any]]]:
        """The message's row (None: nothing to insert) and the frame rows it writes as well. A record that does
        not decode is sent to the dead-letter topic (or stored as a raw dead-letter row, from that topic)."""
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        now = datetime.now(UTC)
        table = self.tables[topic]
        try:
            if table == AGGREGATES_TABLE:
                aggregate = self.codec.decode("emotion_aggregate", message.value() or b"", topic=topic)
                return aggregate_row(aggregate, topic, partition, offset, now, topic_id), []
            if table == EVENTS_TABLE:
                event = self.codec.decode("emotion_event", message.value() or b"", topic=topic)
                return (event_row(event, topic, partition, offset, now, topic_id),
                        frame_rows(event, self.settings.clickhouse.max_frames_per_clip))
            record = self.codec.decode("dead_letter", message.value() or b"", topic=topic)
        except SchemaError as error:
            if table != DEAD_LETTERS_TABLE:
                self._dead_letter_malformed(message, error)
                return None, []
            record = self._malformed_record(message, error)
        return dead_letter_row(record, topic, partition, offset, now, topic_id), []

    def _malformed_record(self, message: Message, error: SchemaError) -> dict[str, Any]:
        self.metrics.dead_letter(error.reason, "sink")
        return self._dead_letter_record(message, Failure(error.reason, "sink", type(error).__name__, str(error)), None)

    def _dead_letter_record(self, message: Message, failure: Failure,
                            reference: dict[str, Any] | None) -> dict[str, Any]:
        return dead_letter(key=message.key(), payload=message.value() or b"", headers=message.headers(),
                           lineage=Lineage(message.topic(), message.partition(), message.offset()),
                           failure=failure, reference=reference, processor="sink",
                           failed_at_ms=int(time.time() * 1000))

    def _dead_letter_malformed(self, message: Message, error: SchemaError) -> None:
        self._produce_dead_letter(message, self._malformed_record(message, error))
        log.warning("malformed event at %s[%d]@%d sent to %s", message.topic(), message.partition(),
                    message.offset(), self.settings.kafka.dead_letter_topic)

    def _produce_dead_letter(self, message: Message, record: dict[str, Any]) -> None:
        topic = self.settings.kafka.dead_letter_topic
        self.producer.produce(topic, key=message.key(), value=self.codec.encode("dead_letter", record, topic=topic))
        self.metrics.messages_out.labels(topic).inc()

    def deliver_dead_letters(self, timeout: float = 30.0) -> None:
        if self.producer.flush(timeout) > 0:
            raise RuntimeError("dead letters could not be delivered")

    # ------------------------------------------------------------ inserts

    def insert(self, batch: Batch) -> None:
        """Insert each table's rows of the batch (an insert that landed is not sent again). Frames go before
        their events: after a crash in between, the events are replayed and their frames written again
        (collapsing in ``emotion_frames``), while frames after events would be lost with the replay skipped."""
        for topic, table in self.tables.items():
            if topic in batch.inserted_topics:
                continue
            sources = batch.sources_for(topic)
            if table == EVENTS_TABLE and not batch.frames_inserted:
                frames: list[Unit] = [(source.frames, source) for source in sources if source.frames]
                self._insert_isolating(FRAMES_TABLE, frames)
                batch.frames_inserted = True
            self._insert_isolating(table, [([source.row], source) for source in sources])
            batch.inserted_topics.add(topic)

    def _insert_isolating(self, table: str, units: list[Unit]) -> None:
        """Insert the units' rows at once, with the token of exactly these units (:func:`unit_token`). When
        ClickHouse rejects rows (:func:`rejects_rows`), insert each half again (so with a token of its own),
        down to the single units it rejects, which become dead letters.
        Other errors propagate: the batch is retried and the halves that landed are dropped by their tokens."""
        if not units:
            return
        try:
            self._insert_rows(table, [row for rows, _ in units for row in rows], unit_token(table, units))
        except Exception as error:
            if not rejects_rows(error):
                raise
            if len(units) == 1:
                self._reject(units[0][1], error)
                return
            middle = len(units) // 2
            for half in (units[:middle], units[middle:]):
                self._insert_isolating(table, half)

    def _insert_rows(self, table: str, rows: list[list[Any]], token: str) -> None:
        columns = _COLUMNS[table]
        if columns[-1] == "inserted_at":  # stamped at insert time (a retry keeps its dedup token)
            now = datetime.now(UTC)
            for row in rows:
                row[-1] = now
        started = time.perf_counter()
        with self.lock:
            self.client.insert(table, rows, column_names=list(columns), database=self.settings.clickhouse.database,
                               settings=dedup_settings(token))
        self.metrics.stage_seconds.labels("insert").observe(time.perf_counter() - started)
        self.metrics.sink_rows.labels(table).inc(len(rows))

    def _reject(self, source: Source, error: Exception) -> None:
        """ClickHouse refuses this message's rows for good. Send the message to the dead-letter topic and wait
        for delivery, so that no later row of its partition is stored (and committed past) before its dead
        letter is safe. A message of the dead-letter topic itself is logged and counted instead (see the
        module docstring)."""
        message = source.message
        position = f"{message.topic()}[{message.partition()}]@{message.offset()}"
        if message.topic() == self.settings.kafka.dead_letter_topic:
            self.metrics.errors.labels(REJECTED).inc()
            log.error("ClickHouse rejected the dead letter at %s; it stays in Kafka only: %s", position,
                      error_line(error))
            return
        failure = Failure(REJECTED, "sink", type(error).__name__, error_line(error))
        reference = dict(zip(_COLUMNS[self.tables[message.topic()]], source.row, strict=True))
        self._produce_dead_letter(message, self._dead_letter_record(message, failure, reference))
        if self.producer.flush(30) > 0:
            raise RuntimeError(f"the dead letter of {position} could not be delivered")
        self.metrics.dead_letter(REJECTED, "sink")
        log.warning("ClickHouse rejected the row of %s, sent to %s: %s", position,
                    self.settings.kafka.dead_letter_topic, failure.message)


class SinkStrategy:
    """One assignment's batch: skips what is stored, flushes by size and time, retries with backoff, and
    reports each message finished once its rows are stored."""

    def __init__(self, writer: Writer, recent: dict[str, RecentIds], resume_after: dict[TopicPartition, int],
                 topic_ids: dict[str, str], report: Reporter) -> None:
        self._writer = writer
        self._recent = recent
        self._resume_after = resume_after
        self._topic_ids = topic_ids
        self._report = report
        self._limits = writer.settings.clickhouse
        self._metrics = writer.metrics
        self._batch = Batch()
        self._retry_at = 0.0
        self._backoff = FIRST_BACKOFF_SECONDS

    def submit(self, message: Message) -> None:
        if self._batch.rows >= self._limits.batch_rows and not self._flush():
            raise MessageRejected
        tp, offset = (message.topic(), message.partition()), message.offset()
        if offset <= self._resume_after.get(tp, -1):
            self._metrics.sink_skipped_replays.labels("position").inc()  # stored before a crash
            self._report(tp, offset, finished=True)
            return
        row, frames = self._writer.rows(message, self._topic_ids.get(tp[0], ""))
        recent = self._recent.get(self._writer.tables[tp[0]])
        if row is not None and recent is not None and not recent.add(row[0]):
            self._metrics.sink_skipped_replays.labels("id").inc()  # a processor's replay
            row = None
        if row is None:
            self._batch.messages.append((tp, offset))  # finished with the batch: after any dead letter it sent
            return
        self._batch.add(tp, offset, Source(message, row, frames))

    def poll(self) -> None:
        batch = self._batch
        if batch.messages and (batch.rows >= self._limits.batch_rows
                               or time.monotonic() - batch.started >= self._limits.batch_seconds):
            self._flush()

    def join(self, timeout: float) -> None:
        """Land the batch now, retrying with backoff for at most ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._batch.messages and not self._flush():
            wait = min(self._retry_at, deadline) - time.monotonic()
            if time.monotonic() >= deadline:
                return
            time.sleep(max(0.0, wait))

    def close(self) -> None:
        """Report what was not stored dropped (it is read again), and forget its ids so that replay is not
        mistaken for a repeat."""
        for tp, sources in self._batch.sources.items():
            if (recent := self._recent.get(self._writer.tables[tp[0]])) is not None:
                recent.discard(source.row[0] for source in sources)
        for tp, offset in self._batch.messages:
            self._report(tp, offset, finished=False)
        self._batch = Batch()
        self._writer.producer.flush(10)

    def _flush(self) -> bool:
        """Insert the batch if a retry is due; True once it is stored and reported finished."""
        if time.monotonic() < self._retry_at:
            return False
        batch = self._batch
        try:
            self._writer.insert(batch)
        except Exception as error:
            self._metrics.sink_insert_failures.inc()
            self._metrics.clickhouse_ok = False
            log.warning("ClickHouse insert of %d rows failed (%s: %s); retrying in %.1fs", batch.rows,
                        type(error).__name__, str(error)[:200], self._backoff)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_SECONDS)
            return False
        self._writer.deliver_dead_letters()
        for tp, offset in batch.messages:
            self._report(tp, offset, finished=True)
        self._metrics.clickhouse_ok = True
        self._metrics.sink_batch_rows.observe(batch.rows)
        self._batch = Batch()
        self._retry_at, self._backoff = 0.0, FIRST_BACKOFF_SECONDS
        return True


class SinkStrategies:
    """The strategy factory of a sink: reads where each assigned partition's stored rows end (for the topic's
    current incarnation) and the newest stored ids, then hands them to a fresh :class:`SinkStrategy`."""

    def __init__(self, writer: Writer, admin: AdminClient, recent_ids: int) -> None:
        self.writer = writer
        self._admin = admin
        self._recent = {EVENTS_TABLE: RecentIds(recent_ids), DEAD_LETTERS_TABLE: RecentIds(recent_ids)}

    def __call__(self, partitions: frozenset[TopicPartition], report: Reporter) -> SinkStrategy:
        writer = self.writer
        database = writer.settings.clickhouse.database
        topics = sorted({topic for topic, _ in partitions})
        ids = topic_ids(self._admin, topics)
        resume_after: dict[TopicPartition, int] = {}
        for topic in topics:
            table = writer.tables[topic]
            if not ids[topic]:
                log.warning("the broker reports no topic id for %s: resuming by committed offset only, "
                            "replays are dropped by id", topic)
            with writer.lock:
                stored = last_offsets(writer.client, database, table, topic, ids[topic])
                if (recent := self._recent.get(table)) is not None and recent.capacity > 0:
                    recent.update(stored_ids(writer.client, database, table, topic, recent.capacity))
            resume_after |= {(topic, p): stored[p] for t, p in partitions if t == topic and p in stored}
        return SinkStrategy(writer, self._recent, resume_after, ids, report)


def sink_limits(settings: Settings) -> LoopLimits:
    batch_rows = settings.clickhouse.batch_rows
    return LoopLimits(max_in_flight=2 * batch_rows, commit_interval_seconds=settings.batch.commit_interval_seconds,
                      join_timeout_seconds=settings.batch.revoke_grace_seconds, poll_batch=5_000)


class ClickHouseSink:
    """One member of the sink group: the consumer loop driving :class:`SinkStrategy`."""

    def __init__(self, settings: Settings, client: Any, codec: Codec, *, client_lock: threading.Lock | None = None,
                 metrics: Metrics | None = None, recent_ids: int = RECENT_IDS) -> None:
        self.metrics = metrics or Metrics("sink")
        kafka = settings.kafka
        writer = Writer(settings, client, client_lock or threading.Lock(), codec, self.metrics)
        admin = AdminClient(kafka.client_config() | {"logger": kafka_logger()})
        self.loop = ConsumerLoop(consumer_config(kafka, kafka.sink_group), list(writer.tables),
                                 SinkStrategies(writer, admin, recent_ids), sink_limits(settings),
                                 metrics=self.metrics, lag_interval=settings.observability.lag_interval_seconds,
                                 leave_group=kafka.leave_group_on_close)

    @property
    def assigned(self) -> set[TopicPartition]:
        return self.loop.assigned

    def run(self) -> None:
        self.loop.run()

    def stop(self) -> None:
        self.loop.stop()


def run_sink(settings: Settings) -> int:
    """Migrate, check for drift, serve read-only queries when we own a chDB directory, consume until
    SIGTERM/SIGINT, flush and commit, exit 0."""
    import signal

    import json

    from emofleet.schemas.codec import make_codec
    from emofleet.sinks.clickhouse import connect
    from emofleet.sinks.query_server import QueryServer, direct_runner
    from emofleet.sinks.migrations import check_drift, migrate
    from emofleet.core.config import describe
    from emofleet.core.metrics import serve, sink_health

    log.info("starting sink with settings %s", json.dumps(describe(settings)))
    metrics = Metrics("sink")
    metrics_server = serve(settings.observability, metrics, sink_health(
        metrics, settings.kafka.client_config(), settings.observability))
    client = connect(settings.clickhouse, settings.clickhouse_dsn)
    applied = migrate(client, settings.clickhouse.database, settings=settings.clickhouse)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    check_drift(client, settings.clickhouse.database)
    lock = threading.Lock()
    server = None
    if settings.clickhouse_dsn.startswith("chdb://"):
        server = QueryServer(direct_runner(client, lock), settings.data_dir)
        server.start()
    codec = make_codec(settings.kafka.schema_registry_url, settings.kafka.registry_config)
    sink = ClickHouseSink(settings, client, codec, client_lock=lock, metrics=metrics)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: sink.stop())
    log.info("sink: %s + %s -> %s", settings.kafka.results_topic, settings.kafka.dead_letter_topic,
             settings.clickhouse.database)
    try:
        sink.run()
    finally:
        if server:
            server.stop()
        if metrics_server:
            metrics_server.stop()
        client.close()
    return 0
