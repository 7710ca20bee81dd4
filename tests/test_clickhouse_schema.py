"""ClickHouse schema, rows and connection handling on a real chDB engine in a temporary directory.

One chDB data path per process: the module opens one client for all tests and closes it at the end.
Tests that need a pristine schema use their own database inside that path.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from emofleet.schemas.codec import make_codec
from emofleet.sinks import clickhouse as ch
from emofleet.sinks.clickhouse import ClickHouseError, chdb_lock_holder, connect, insert_rows, is_transient
from emofleet.sinks.rows import (
    DEAD_LETTER_COLUMNS,
    EVENT_COLUMNS,
    FRAME_COLUMNS,
    dead_letter_row,
    event_row,
    frame_rows,
    millis_to_datetime,
)
from emofleet.sinks.migrations import (
    EXPECTED_COLUMNS,
    MIGRATIONS,
    Migration,
    MigrationError,
    SchemaDriftError,
    applied_migrations,
    check_drift,
    drift,
    last_offsets,
    migrate,
)
from emofleet.core.config import ClickHouseSettings, Secret

from sink_samples import sample_dead_letter, sample_events

DB = "emo"
T0 = 1_709_287_200_000  # 2024-03-01 10:00:00 UTC, epoch ms
NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = tmp_path_factory.mktemp("chdb") / "data"
    client = connect(ClickHouseSettings(database=DB), f"chdb://{path}")
    migrate(client, DB)
    yield client
    client.close()


def _count(client: Any, sql: str, **parameters: Any) -> int:
    return int(client.query(sql, parameters=parameters or None).result_rows[0][0])


def _insert_events(client: Any, events: list[dict], *, topic: str = "results", partition: int = 0,
                   first_offset: int = 0, token: str | None = None, database: str = DB,
                   topic_id: str = "incarnation-1") -> None:
    rows = [event_row(e, topic, partition, first_offset + i, NOW, topic_id) for i, e in enumerate(events)]
    insert_rows(client, database, "emotion_events", EVENT_COLUMNS, rows, dedup_token=token)


# ------------------------------------------------------------------------------------------ migrations


def test_migrations_apply_once_and_detect_edited_or_unknown_versions(client: Any) -> None:
    assert migrate(client, "fresh") == [m.name for m in MIGRATIONS]
    assert migrate(client, "fresh") == []
    applied = applied_migrations(client, "fresh")
    assert applied == {m.version: (m.name, m.checksum) for m in MIGRATIONS}
    tables = {r[0] for r in client.query("SELECT name FROM system.tables WHERE database = 'fresh'").result_rows}
    assert tables >= {"schema_migrations", "emotion_events", "dead_letters", "emotion_frames",
                      "emotion_minutes", "emotion_minutes_mv"}

    # Re-indenting a migration is not a change; editing its SQL is.
    reindented = [dataclasses.replace(m, statements=tuple("  " + s.replace("\n", "\n    ") for s in m.statements))
                  for m in MIGRATIONS]
    assert migrate(client, "fresh", reindented) == []
    edited = list(MIGRATIONS)
    edited[1] = dataclasses.replace(edited[1], statements=(edited[1].statements[0].replace("attempts Int32",
                                                                                            "attempts Int64"),))
    with pytest.raises(MigrationError, match=r"version 2 \(create_dead_letters\) was changed after it was applied"):
        migrate(client, "fresh", edited)
    with pytest.raises(MigrationError, match="version 4 .* unknown to this emofleet"):
        migrate(client, "fresh", MIGRATIONS[:3])

    # A new migration is applied once, after the others.
    added = [*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "add_note",
                                    ("ALTER TABLE {db}.dead_letters ADD COLUMN IF NOT EXISTS note String",))]
    assert migrate(client, "fresh", added) == ["add_note"]
    assert migrate(client, "fresh", added) == []


def test_check_drift_passes_on_migrated_tables_and_lists_altered_columns(client: Any) -> None:
    migrate(client, "drifty")
    check_drift(client, "drifty")
    assert drift(client, "drifty") == []
    client.command("ALTER TABLE drifty.emotion_events MODIFY COLUMN confidence Float64")
    client.command("ALTER TABLE drifty.emotion_events DROP COLUMN channel")
    client.command("ALTER TABLE drifty.emotion_events ADD COLUMN extra String")
    client.command("ALTER TABLE drifty.emotion_events ADD COLUMN harmless String ALIAS uri")
    client.command("DROP TABLE drifty.dead_letters")
    with pytest.raises(SchemaDriftError) as caught:
        check_drift(client, "drifty")
    assert sorted(caught.value.differences) == [
        "drifty.dead_letters: table is missing",
        "drifty.emotion_events.channel: column is missing (expected LowCardinality(String))",
        "drifty.emotion_events.confidence: type is Float64, expected Float32",
        "drifty.emotion_events.extra: unexpected column (String)",
    ]
    assert "confidence: type is Float64, expected Float32" in str(caught.value)


def test_expected_columns_match_rows_module(client: Any) -> None:
    assert [n for n, _ in EXPECTED_COLUMNS["emotion_events"]] == list(EVENT_COLUMNS)
    assert [n for n, _ in EXPECTED_COLUMNS["dead_letters"]] == list(DEAD_LETTER_COLUMNS)
    assert drift(client, DB, ["emotion_frames"]) == []  # frames too, though check_drift skips them


# ------------------------------------------------------------------------------------------ rows


def test_events_round_trip_through_avro_rows_and_clickhouse(client: Any) -> None:
    codec = make_codec()
    long_clip = sample_events(audio_id="rt-long", label="angry", confidence=0.75, produced_at_ms=T0 + 1_234,
                              tenant="acme", source="line-9", channel="left", call_id="call-77",
                              attributes={"agent": "a-1", "lang": "de"}, windows=[(0.0, 30.0), (30.0, 42.5)],
                              window_labels=["angry", "angry"], embedding_dim=8, frames=3, cache_hit=True,
                              lineage=("emofleet.audio", 3, 99))
    short_clip = sample_events(audio_id="rt-short", label="happy", confidence=0.875, produced_at_ms=T0 + 5_000,
                               tenant=None, source=None)
    events = [codec.decode("emotion_event", codec.encode("emotion_event", e, topic="r"), topic="r")
              for e in long_clip + short_clip]
    assert events == long_clip + short_clip  # decode gives back the processors' dicts (timestamps as ints)
    rows = [event_row(e, "results", 2, 500 + i, NOW) for i, e in enumerate(events)]
    assert all(len(r) == len(EVENT_COLUMNS) for r in rows)
    insert_rows(client, DB, "emotion_events", EVENT_COLUMNS, rows, dedup_token="rt")

    back = client.query(f"SELECT {', '.join(EVENT_COLUMNS)} FROM emo.emotion_events "
                        "WHERE audio_id IN ('rt-long', 'rt-short') ORDER BY kafka_offset").result_rows
    assert [list(r) for r in back] == rows

    by_segment = {(r[EVENT_COLUMNS.index("audio_id")], r[EVENT_COLUMNS.index("segment_index")]): dict(
        zip(EVENT_COLUMNS, r, strict=True)) for r in rows}
    summary = by_segment[("rt-long", -1)]
    assert summary["processed_at"] == millis_to_datetime(T0 + 2_234)
    assert summary["reference_produced_at"] == datetime(2024, 3, 1, 10, 0, 1, 234_000, tzinfo=UTC)
    assert summary["score_angry"] == 0.75 and summary["score_sad"] == 0.03125
    assert len(summary["embedding"]) == 8 and summary["attributes"] == {"agent": "a-1", "lang": "de"}
    assert (summary["tenant"], summary["channel"], summary["call_id"]) == ("acme", "left", "call-77")
    short = by_segment[("rt-short", -1)]
    assert (short["tenant"], short["source"], short["channel"], short["embedding"]) == ("", "", "", [])

    frames = [row for e in events for row in frame_rows(e)]
    assert len(frames) == 6  # the summary's frames: 3 per window, each stored once
    assert [f[FRAME_COLUMNS.index("frame_index")] for f in frames] == list(range(6))
    insert_rows(client, DB, "emotion_frames", FRAME_COLUMNS, frames, dedup_token="rt-frames")
    assert _count(client, "SELECT count() FROM emo.emotion_frames WHERE event_id = {id:String}",
                  id=summary["event_id"]) == 6
    assert frame_rows(short_clip[0]) == [] and frame_rows(long_clip[0]) == []  # no frames / a window event


def test_dead_letters_round_trip_with_raw_bytes(client: Any) -> None:
    codec = make_codec()
    records = [sample_dead_letter(offset=1, failed_at_ms=T0, audio_id="dl-a"),
               sample_dead_letter(offset=2, failed_at_ms=T0 + 1, key=None, headers=(), reason="malformed",
                                  stage="decode")]
    records = [codec.decode("dead_letter", codec.encode("dead_letter", r, topic="d"), topic="d") for r in records]
    rows = [dead_letter_row(r, "dead", 1, 40 + i, NOW, "dead-1") for i, r in enumerate(records)]
    insert_rows(client, DB, "dead_letters", DEAD_LETTER_COLUMNS, rows, dedup_token="dl-rt")
    back = client.query(f"SELECT {', '.join(DEAD_LETTER_COLUMNS)} FROM emo.dead_letters "
                        "WHERE kafka_topic = 'dead' ORDER BY kafka_offset",
                        query_formats={"String": "bytes"}).result_rows
    first, second = (dict(zip(DEAD_LETTER_COLUMNS, r, strict=True)) for r in back)
    assert first["payload"] == b"\xc3\x01\x00\xffnot-avro" and first["key"] == b"k"
    assert first["headers"] == [{"key": b"trace", "value": b"t-1"}, {"key": b"trace", "value": None}]
    assert first["failed_at"] == millis_to_datetime(T0) and first["audio_id"] == b"dl-a"
    assert second["key"] is None and second["headers"] == [] and second["audio_id"] == b""
    assert second["reason"] == b"malformed" and second["kafka_offset"] == 41
    assert last_offsets(client, DB, "dead_letters", "dead", "dead-1") == {1: 41}


def test_event_row_is_fast() -> None:
    event = sample_events(audio_id="speed", produced_at_ms=T0, attributes={"k": "v"})[0]
    n = 20_000
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        for offset in range(n):
            event_row(event, "results", 1, offset, NOW)
        best = max(best, n / (time.perf_counter() - started))
    print(f"event_row: {best:,.0f} rows/s")
    assert best > 100_000  # ~500-700k on the 2-core dev box; the bound only catches gross regressions


# ------------------------------------------------------------------------------------------ engine behaviour


def test_dedup_token_drops_a_repeated_insert_without_final(client: Any) -> None:
    events = [e for i in range(3) for e in sample_events(audio_id=f"dd-{i}", source="dedup", produced_at_ms=T0 + i)]
    _insert_events(client, events, topic="dd", token="dd:0:0-2")
    _insert_events(client, events, topic="dd", token="dd:0:0-2")  # a retry of an insert that did land
    count = "SELECT count() FROM emo.emotion_events WHERE source = 'dedup'"
    assert _count(client, count) == 3
    mv = "SELECT sum(clips) FROM emo.emotion_minutes WHERE source = 'dedup'"
    assert _count(client, mv) == 3  # the materialized view skipped the duplicate too
    _insert_events(client, events, topic="dd", token="dd:0:3-5")  # another token: stored (collapses on merge)
    assert _count(client, count) == 6
    assert last_offsets(client, DB, "emotion_events", "dd", "incarnation-1") == {0: 2}


def test_resume_positions_belong_to_one_incarnation_of_the_topic(client: Any) -> None:
    """A recreated topic numbers offsets from 0 again: the old log's rows must not hide the new log's."""
    old = [e for i in range(3) for e in sample_events(audio_id=f"inc-old-{i}", source="inc", produced_at_ms=T0 + i)]
    _insert_events(client, old, topic="inc", first_offset=10, token="inc-old", topic_id="old-id")
    assert last_offsets(client, DB, "emotion_events", "inc", "old-id") == {0: 12}
    assert last_offsets(client, DB, "emotion_events", "inc", "new-id") == {}
    assert last_offsets(client, DB, "emotion_events", "inc", "") == {}  # no id from the broker: no skipping


def test_replacing_merge_tree_keeps_the_latest_processing_of_an_event(client: Any) -> None:
    first = sample_events(audio_id="rp-1", source="replace", produced_at_ms=T0, processed_at_ms=T0 + 1_000,
                          label="sad", confidence=0.5)
    again = sample_events(audio_id="rp-1", source="replace", produced_at_ms=T0, processed_at_ms=T0 + 60_000,
                          label="sad", confidence=0.5, cache_hit=True)
    assert first[0]["event_id"] == again[0]["event_id"]
    _insert_events(client, first, token="rp-a")
    _insert_events(client, again, token="rp-b")
    count = "SELECT count() FROM emo.emotion_events WHERE source = 'replace'"
    assert _count(client, count) == 2
    assert _count(client, count.replace("emotion_events", "emotion_events FINAL")) == 1
    client.command("OPTIMIZE TABLE emo.emotion_events FINAL")
    rows = client.query("SELECT processed_at, cache_hit FROM emo.emotion_events WHERE source = 'replace'").result_rows
    assert rows == [(millis_to_datetime(T0 + 60_000), True)]


def test_materialized_view_aggregates_whole_clips_per_minute(client: Any) -> None:
    minute = 60_000
    events = [
        *sample_events(audio_id="mv-1", source="mv", label="angry", confidence=0.5, produced_at_ms=T0 + 5_000),
        *sample_events(audio_id="mv-2", source="mv", label="angry", confidence=0.75, produced_at_ms=T0 + 59_999),
        *sample_events(audio_id="mv-3", source="mv", label="happy", confidence=0.875, produced_at_ms=T0 + 30_000),
        # windows of a long clip are not counted, only its summary
        *sample_events(audio_id="mv-4", source="mv", label="angry", confidence=0.875,
                       produced_at_ms=T0 + minute + 1, windows=[(0, 30), (30, 60), (60, 61)]),
    ]
    assert len(events) == 7
    _insert_events(client, events[:2], token="mv-a")  # two inserts: two partial aggregates to merge
    _insert_events(client, events[2:], token="mv-b")
    rows = client.query(
        "SELECT minute, label, sum(clips), avgMerge(confidence) FROM emo.emotion_minutes WHERE source = 'mv' "
        "GROUP BY minute, label ORDER BY minute, label").result_rows
    start = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
    assert [(m.astimezone(UTC), label, clips, conf) for m, label, clips, conf in rows] == [
        (start, "angry", 2, 0.625),
        (start, "happy", 1, 0.875),
        (start + timedelta(minutes=1), "angry", 1, 0.875),
    ]


# ------------------------------------------------------------------------------------------ connecting


def test_connect_creates_database_and_refuses_a_second_chdb_path(client: Any, tmp_path: Path) -> None:
    assert client.database == DB
    assert _count(client, "SELECT count() FROM system.databases WHERE name = {db:String}", db=DB) == 1
    with pytest.raises(ClickHouseError, match="already has chDB open at another path") as caught:
        connect(ClickHouseSettings(database="other"), f"chdb://{tmp_path / 'other'}")
    assert "\n" not in str(caught.value) and "hint:" in str(caught.value)
    assert _count(client, "SELECT 1") == 1  # the open engine is unharmed
    for dsn, message in [("chdb://relative/path", "unsupported chDB DSN"), ("ftp://host", "unsupported"),
                         ("http://user:pw@host:8123", "credentials in the ClickHouse DSN http://user:\\*\\*\\*@"),
                         ("http://host:8123/db", "database comes from EMOFLEET_CLICKHOUSE_DATABASE"),
                         ("http://host:8123?bogus=1", "unknown option")]:
        with pytest.raises(ClickHouseError, match=message):
            connect(ClickHouseSettings(), dsn)
    with pytest.raises(ClickHouseError, match="invalid ClickHouse identifier"):
        connect(ClickHouseSettings(database="bad-name"), f"chdb://{client.path}")


def test_chdb_lock_holder_names_the_owning_pid(tmp_path: Path) -> None:
    assert chdb_lock_holder(tmp_path) is None
    status = tmp_path / "status"
    status.write_text("PID: 4242\nStarted at: 2024-03-01 10:00:00\n")
    assert chdb_lock_holder(tmp_path) is None  # present but unlocked: a stale file
    fd = os.open(status, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running chDB engine holds
        assert chdb_lock_holder(tmp_path) == "PID 4242"
    finally:
        os.close(fd)


def test_http_dsn_settings_reach_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    import clickhouse_connect

    calls: list[dict[str, Any]] = []

    class FakeClient:
        database = None

        def command(self, sql: str) -> None:
            calls.append({"command": sql})

        def close(self) -> None: ...

    monkeypatch.setattr(clickhouse_connect, "get_client", lambda **kw: calls.append(kw) or FakeClient())
    settings = ClickHouseSettings(database="analytics", username="sink", password=Secret("s3cret"))
    client = connect(settings, "https://ch.example.com")
    assert calls[0] | {"connect_timeout": None, "send_receive_timeout": None} == {
        "host": "ch.example.com", "port": 8443, "secure": True, "interface": "https", "username": "sink",
        "password": "s3cret", "client_name": "emofleet", "tz_mode": "aware", "verify": True,
        "connect_timeout": None, "send_receive_timeout": None}
    assert calls[1] == {"command": "CREATE DATABASE IF NOT EXISTS `analytics`"} and client.database == "analytics"
    calls.clear()
    connect(settings, "http://10.0.0.5:9000?connect_timeout=3")
    assert (calls[0]["port"], calls[0]["secure"], calls[0]["connect_timeout"]) == (9000, False, 3.0)
    assert "verify" not in calls[0]
    calls.clear()
    connect(settings, "https://ch:8443?ca_cert=/etc/ca.pem")
    assert (calls[0]["verify"], calls[0]["ca_cert"]) == (True, "/etc/ca.pem")


class _FakeServer:
    """A loopback HTTP server answering every request with one canned response."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *_args: Any) -> None: ...

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.dsn = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_http_failures_become_one_line_errors_with_hints() -> None:
    settings = ClickHouseSettings(username="sink", password=Secret("hunter2"))
    auth = _FakeServer(403, b"Code: 516. DB::Exception: sink: Authentication failed: password is "
                                    b"incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)",
                       {"X-ClickHouse-Exception-Code": "516"})
    unavailable = _FakeServer(503, b"upstream unavailable", {})
    try:
        with pytest.raises(ClickHouseError) as caught:
            connect(settings, auth.dsn)
        message = str(caught.value)
        assert "Authentication failed" in message and "EMOFLEET_CLICKHOUSE_PASSWORD" in message
        assert "hunter2" not in message and "\n" not in message and not caught.value.transient
        with pytest.raises(ClickHouseError) as caught:
            connect(settings, unavailable.dsn)
        assert caught.value.transient and "503" in str(caught.value)
    finally:
        auth.close()
        unavailable.close()
    with pytest.raises(ClickHouseError, match="Connection refused") as caught:
        connect(settings, "http://127.0.0.1:1?connect_timeout=2")
    assert caught.value.transient


@pytest.mark.parametrize(("error", "transient"), [
    (DatabaseError("Code: 252. DB::Exception: Too many parts (300)", code=252, name="TOO_MANY_PARTS"), True),
    (DatabaseError("Code: 62. DB::Exception: Syntax error", code=62, name="SYNTAX_ERROR"), False),
    (DatabaseError("Code: 53. DB::Exception: Type mismatch", code=53), False),
    (DatabaseError("Code: 60. Unknown table emo.x"), False),
    (DatabaseError("Code: 159. DB::Exception: Timeout exceeded"), True),
    (DatabaseError("Code: 241. DB::Exception: Memory limit exceeded", code=241), True),
    (OperationalError("HTTP driver received HTTP status 503, server response: unavailable"), True),
    (DatabaseError("HTTP driver received HTTP status 502"), True),
    (DatabaseError("HTTP driver received HTTP status 400, server response: bad request"), False),
    (OperationalError("Error executing HTTP request"), True),
    (ConnectionRefusedError(111, "Connection refused"), True),
    (TimeoutError("timed out"), True),
    (PermissionError(13, "Permission denied"), False),
    (ValueError("could not convert string to float: 'x'"), False),
    (TypeError("object of type 'int' has no len()"), False),
    (RuntimeError("Too many parts (600). Merges are processing significantly slower than inserts"), True),
    (RuntimeError("something else"), False),
    (ClickHouseError("x", transient=True), True),
])
def test_is_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_is_transient_follows_the_cause() -> None:
    try:
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as inner:
            raise RuntimeError("insert failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)
    assert ch.TRANSIENT_CODES[252] == "TOO_MANY_PARTS"
