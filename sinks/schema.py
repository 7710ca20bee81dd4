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
* ``kafka_topic``/``kafka_partition``/``kafka_offset``: where the row sits in the *results* topic; the
  sink resumes from ``max(kafka_offset) + 1`` per partition (:func:`last_offsets`).
* ``non_replicated_deduplication_window = 1000`` on every table written by inserts: an insert repeated
  with the same ``insert_deduplication_token`` (e.g. a batch re-sent after a timeout whose first attempt
  did land) is dropped, including in the materialized view's target (``emotion_minutes`` needs the window
  too, else the MV still double-counts: measured on chDB 26.9).
* ``dead_letters`` - ``ReplacingMergeTree(failed_at) ORDER BY dead_letter_id`` (deterministic id, so a
  redelivered failure collapses); not partitioned (low volume; a partition key on the non-deterministic
  failed_at would keep duplicates apart). ``key`` is ``Nullable(String)`` (no key != empty key for
  replay), ``payload`` String (raw bytes), ``headers`` ``Array(Tuple(key String, value Nullable(String)))``
  to keep order, repeated names and null values exactly as Kafka had them.
* ``emotion_frames`` - frame-granularity scores of whole-clip events, one row per 20 ms frame.
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
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from emofleet.sinks.rows import AGGREGATE_COLUMNS, DEAD_LETTER_COLUMNS, EVENT_COLUMNS, FRAME_COLUMNS

MIGRATIONS_TABLE = "schema_migrations"
EVENTS_TABLE = "emotion_events"
DEAD_LETTERS_TABLE = "dead_letters"
FRAMES_TABLE = "emotion_frames"
MINUTES_TABLE = "emotion_minutes"
MINUTES_VIEW = "emotion_minutes_mv"
AGGREGATES_TABLE = "emotion_aggregates"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SchemaError(Exception):
    """Base class of the schema errors below."""


class MigrationError(SchemaError):
    """The database's migration history does not match this code (edited or unknown migration)."""


class SchemaDriftError(SchemaError):
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
)

# ------------------------------------------------------------------------------------ expected shape
# The columns (name, type as system.columns spells it) the tables have after all MIGRATIONS.

_SCORE_TYPES = tuple((f"score_{e}", "Float32") for e in (
    "angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown"))
_DT = "DateTime64(3, 'UTC')"
_LC = "LowCardinality(String)"
_LINEAGE_TYPES = (("kafka_topic", _LC), ("kafka_partition", "UInt16"), ("kafka_offset", "UInt64"),
                  ("inserted_at", _DT))

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
        ("event_id", "String"), ("reference_produced_at", _DT), ("processed_at", _DT),
        ("frame_index", "UInt32"), *_SCORE_TYPES,
    ),
    AGGREGATES_TABLE: (
        ("aggregate_id", "String"), ("scope", _LC), ("tenant", _LC), ("scope_value", "String"),
        ("window_type", _LC), ("window_size_seconds", "UInt32"), ("window_hop_seconds", "UInt32"),
        ("window_start", _DT), ("window_end", _DT), ("clips", "UInt32"),
        *((f"count_{e}", "UInt32") for e in ("angry", "disgusted", "fearful", "happy", "neutral", "other", "sad",
                                             "surprised", "unknown")),
        ("mean_confidence", "Float64"), ("negativity", "Float64"), ("first_event_at", _DT), ("last_event_at", _DT),
        *_LINEAGE_TYPES,
    ),
}
DRIFT_CHECKED_TABLES: tuple[str, ...] = (EVENTS_TABLE, DEAD_LETTERS_TABLE, AGGREGATES_TABLE)

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


def migrate(client: Any, database: str, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Apply the migrations the database lacks, in version order; return the names applied now.

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
    return done


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
    """Raise :class:`SchemaDriftError` when ``emotion_events``, ``dead_letters`` or ``emotion_aggregates``
    differ from the columns this code writes (someone ALTERed them by hand, or migrations were skipped)."""
    differences = drift(client, database)
    if differences:
        raise SchemaDriftError(
            f"ClickHouse schema drift in database {database!r} ({len(differences)} difference(s)): "
            + "; ".join(differences)
            + ". Fix the tables or add a migration in emofleet/sinks/schema.py.", differences)


def last_offsets(client: Any, database: str, table: str, topic: str) -> dict[int, int]:
    """``{partition: highest kafka_offset stored}`` for rows of ``table`` that came from ``topic``.

    The sink resumes each partition at ``offset + 1``; the deduplication token guards the overlap if a
    batch was stored but its Kafka commit was lost.
    """
    if table not in (EVENTS_TABLE, DEAD_LETTERS_TABLE, AGGREGATES_TABLE):
        raise ValueError(f"no kafka lineage in table {table!r}")
    db = quote_identifier(database)
    rows = client.query(
        f"SELECT kafka_partition, max(kafka_offset) FROM {db}.{quote_identifier(table)} "
        "WHERE kafka_topic = {topic:String} GROUP BY kafka_partition",
        parameters={"topic": topic}).result_rows
    return {int(partition): int(offset) for partition, offset in rows}
