"""`emofleet sink`: results and dead letters from Kafka into ClickHouse, effectively once.

- Batches by rows (``batch_rows``) and time (``batch_seconds``); one insert per table per flush.
- Offsets are committed only after ClickHouse acknowledged the insert.
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
  ``SETUP_CODES`` in ``clickhouse.py``): retry with backoff, consumption paused, polling continues (so the
  group keeps the member), nothing committed, nothing lost.
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
  (see :meth:`ClickHouseSink._insert`), with their own deduplication token; frame rows count towards
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

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from emofleet.schemas.codec import Codec, SchemaError
from emofleet.sinks.clickhouse import dedup_settings, error_line, rejects_rows
from emofleet.sinks.rows import (AGGREGATE_COLUMNS, DEAD_LETTER_COLUMNS, EVENT_COLUMNS, FRAME_COLUMNS, aggregate_row,
                                 dead_letter_row, event_row, frame_rows)
from emofleet.sinks.migrations import (AGGREGATES_TABLE, DEAD_LETTERS_TABLE, EVENTS_TABLE, FRAMES_TABLE, last_offsets,
                                   quote_identifier)
from emofleet.core.config import Settings
from emofleet.streams.consumer import consumer_config, let_go
from emofleet.streams.dead_letters import Failure, Lineage, dead_letter
from emofleet.core.logs import kafka_logger
from emofleet.core.metrics import LagMonitor, Metrics
from emofleet.streams.topics import topic_ids

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 10.0
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
class PartitionRows:
    first: int
    last: int
    rows: list[list[Any]] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)  # one per row, in the same order

    @property
    def size(self) -> int:
        """Rows to insert, frame rows included."""
        return len(self.rows) + sum(len(source.frames) for source in self.sources)


@dataclass
class Batch:
    """Rows waiting for one flush, per source partition, with the offset range each covers."""

    partitions: dict[tuple[str, int], PartitionRows] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)  # when its first message arrived
    rows: int = 0
    inserted_topics: set[str] = field(default_factory=set)  # inserts that already landed
    frames_inserted: bool = False

    def add(self, topic: str, partition: int, offset: int, source: Source | None) -> None:
        """Record a position; ``source`` None means "nothing to insert" (a replay already stored)."""
        if not self.partitions:
            self.started = time.monotonic()  # the time bound counts from the first message, not the last flush
        entry = self.partitions.setdefault((topic, partition), PartitionRows(offset, offset))
        entry.last = offset
        if source is not None:
            entry.rows.append(source.row)
            entry.sources.append(source)
            self.rows += 1 + len(source.frames)

    def sources_for(self, topic: str) -> list[Source]:
        """The topic's rows in (partition, offset) order, so each partition's rows are inserted in order."""
        return [s for (t, _), entry in sorted(self.partitions.items()) if t == topic for s in entry.sources]

    def without(self, gone: set[tuple[str, int]]) -> Batch:
        kept = {tp: entry for tp, entry in self.partitions.items() if tp not in gone}
        return Batch(kept, self.started, sum(e.size for e in kept.values()), self.inserted_topics,
                     self.frames_inserted)


def unit_token(table: str, units: list[Unit]) -> str:
    """Deduplication token of an insert of ``units``, from the messages they came from and their ids: the
    same part of a batch retried gets the same token."""
    digest = hashlib.sha256(table.encode())
    for _, source in units:
        message = source.message
        digest.update(f"|{message.topic()}:{message.partition()}:{message.offset()}:{source.row[0]}".encode())
    return digest.hexdigest()[:32]


class RecentIds:
    """The last ``capacity`` ids remembered, oldest forgotten first; ``capacity`` 0 remembers nothing."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> bool:
        """Remember ``key``; False when it was remembered already (a repeat)."""
        if self.capacity <= 0:
            return True
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


class ClickHouseSink:
    def __init__(self, settings: Settings, client: Any, codec: Codec, *, client_lock: threading.Lock | None = None,
                 metrics: Metrics | None = None, recent_ids: int = RECENT_IDS) -> None:
        self._settings = settings
        self.metrics = metrics or Metrics("sink")
        self._client = client
        self._lock = client_lock or threading.Lock()
        self._codec = codec
        kafka = settings.kafka
        self._topics = {kafka.results_topic: EVENTS_TABLE, kafka.dead_letter_topic: DEAD_LETTERS_TABLE,
                        kafka.aggregates_topic: AGGREGATES_TABLE}
        self._consumer = Consumer(consumer_config(kafka, kafka.sink_group))
        self._admin = AdminClient(kafka.client_config() | {"logger": kafka_logger()})
        self._topic_ids: dict[str, str] = {}  # incarnation of each assigned topic, read on assignment
        self._producer = Producer(kafka.client_config() | {"enable.idempotence": True, "acks": "all",
                                                           "logger": kafka_logger()})
        self._lag = LagMonitor(self._consumer, self.metrics.consumer_lag, settings.observability.lag_interval_seconds)
        self._batch = Batch()
        self._resume_after: dict[tuple[str, int], int] = {}
        self._last_seen: dict[tuple[str, int], int] = {}  # offset of the last message accepted per partition
        self._recent = {EVENTS_TABLE: RecentIds(recent_ids), DEAD_LETTERS_TABLE: RecentIds(recent_ids)}
        self._stop = threading.Event()
        self._failed = False
        self.assigned: set[tuple[str, int]] = set()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        self._consumer.subscribe(list(self._topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)
        try:
            while not self._stop.is_set():
                for message in self._consumer.consume(num_messages=5_000, timeout=0.1):
                    self._accept(message)
                    if self._batch.rows >= self._settings.clickhouse.batch_rows:
                        self._flush_until_done()
                if self._due():
                    self._flush_until_done()
                self._observe()
            self._flush_until_done()
        except BaseException:
            self._failed = True  # commit nothing more: the next owner replays and skips what is stored
            raise
        finally:
            self._producer.flush(10)
            # close() runs the revoke callbacks, which need the sink intact; then the last references go
            let_go(self._consumer, leave_group=self._settings.kafka.leave_group_on_close)
            self._consumer = self._lag = None  # type: ignore[assignment]

    def _observe(self) -> None:
        """Gauges, lag and the liveness heartbeat, once per turn of the loop."""
        self.metrics.heartbeat()
        self.metrics.set_assigned(len(self.assigned))
        self.metrics.in_flight.set(self._batch.rows)
        self._lag.update(self.assigned)

    # ------------------------------------------------------------ batching

    def _due(self) -> bool:
        batch = self._batch
        limits = self._settings.clickhouse
        return bool(batch.partitions) and (batch.rows >= limits.batch_rows
                                           or time.monotonic() - batch.started >= limits.batch_seconds)

    def _accept(self, message: Message) -> None:
        if (error := message.error()) is not None:
            if error.fatal():
                raise KafkaException(error)
            if error.code() != KafkaError._PARTITION_EOF:
                self.metrics.errors.labels("consumer").inc()
                log.warning("consumer error: %s", error.str())
            return
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        self.metrics.messages_in.labels(topic).inc()
        if offset <= self._last_seen.get((topic, partition), -1):
            self._log_restarted(topic, partition, offset)
        self._last_seen[(topic, partition)] = offset
        if offset <= self._resume_after.get((topic, partition), -1):
            self.metrics.sink_skipped_replays.labels("position").inc()  # stored before a crash; see module docstring
            self._batch.add(topic, partition, offset, None)
            return
        row, frames = self._row(message, datetime.now(UTC))
        recent = self._recent.get(self._topics[topic])
        if row is not None and recent is not None and not recent.add(row[0]):
            self.metrics.sink_skipped_replays.labels("id").inc()  # a processor's replay; see module docstring
            row = None
        self._batch.add(topic, partition, offset, None if row is None else Source(message, row, frames))

    def _log_restarted(self, topic: str, partition: int, offset: int) -> None:
        """Offsets went back within one assignment: the broker serves a new log (topic recreated, memory
        storage restarted) before the group noticed. Stored positions say nothing about it any more."""
        log.warning("offsets of %s[%d] went back to %d: the topic has a new log; reading it from there",
                    topic, partition, offset)
        self._resume_after.pop((topic, partition), None)
        self._topic_ids |= topic_ids(self._admin, [topic])

    def _row(self, message: Message, now: datetime) -> tuple[list[Any] | None, list[list[Any]]]:
        """The message's row (None: nothing to insert) and the frame rows it writes as well."""
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        if self._topics[topic] == AGGREGATES_TABLE:
            try:
                aggregate = self._codec.decode("emotion_aggregate", message.value() or b"", topic=topic)
            except SchemaError as error:
                self._dead_letter_malformed(message, error)
                return None, []
            return aggregate_row(aggregate, topic, partition, offset, now, self._topic_ids.get(topic, "")), []
        if self._topics[topic] == EVENTS_TABLE:
            try:
                event = self._codec.decode("emotion_event", message.value() or b"", topic=topic)
            except SchemaError as error:
                self._dead_letter_malformed(message, error)
                return None, []
            return (event_row(event, topic, partition, offset, now, self._topic_ids.get(topic, "")),
                    frame_rows(event, self._settings.clickhouse.max_frames_per_clip))
        try:
            record = self._codec.decode("dead_letter", message.value() or b"", topic=topic)
        except SchemaError as error:
            record = self._malformed_record(message, error)
        return dead_letter_row(record, topic, partition, offset, now, self._topic_ids.get(topic, "")), []

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
                    message.offset(), self._settings.kafka.dead_letter_topic)

    def _produce_dead_letter(self, message: Message, record: dict[str, Any]) -> None:
        topic = self._settings.kafka.dead_letter_topic
        self._producer.produce(topic, key=message.key(), value=self._codec.encode("dead_letter", record, topic=topic))
        self.metrics.messages_out.labels(topic).inc()

    # ------------------------------------------------------------ flushing

    def _flush_until_done(self) -> None:
        """Insert the batch (rows ClickHouse rejects become dead letters: :meth:`_insert_isolating`), retrying
        other failures with backoff while paused-but-polling; then commit."""
        if not self._batch.partitions:
            return
        delay = 0.2
        paused = False
        while True:
            try:
                self._insert(self._batch)
                break
            except Exception as error:
                self.metrics.sink_insert_failures.inc()
                self.metrics.clickhouse_ok = False
                log.warning("ClickHouse insert of %d rows failed (%s: %s); retrying in %.1fs",
                            self._batch.rows, type(error).__name__, str(error)[:200], delay)
                if not paused:
                    self._consumer.pause(self._consumer.assignment())
                    self.metrics.paused_partitions.set(len(self.assigned))
                    paused = True
                self._wait_polling(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
        if self._producer.flush(30) > 0:
            raise RuntimeError("dead letters could not be delivered")
        self._commit(self._batch)
        if paused:
            self._consumer.resume(self._consumer.assignment())
            self.metrics.paused_partitions.set(0)
        self.metrics.clickhouse_ok = True
        self.metrics.sink_batch_rows.observe(self._batch.rows)
        self._batch = Batch()

    def _wait_polling(self, seconds: float) -> None:
        """Keep the member alive in the group while waiting. The batch is not touched: its retry must send
        the same rows with the same tokens, and what already landed must not grow (see :meth:`_put_back`)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop.is_set():
            rewound: set[tuple[str, int]] = set()
            for message in self._consumer.consume(num_messages=100, timeout=min(0.1, seconds)):
                if message.error() is not None:
                    self._accept(message)  # raised or logged as in the main loop
                elif (message.topic(), message.partition()) not in rewound:
                    self._put_back(message)
                    rewound.add((message.topic(), message.partition()))
            self._observe()

    def _put_back(self, message: Message) -> None:
        """A message fetched while the batch is retried (before the pause took effect, or from a partition
        assigned meanwhile): pause its partition and rewind it there, so it is read again after the flush.
        Added to the batch instead, it would change the retry's tokens and could join a table whose insert
        already landed, and be committed without being stored."""
        position = TopicPartition(message.topic(), message.partition(), message.offset())
        self._consumer.pause([position])
        self._consumer.seek(position)

    def _insert(self, batch: Batch) -> None:
        """Insert each table's rows of the batch (an insert that landed is not sent again). Frames go before
        their events: after a crash in between, the events are replayed and their frames written again
        (collapsing in ``emotion_frames``), while frames after events would be lost with the replay skipped."""
        for topic, table in self._topics.items():
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
        with self._lock:
            self._client.insert(table, rows, column_names=list(columns), database=self._settings.clickhouse.database,
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
        if message.topic() == self._settings.kafka.dead_letter_topic:
            self.metrics.errors.labels(REJECTED).inc()
            log.error("ClickHouse rejected the dead letter at %s; it stays in Kafka only: %s", position,
                      error_line(error))
            return
        failure = Failure(REJECTED, "sink", type(error).__name__, error_line(error))
        reference = dict(zip(_COLUMNS[self._topics[message.topic()]], source.row, strict=True))
        self._produce_dead_letter(message, self._dead_letter_record(message, failure, reference))
        if self._producer.flush(30) > 0:
            raise RuntimeError(f"the dead letter of {position} could not be delivered")
        self.metrics.dead_letter(REJECTED, "sink")
        log.warning("ClickHouse rejected the row of %s, sent to %s: %s", position,
                    self._settings.kafka.dead_letter_topic, failure.message)

    def _commit(self, batch: Batch) -> None:
        offsets = [TopicPartition(t, p, entry.last + 1) for (t, p), entry in batch.partitions.items()
                   if (t, p) in self.assigned]
        if offsets:
            started = time.perf_counter()
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as error:
                # e.g. UNKNOWN_MEMBER_ID after a broker restart or a session timeout. The rows are stored:
                # whoever replays them next skips them (resume_after), so this is no reason to die.
                if error.args[0].fatal():
                    raise
                self.metrics.commit_failures.inc()
                log.warning("offset commit failed (%s); the stored rows will be skipped when replayed",
                            error.args[0].str())
                return
            self.metrics.commit_seconds.labels("sync").observe(time.perf_counter() - started)
            self._lag.committed({(o.topic, o.partition): o.offset for o in offsets})

    # ------------------------------------------------------------ rebalancing

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("assign").inc()
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        topics = sorted({p.topic for p in partitions})
        self._topic_ids |= topic_ids(self._admin, topics)
        for topic in topics:
            table, database = self._topics[topic], self._settings.clickhouse.database
            if not self._topic_ids[topic]:
                log.warning("the broker reports no topic id for %s: resuming by committed offset only, "
                            "replays are dropped by id", topic)
            with self._lock:
                stored = last_offsets(self._client, database, table, topic, self._topic_ids[topic])
                if (recent := self._recent.get(table)) is not None and recent.capacity > 0:
                    recent.update(stored_ids(self._client, database, table, topic, recent.capacity))
            for p in partitions:
                if p.topic == topic and p.partition in stored:
                    self._resume_after[(topic, p.partition)] = stored[p.partition]

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Flush so the next owner starts after our rows; if ClickHouse is down, hand the revoked
        partitions' rows back uninserted (the next owner replays them) and keep the rest."""
        self.metrics.rebalances.labels("revoke").inc()
        if self._failed:
            self._forget(partitions)
            return
        try:
            self._insert(self._batch)
            self._producer.flush(10)
            self._commit(self._batch)
            self._batch = Batch()
        except Exception as error:
            log.warning("flush on revoke failed (%s); the next owner replays the revoked partitions", error)
            self._hand_back(partitions)
        self._forget(partitions)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("lost").inc()
        self._hand_back(partitions)
        self._forget(partitions)

    def _hand_back(self, partitions: list[TopicPartition]) -> None:
        """Drop these partitions' uninserted rows (their next owner replays them), and their ids with them."""
        gone = {(p.topic, p.partition) for p in partitions}
        for (topic, partition), entry in self._batch.partitions.items():
            if (topic, partition) in gone and (recent := self._recent.get(self._topics[topic])) is not None:
                recent.discard(row[0] for row in entry.rows)
        self._batch = self._batch.without(gone)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        self.assigned -= gone
        self._lag.forget(gone)
        for tp in gone:
            self._resume_after.pop(tp, None)
            self._last_seen.pop(tp, None)


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
