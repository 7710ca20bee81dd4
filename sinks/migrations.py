"""ClickHouse schema of emofleet: versioned DDL applied once, recorded in ``schema_migrations``.

:func:`migrate` runs at sink start: it creates ``<db>.schema_migrations`` if missing, reads which
versions are applied, verifies their checksums against :data:`MIGRATIONS` and applies the rest in order.
Every statement is idempotent on its own (``IF NOT EXISTS``), so a process killed half-way simply
re-applies the unfinished migration next time, and two sinks starting together both succeed
(``schema_migrations`` is a ReplacingMergeTree keyed on version and read with FINAL).

**Rules for changing the schema**: never edit an applied migration (its checksum is stored, and a
mismatch stops the sink with :class:`MigrationError`); append a new :class:`Migration` with the next
version (``ALTER TABLE {db}.emotion_events ADD COLUMN IF NOT EXISTS ...``) and update
:data:`EXPECTED_COLUMNS` (and ``rows.py``) to the resulting table shape. :func:`check_drift` then
compares the live tables to that shape.

Schema choices (the lead's README can point here):

* ``emotion_events`` - one row per EmotionEvent (whole-clip summary ``segment_index = -1`` and windows
  ``>= 0``). ``ReplacingMergeTree(processed_at)`` ordered by ``(tenant, source, reference_produced_at,
  event_id)``: every part of the key is deterministic for a given reference and model, so an event
  processed again (redelivery, replay, reprocessing) collapses to its newest ``processed_at`` on merge.
  Queries that must not see duplicates before a merge use ``FINAL`` (the analytics report does).
  Partitioned by month of ``reference_produced_at`` (event time, also deterministic). Caveat: a clip
  re-*sent* as a new AudioReference with a new ``produced_at`` keeps its event_id but lands on another
  sort key, so it does not collapse (query ``LIMIT 1 BY event_id`` if that matters).
* Null optional strings are stored as ``''`` (``LowCardinality(String)``; key columns cannot be
  Nullable without ``allow_nullable_key``). ``call_id`` is a plain ``String`` with a bloom-filter index
  rather than LowCardinality: it is unique per call, and LowCardinality dictionaries degrade past ~10k
  distinct values per part. ``label`` is ``LowCardinality(String)`` rather than Enum8 so that a new
  symbol in the Avro enum needs no ALTER (the Avro reader already maps unknown symbols to ``unknown``).
  Scores are flattened to ``score_<emotion>`` Float32 columns; ``embedding`` is ``Array(Float32)``
  (``[]`` when absent); per-frame scores live in ``emotion_frames``.
* ``kafka_topic``/``kafka_partition``/``kafka_offset``/``kafka_topic_id``: where the row sits in the
  *results* topic and which incarnation of that topic (Kafka's topic id) it was read from; the sink
  resumes from ``max(kafka_offset) + 1`` per partition of the current incarnation (:func:`last_offsets`).
* ``non_replicated_deduplication_window = 1000`` on every table written by inserts: an insert repeated
  with the same ``insert_deduplication_token`` (e.g. a batch re-sent after a timeout whose first attempt
  did land) is dropped, including in the materialized view's target (``emotion_minutes`` needs the window
  too, else the MV still double-counts: measured on chDB 26.9).
* ``dead_letters`` - ``ReplacingMergeTree(failed_at) ORDER BY dead_letter_id`` (deterministic id, so a
  redelivered failure collapses); not partitioned (low volume; a partition key on the non-deterministic
  failed_at would keep duplicates apart). ``key`` is ``Nullable(String)`` (no key != empty key for
  replay), ``payload`` String (raw bytes), ``headers`` ``Array(Tuple(key String, value Nullable(String)))``
  to keep order, repeated names and null values exactly as Kafka had them.
* ``emotion_frames`` - frame-granularity scores of whole-clip events, one row per 20 ms frame, with the
  event's ``tenant`` (migration 7). At most ``max_frames_per_clip`` rows per clip: a longer clip is
  mean-pooled (see ``rows.frame_rows``). ``ReplacingMergeTree`` on ``(event_id, frame_index)``: frames
  written again after a sink crash collapse on merge (read with ``FINAL`` when that matters).
* ``emotion_minutes`` - AggregatingMergeTree fed by the materialized view ``emotion_minutes_mv``: per
  minute (of ``reference_produced_at``) x tenant x source x label: ``clips``
  (``SimpleAggregateFunction(sum, UInt64)``) and ``confidence`` (``avgState``), whole-clip events only.
  The MV counts inserts: duplicates removed later by ReplacingMergeTree merges are still counted there
  (exact numbers: query ``emotion_events FINAL``). Rows inserted before the MV existed are not in it.
* ``emotion_aggregates`` - one row per window aggregate of `emofleet aggregate` (EmotionAggregate).
  ``ReplacingMergeTree(inserted_at)``: the sort key ``(tenant, scope, scope_value, window_type, window_start,
  aggregate_id)`` and the partition (month of ``window_start``) are functions of ``aggregate_id``, so a
  window re-published after an aggregator crash (same id, same content) collapses into one row; read with
  ``FINAL``. Label counts are flattened to ``count_<emotion>``; Kafka lineage as in ``emotion_events``.

Retention (not a migration: settings, so changing one and restarting the sink changes the tables):
:func:`migrate` given the ``ClickHouseSettings`` calls :func:`apply_retention`, which reads each table's
live TTL from ``system.tables`` and runs ``ALTER TABLE ... MODIFY TTL`` (or ``REMOVE TTL`` for 0 days =
keep forever) only where it differs from the settings. ClickHouse then materializes the new TTL once
(a mutation over the existing parts) and drops expired rows on merges. Rows expire by *event* time:
``emotion_events`` and ``emotion_frames`` by ``reference_produced_at`` (``events_ttl_days`` 30,
``frames_ttl_days`` 7), ``emotion_aggregates`` by ``window_end`` and ``emotion_minutes`` by ``minute``
(``aggregates_ttl_days`` 365: small rollups outlive the raw rows), ``dead_letters`` by ``failed_at``
(``dead_letters_ttl_days`` 90) while its ``payload`` column is emptied after
``dead_letter_payload_ttl_days`` (7): the failure's metadata stays searchable, the raw bytes go. So a
backfill of audio older than the retention is removed at the next merge. Only MergeTree tables are
altered: on a cluster, where the sink's tables are Distributed, set the TTLs on the local tables.
"""

from __future__ import annotations

from emofleet.core.errors import UserFacingError

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from emofleet.schemas.emotions import EMOTIONS
from emofleet.sinks.rows import AGGREGATE_COLUMNS, DEAD_LETTER_COLUMNS, EVENT_COLUMNS, FRAME_COLUMNS
from emofleet.core.config import ClickHouseSettings

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "schema_migrations"
EVENTS_TABLE = "emotion_events"
DEAD_LETTERS_TABLE = "dead_letters"
FRAMES_TABLE = "emotion_frames"
MINUTES_TABLE = "emotion_minutes"
MINUTES_VIEW = "emotion_minutes_mv"
AGGREGATES_TABLE = "emotion_aggregates"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TableSchemaError(UserFacingError):
    """The ClickHouse tables do not match this code (base class of the two below)."""

    hint = "check the DSN (`emofleet config`) and that the sink runs"


class MigrationError(TableSchemaError):
    """The database's migration history does not match this code (edited or unknown migration)."""


class SchemaDriftError(TableSchemaError):
    """The live tables differ from the expected columns; the message lists every difference."""

    def __init__(self, message: str, differences: Sequence[str]) -> None:
        super().__init__(message)
        self.differences = list(differences)


def quote_identifier(name: str) -> str:
    """Back-quoted identifier for SQL; only plain names are accepted (database names come from config)."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"invalid ClickHouse identifier {name!r}: use letters, digits and _ only")
    return f"`{name}`"


@dataclass(frozen=True)
class Migration:
    """One schema step: ``statements`` with ``{db}`` standing for the quoted database name."""

    version: int
    name: str
    statements: tuple[str, ...]

    @property
    def checksum(self) -> str:
        """SHA-256 of the statements with whitespace collapsed (re-indenting is not a change)."""
        normalized = "\n;\n".join(" ".join(s.split()) for s in self.statements)
        return hashlib.sha256(normalized.encode()).hexdigest()

    def render(self, database: str) -> list[str]:
        db = quote_identifier(database)
        return [s.replace("{db}", db) for s in self.statements]


# ------------------------------------------------------------------------------------ migrations
# Append only. Never edit a migration once released: its checksum is stored in schema_migrations.

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create_emotion_events", (
        """
CREATE TABLE IF NOT EXISTS {db}.emotion_events
(
    event_id String,
    audio_id String,
    uri String,
    content_sha256 String,
    model_id LowCardinality(String),
    model_revision LowCardinality(String),
    granularity LowCardinality(String),
    label LowCardinality(String),
    confidence Float32,
    score_angry Float32,
    score_disgusted Float32,
    score_fearful Float32,
    score_happy Float32,
    score_neutral Float32,
    score_other Float32,
    score_sad Float32,
    score_surprised Float32,
    score_unknown Float32,
    embedding Array(Float32),
    duration_seconds Float64,
    segment_index Int32,
    segment_count Int32,
    segment_start_seconds Float64,
    segment_end_seconds Float64,
    processed_at DateTime64(3, 'UTC'),
    processing_latency_ms Int64,
    cache_hit Bool,
    tenant LowCardinality(String),
    source LowCardinality(String),
    channel LowCardinality(String),
    call_id String,
    attributes Map(String, String),
    reference_produced_at DateTime64(3, 'UTC'),
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    kafka_topic LowCardinality(String),
    kafka_partition UInt16,
    kafka_offset UInt64 CODEC(Delta, ZSTD),
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3, 'UTC'),
    INDEX idx_audio_id audio_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_call_id call_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(processed_at)
PARTITION BY toYYYYMM(reference_produced_at)
ORDER BY (tenant, source, reference_produced_at, event_id)
SETTINGS non_replicated_deduplication_window = 1000
""",
    )),
    Migration(2, "create_dead_letters", (
        """
CREATE TABLE IF NOT EXISTS {db}.dead_letters
(
    dead_letter_id String,
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    key Nullable(String),
    payload String,
    headers Array(Tuple(key String, value Nullable(String))),
    error_class LowCardinality(String),
    error_message String,
    reason LowCardinality(String),
    stage LowCardinality(String),
    attempts Int32,
    audio_id String,
    uri String,
    failed_at DateTime64(3, 'UTC'),
    processor LowCardinality(String),
    kafka_topic LowCardinality(String),
    kafka_partition UInt16,
    kafka_offset UInt64,
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(failed_at)
ORDER BY dead_letter_id
SETTINGS non_replicated_deduplication_window = 1000
""",
    )),
    Migration(3, "create_emotion_frames", (
        """
CREATE TABLE IF NOT EXISTS {db}.emotion_frames
(
    event_id String,
    reference_produced_at DateTime64(3, 'UTC'),
    processed_at DateTime64(3, 'UTC'),
    frame_index UInt32,
    score_angry Float32,
    score_disgusted Float32,
    score_fearful Float32,
    score_happy Float32,
    score_neutral Float32,
    score_other Float32,
    score_sad Float32,
    score_surprised Float32,
    score_unknown Float32
)
ENGINE = ReplacingMergeTree(processed_at)
PARTITION BY toYYYYMM(reference_produced_at)
ORDER BY (event_id, frame_index)
SETTINGS non_replicated_deduplication_window = 1000
""",
    )),
    Migration(4, "create_emotion_minutes", (
        """
CREATE TABLE IF NOT EXISTS {db}.emotion_minutes
(
    minute DateTime('UTC'),
    tenant LowCardinality(String),
    source LowCardinality(String),
    label LowCardinality(String),
    clips SimpleAggregateFunction(sum, UInt64),
    confidence AggregateFunction(avg, Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (tenant, source, minute, label)
SETTINGS non_replicated_deduplication_window = 1000
""",
        """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.emotion_minutes_mv TO {db}.emotion_minutes AS
SELECT
    toDateTime(toStartOfMinute(reference_produced_at), 'UTC') AS minute,
    tenant,
    source,
    label,
    toUInt64(count()) AS clips,
    avgState(confidence) AS confidence
FROM {db}.emotion_events
WHERE segment_index = -1
GROUP BY minute, tenant, source, label
""",
    )),
    Migration(5, "create_emotion_aggregates", (
        """
CREATE TABLE IF NOT EXISTS {db}.emotion_aggregates
(
    aggregate_id String,
    scope LowCardinality(String),
    tenant LowCardinality(String),
    scope_value String,
    window_type LowCardinality(String),
    window_size_seconds UInt32,
    window_hop_seconds UInt32,
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    clips UInt32,
    count_angry UInt32,
    count_disgusted UInt32,
    count_fearful UInt32,
    count_happy UInt32,
    count_neutral UInt32,
    count_other UInt32,
    count_sad UInt32,
    count_surprised UInt32,
    count_unknown UInt32,
    mean_confidence Float64,
    negativity Float64,
    first_event_at DateTime64(3, 'UTC'),
    last_event_at DateTime64(3, 'UTC'),
    kafka_topic LowCardinality(String),
    kafka_partition UInt16,
    kafka_offset UInt64,
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(window_start)
ORDER BY (tenant, scope, scope_value, window_type, window_start, aggregate_id)
SETTINGS non_replicated_deduplication_window = 1000
""",
    )),
    # The log a row was read from: Kafka's topic id changes when a topic is recreated (or a memory-backed
    # broker restarts), offsets start again from 0, and resuming by offset alone would skip the new log.
    Migration(6, "add_kafka_topic_id", tuple(
        f"ALTER TABLE {{db}}.{table} ADD COLUMN IF NOT EXISTS kafka_topic_id LowCardinality(String) DEFAULT '' "
        "AFTER kafka_offset"
        for table in ("emotion_events", "dead_letters", "emotion_aggregates"))),
    Migration(7, "add_emotion_frames_tenant", (
        "ALTER TABLE {db}.emotion_frames ADD COLUMN IF NOT EXISTS tenant LowCardinality(String) DEFAULT '' "
        "AFTER event_id",
    )),
)

# ------------------------------------------------------------------------------------ expected shape
# The columns (name, type as system.columns spells it) the tables have after all MIGRATIONS.

_SCORE_TYPES = tuple((f"score_{e}", "Float32") for e in EMOTIONS)
_DT = "DateTime64(3, 'UTC')"
_LC = "LowCardinality(String)"
_LINEAGE_TYPES = (("kafka_topic", _LC), ("kafka_partition", "UInt16"), ("kafka_offset", "UInt64"),
                  ("kafka_topic_id", _LC), ("inserted_at", _DT))

EXPECTED_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    EVENTS_TABLE: (
        ("event_id", "String"), ("audio_id", "String"), ("uri", "String"), ("content_sha256", "String"),
        ("model_id", _LC), ("model_revision", _LC), ("granularity", _LC), ("label", _LC),
        ("confidence", "Float32"), *_SCORE_TYPES, ("embedding", "Array(Float32)"),
        ("duration_seconds", "Float64"), ("segment_index", "Int32"), ("segment_count", "Int32"),
        ("segment_start_seconds", "Float64"), ("segment_end_seconds", "Float64"),
        ("processed_at", _DT), ("processing_latency_ms", "Int64"), ("cache_hit", "Bool"),
        ("tenant", _LC), ("source", _LC), ("channel", _LC), ("call_id", "String"),
        ("attributes", "Map(String, String)"), ("reference_produced_at", _DT),
        ("source_topic", _LC), ("source_partition", "Int32"), ("source_offset", "Int64"),
        *_LINEAGE_TYPES,
    ),
    DEAD_LETTERS_TABLE: (
        ("dead_letter_id", "String"), ("source_topic", _LC), ("source_partition", "Int32"),
        ("source_offset", "Int64"), ("key", "Nullable(String)"), ("payload", "String"),
        ("headers", "Array(Tuple(key String, value Nullable(String)))"),
        ("error_class", _LC), ("error_message", "String"), ("reason", _LC), ("stage", _LC),
        ("attempts", "Int32"), ("audio_id", "String"), ("uri", "String"), ("failed_at", _DT),
        ("processor", _LC),
        *_LINEAGE_TYPES,
    ),
    FRAMES_TABLE: (
        ("event_id", "String"), ("tenant", _LC), ("reference_produced_at", _DT), ("processed_at", _DT),
        ("frame_index", "UInt32"), *_SCORE_TYPES,
    ),
    AGGREGATES_TABLE: (
        ("aggregate_id", "String"), ("scope", _LC), ("tenant", _LC), ("scope_value", "String"),
        ("window_type", _LC), ("window_size_seconds", "UInt32"), ("window_hop_seconds", "UInt32"),
        ("window_start", _DT), ("window_end", _DT), ("clips", "UInt32"),
        *((f"count_{e}", "UInt32") for e in EMOTIONS),
        ("mean_confidence", "Float64"), ("negativity", "Float64"), ("first_event_at", _DT), ("last_event_at", _DT),
        *_LINEAGE_TYPES,
    ),
}
DRIFT_CHECKED_TABLES: tuple[str, ...] = (EVENTS_TABLE, DEAD_LETTERS_TABLE, FRAMES_TABLE, AGGREGATES_TABLE)

assert tuple(n for n, _ in EXPECTED_COLUMNS[EVENTS_TABLE]) == EVENT_COLUMNS
assert tuple(n for n, _ in EXPECTED_COLUMNS[DEAD_LETTERS_TABLE]) == DEAD_LETTER_COLUMNS
assert tuple(n for n, _ in EXPECTED_COLUMNS[FRAMES_TABLE]) == FRAME_COLUMNS
assert tuple(n for n, _ in EXPECTED_COLUMNS[AGGREGATES_TABLE]) == AGGREGATE_COLUMNS


# ------------------------------------------------------------------------------------ operations


def ensure_migrations_table(client: Any, database: str) -> None:
    db = quote_identifier(database)
    client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    client.command(f"""
CREATE TABLE IF NOT EXISTS {db}.{MIGRATIONS_TABLE}
(
    version UInt32,
    name String,
    checksum String,
    applied_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version
""")


def applied_migrations(client: Any, database: str) -> dict[int, tuple[str, str]]:
    """``{version: (name, checksum)}`` of the migrations recorded in the database."""
    db = quote_identifier(database)
    rows = client.query(f"SELECT version, name, checksum FROM {db}.{MIGRATIONS_TABLE} FINAL").result_rows
    return {int(version): (name, checksum) for version, name, checksum in rows}


def migrate(client: Any, database: str, migrations: Sequence[Migration] = MIGRATIONS, *,
            settings: ClickHouseSettings | None = None) -> list[str]:
    """Apply the migrations the database lacks, in version order; return the names applied now. With
    ``settings``, then bring the tables' TTLs to its retention (:func:`apply_retention`); without, TTLs
    are left as they are.

    Raises :class:`MigrationError` when an applied migration's checksum differs from the code's (someone
    edited a released migration) or the database has versions this code does not know (newer code wrote
    it). Safe to call on every start; a second call returns ``[]``.
    """
    _check_sequence(migrations)
    ensure_migrations_table(client, database)
    applied = applied_migrations(client, database)
    known = {m.version: m for m in migrations}
    problems = []
    for version, (name, checksum) in sorted(applied.items()):
        migration = known.get(version)
        if migration is None:
            problems.append(f"version {version} ({name}) is applied but unknown to this emofleet "
                            "(was the database migrated by a newer version?)")
        elif migration.checksum != checksum:
            problems.append(f"version {version} ({name}) was changed after it was applied "
                            f"(checksum {checksum[:12]} in the database, {migration.checksum[:12]} in the code); "
                            "add a new migration instead of editing an applied one")
    if problems:
        raise MigrationError(f"schema migrations of database {database!r} do not match the code: "
                             + "; ".join(problems))
    done = []
    db = quote_identifier(database)
    for migration in sorted(migrations, key=lambda m: m.version):
        if migration.version in applied:
            continue
        for statement in migration.render(database):
            client.command(statement)
        client.insert(f"{db}.{MIGRATIONS_TABLE}",
                      [[migration.version, migration.name, migration.checksum, datetime.now(UTC)]],
                      column_names=["version", "name", "checksum", "applied_at"])
        done.append(migration.name)
    if settings is not None:
        apply_retention(client, database, settings)
    return done


@dataclass(frozen=True)
class TTL:
    """The TTL a table, or one of its columns, should have. ``expression`` is spelled as ClickHouse prints
    it back in ``system.tables`` (so an unchanged TTL compares equal); None = keep forever."""

    table: str
    expression: str | None
    column: str = ""  # a column TTL: the column's value is reset on expiry, the row stays


def retention(settings: ClickHouseSettings) -> tuple[TTL, ...]:
    """The TTLs ``settings`` ask for (see "Retention" in the module docstring)."""
    return (
        TTL(EVENTS_TABLE, _expiry("reference_produced_at", settings.events_ttl_days)),
        TTL(FRAMES_TABLE, _expiry("reference_produced_at", settings.frames_ttl_days)),
        TTL(AGGREGATES_TABLE, _expiry("window_end", settings.aggregates_ttl_days)),
        TTL(MINUTES_TABLE, _expiry("minute", settings.aggregates_ttl_days)),
        TTL(DEAD_LETTERS_TABLE, _expiry("failed_at", settings.dead_letters_ttl_days)),
        TTL(DEAD_LETTERS_TABLE, _expiry("failed_at", settings.dead_letter_payload_ttl_days), column="payload"),
    )


def _expiry(column: str, days: int) -> str | None:
    return f"toDateTime({column}) + toIntervalDay({int(days)})" if days > 0 else None


def apply_retention(client: Any, database: str, settings: ClickHouseSettings) -> list[str]:
    """Run the ``ALTER TABLE`` statements that bring the live TTLs to :func:`retention`; return them (``[]``
    when every TTL already matches). Tables that are not MergeTree are left alone."""
    done = []
    for ttl in retention(settings):
        rows = client.query(
            "SELECT engine, engine_full, create_table_query FROM system.tables "
            "WHERE database = {db:String} AND name = {table:String}",
            parameters={"db": database, "table": ttl.table}).result_rows
        if not rows or not rows[0][0].endswith("MergeTree"):
            continue
        _, engine_full, create = rows[0]
        live = _column_ttl(create, ttl.column) if ttl.column else _table_ttl(engine_full)
        if live == ttl.expression:
            continue
        statement = _ttl_statement(database, ttl)
        log.info("retention: %s", statement)
        client.command(statement)
        done.append(statement)
    return done


def _table_ttl(engine_full: str) -> str | None:
    match = re.search(r" TTL (.+?)(?: SETTINGS |$)", engine_full)
    return match.group(1) if match else None


def _column_ttl(create_table_query: str, column: str) -> str | None:
    """The TTL in ``column``'s definition: it ends at the next column, constraint or index, or the engine."""
    match = re.search(rf"`{re.escape(column)}` (?:(?!\) ENGINE)[^`])*? TTL (.+?)(?=, `|, [A-Z]+ |\) ENGINE)",
                      create_table_query)
    return match.group(1) if match else None


def _ttl_statement(database: str, ttl: TTL) -> str:
    table = f"{quote_identifier(database)}.{quote_identifier(ttl.table)}"
    if ttl.column:
        change = f"MODIFY COLUMN {quote_identifier(ttl.column)} " + (
            f"TTL {ttl.expression}" if ttl.expression else "REMOVE TTL")
    else:
        change = f"MODIFY TTL {ttl.expression}" if ttl.expression else "REMOVE TTL"
    return f"ALTER TABLE {table} {change}"


def _check_sequence(migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions) or any(v < 1 for v in versions):
        raise MigrationError(f"migration versions must be unique and >= 1, got {versions}")


def live_columns(client: Any, database: str, table: str) -> list[tuple[str, str]]:
    """(name, type) of the table's stored columns in table order (ALIAS/MATERIALIZED/EPHEMERAL skipped:
    they cannot break inserts with explicit column names)."""
    rows = client.query(
        "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {table:String} "
        "AND default_kind NOT IN ('ALIAS', 'MATERIALIZED', 'EPHEMERAL') ORDER BY position",
        parameters={"db": database, "table": table}).result_rows
    return [(name, type_) for name, type_ in rows]


def drift(client: Any, database: str, tables: Sequence[str] = DRIFT_CHECKED_TABLES) -> list[str]:
    """Human-readable differences between the live tables and :data:`EXPECTED_COLUMNS` (empty = none)."""
    differences: list[str] = []
    for table in tables:
        expected = dict(EXPECTED_COLUMNS[table])
        live = dict(live_columns(client, database, table))
        if not live:
            differences.append(f"{database}.{table}: table is missing")
            continue
        for name, type_ in expected.items():
            if name not in live:
                differences.append(f"{database}.{table}.{name}: column is missing (expected {type_})")
            elif live[name] != type_:
                differences.append(f"{database}.{table}.{name}: type is {live[name]}, expected {type_}")
        for name, type_ in live.items():
            if name not in expected:
                differences.append(f"{database}.{table}.{name}: unexpected column ({type_})")
    return differences


def check_drift(client: Any, database: str) -> None:
    """Raise :class:`SchemaDriftError` when ``emotion_events``, ``dead_letters``, ``emotion_frames`` or
    ``emotion_aggregates`` differ from the columns this code writes (someone ALTERed them by hand, or
    migrations were skipped)."""
    differences = drift(client, database)
    if differences:
        raise SchemaDriftError(
            f"ClickHouse schema drift in database {database!r} ({len(differences)} difference(s)): "
            + "; ".join(differences)
            + ". Fix the tables or add a migration in emofleet/sinks/migrations.py.", differences)


def last_offsets(client: Any, database: str, table: str, topic: str, topic_id: str) -> dict[int, int]:
    """``{partition: highest kafka_offset stored}`` for rows of ``table`` read from this incarnation of
    ``topic`` (its Kafka topic id).

    The sink resumes each partition at ``offset + 1``. Rows of an earlier incarnation (the topic was
    recreated, or a memory-backed broker restarted) say nothing about the current log, whose offsets start
    again from 0; with no topic id (a broker that does not report one) nothing is skipped by offset and
    replays are caught by id instead.
    """
    if table not in (EVENTS_TABLE, DEAD_LETTERS_TABLE, AGGREGATES_TABLE):
        raise ValueError(f"no kafka lineage in table {table!r}")
    if not topic_id:
        return {}
    db = quote_identifier(database)
    rows = client.query(
        f"SELECT kafka_partition, max(kafka_offset) FROM {db}.{quote_identifier(table)} "
        "WHERE kafka_topic = {topic:String} AND kafka_topic_id = {topic_id:String} GROUP BY kafka_partition",
        parameters={"topic": topic, "topic_id": topic_id}).result_rows
    return {int(partition): int(offset) for partition, offset in rows}
