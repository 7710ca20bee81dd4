"""Retention: the TTL of every table comes from the settings, is applied on every start and changes with them."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from emofleet.sinks.clickhouse import insert_rows
from emofleet.sinks.rows import DEAD_LETTER_COLUMNS, EVENT_COLUMNS, datetime_to_millis, dead_letter_row, event_row
from emofleet.sinks.migrations import apply_retention, migrate
from emofleet.core.config import Settings

from sink_samples import sample_dead_letter, sample_events
from test_sink import chdb, sink_settings  # noqa: F401 - fixtures

TABLES = ("emotion_events", "emotion_frames", "emotion_aggregates", "emotion_minutes", "dead_letters")


def definitions(client: Any, database: str) -> dict[str, str]:
    rows = client.query("SELECT name, create_table_query FROM system.tables WHERE database = {db:String}",
                        parameters={"db": database}).result_rows
    return {name: query for name, query in rows if name in TABLES}


def expires(column: str, days: int) -> str:
    return f"TTL toDateTime({column}) + toIntervalDay({days})"


def test_ttls_follow_the_settings_on_every_start(sink_settings: Settings, chdb) -> None:
    database, defaults = sink_settings.clickhouse.database, sink_settings.clickhouse
    assert not any(" TTL " in q for q in definitions(chdb, database).values()), "migrate without settings: none"

    migrate(chdb, database, settings=defaults)
    tables = definitions(chdb, database)
    assert expires("reference_produced_at", 30) in tables["emotion_events"]
    assert expires("reference_produced_at", 7) in tables["emotion_frames"]
    assert expires("window_end", 365) in tables["emotion_aggregates"]
    assert expires("minute", 365) in tables["emotion_minutes"]
    assert f"ENGINE = ReplacingMergeTree(failed_at) ORDER BY dead_letter_id {expires('failed_at', 90)}" \
        in tables["dead_letters"]
    assert f"`payload` String {expires('failed_at', 7)}," in tables["dead_letters"]
    assert apply_retention(chdb, database, defaults) == [], "the live TTLs match: nothing is altered again"

    restarted = replace(defaults, events_ttl_days=3, frames_ttl_days=0, dead_letter_payload_ttl_days=0)
    migrate(chdb, database, settings=restarted)
    tables = definitions(chdb, database)
    assert expires("reference_produced_at", 3) in tables["emotion_events"]
    assert " TTL " not in tables["emotion_frames"], "0 days = keep forever"
    assert "`payload` String," in tables["dead_letters"] and expires("failed_at", 90) in tables["dead_letters"]
    assert apply_retention(chdb, database, restarted) == []


def test_expired_rows_go_and_old_dead_letters_keep_their_metadata(sink_settings: Settings, chdb) -> None:
    database = sink_settings.clickhouse.database
    migrate(chdb, database, settings=sink_settings.clickhouse)
    now = datetime.now(UTC)
    old, recent = (datetime_to_millis(now - timedelta(days=d)) for d in (40, 1))
    events = [sample_events(audio_id=name, produced_at_ms=ms)[0] for name, ms in (("old", old), ("recent", recent))]
    insert_rows(chdb, database, "emotion_events", EVENT_COLUMNS,
                [event_row(e, "results", 0, i, now) for i, e in enumerate(events)])
    letters = [sample_dead_letter(offset=i, failed_at_ms=ms) for i, ms in enumerate((old, recent))]
    insert_rows(chdb, database, "dead_letters", DEAD_LETTER_COLUMNS,
                [dead_letter_row(d, "dead", 0, i, now) for i, d in enumerate(letters)])

    for table in ("emotion_events", "dead_letters"):
        chdb.command(f"OPTIMIZE TABLE {database}.{table} FINAL")

    assert [r[0] for r in chdb.query(f"SELECT audio_id FROM {database}.emotion_events").result_rows] == ["recent"]
    kept = chdb.query(f"SELECT source_offset, payload, reason FROM {database}.dead_letters ORDER BY source_offset",
                      query_formats={"String": "bytes"}).result_rows
    assert kept == [(0, b"", b"not_found"), (1, letters[1]["payload"], b"not_found")], \
        "the 40-day-old dead letter lost its payload (7 days) and kept its row (90 days)"
