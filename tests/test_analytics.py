"""The analyst report on known data in a real chDB, its text and PNG forms, and query output rendering."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from emofleet.sinks.query_server import direct_runner
from emofleet.sinks.analytics import (
    QueryRunner,
    Report,
    build_report,
    format_report,
    parse_time_bound,
    plot_report,
    plot_title,
    render_rows,
    time_axis_limits,
)
from emofleet.sinks.clickhouse import connect, insert_rows
from emofleet.sinks.rows import DEAD_LETTER_COLUMNS, EVENT_COLUMNS, dead_letter_row, event_row
from emofleet.sinks.migrations import migrate
from emofleet.core.config import ClickHouseSettings

from sink_samples import sample_dead_letter, sample_events

DB = "report"
T0_DT = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
T0 = int(T0_DT.timestamp() * 1000)
MIN = 60_000
NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def _clip(audio_id: str, source: str | None, label: str, confidence: float, minute: int, second: int, **kw: Any):
    produced = T0 + minute * MIN + second * 1000
    return sample_events(audio_id=audio_id, source=source, tenant="acme" if source else None, label=label,
                         confidence=confidence, produced_at_ms=produced,
                         processed_at_ms=kw.pop("processed_at_ms", produced + 1_000), **kw)


# Ten clips (whole-clip events) with known labels, confidences and times; one has 3 windows (+3 events);
# "line-2/b" is processed twice (the later run, from the cache, replaces the first under FINAL).
FIRST_RUN = [
    _clip("l1-a", "line-1", "angry", 0.75, 0, 10, windows=[(0, 30), (30, 60), (60, 70)]),
    _clip("l1-b", "line-1", "sad", 0.5, 0, 20),
    _clip("l1-c", "line-1", "happy", 0.75, 1, 5),
    _clip("l1-d", "line-1", "neutral", 0.875, 1, 6),
    _clip("l2-a", "line-2", "angry", 0.75, 0, 30),
    _clip("l2-b", "line-2", "angry", 0.75, 0, 31),
    _clip("l2-c", "line-2", "neutral", 0.5, 0, 32),
    _clip("l3-a", "line-3", "fearful", 0.875, 2, 1, cache_hit=True),
    _clip("nn-a", None, "neutral", 0.5, 2, 2),
    _clip("nn-b", None, "neutral", 0.5, 2, 3),
]
REPROCESSED = [_clip("l2-b", "line-2", "angry", 0.75, 0, 31, processed_at_ms=T0 + 5 * MIN + 1, cache_hit=True)]
DEAD = [
    sample_dead_letter(offset=1, failed_at_ms=T0),
    sample_dead_letter(offset=2, failed_at_ms=T0 + 1),
    sample_dead_letter(offset=3, failed_at_ms=T0 + 2),
    sample_dead_letter(offset=3, failed_at_ms=T0 + 9),  # a redelivered failure: same dead_letter_id
    sample_dead_letter(offset=4, reason="malformed", stage="decode", failed_at_ms=T0 + 3 * MIN),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = tmp_path_factory.mktemp("chdb-report") / "data"
    client = connect(ClickHouseSettings(database=DB), f"chdb://{path}")
    migrate(client, DB)
    migrate(client, "empty")
    events = [e for clip in FIRST_RUN for e in clip]
    rows = [event_row(e, "results", 0, i, NOW) for i, e in enumerate(events)]
    insert_rows(client, DB, "emotion_events", EVENT_COLUMNS, rows, dedup_token="first")
    again = [event_row(e, "results", 0, len(rows) + i, NOW) for i, e in enumerate(REPROCESSED[0])]
    insert_rows(client, DB, "emotion_events", EVENT_COLUMNS, again, dedup_token="again")
    dead = [dead_letter_row(d, "dead", 0, i, NOW) for i, d in enumerate(DEAD)]
    insert_rows(client, DB, "dead_letters", DEAD_LETTER_COLUMNS, dead, dedup_token="dead")
    yield client
    client.close()


def _json_runner(client: Any) -> QueryRunner:
    """Like a runner in another process: parameters and rows must survive JSON, queries run read-only."""

    def run(sql: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        parameters = json.loads(json.dumps(parameters))
        result = client.query(sql, parameters=parameters or None, settings={"readonly": 1})
        return json.loads(json.dumps([dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]))

    return run


@pytest.fixture(scope="module")
def report(client: Any) -> Report:
    return build_report(_json_runner(client), DB, None, min_clips=2, now=NOW)


def test_totals_distribution_and_cache(report: Report) -> None:
    assert report.bucket == "minute" and report.throughput_bucket == "minute"
    assert report.totals == {
        "clips": 10, "events": 13, "sources": 4,  # line-1..3 and '' (no source)
        "first_at": T0_DT + timedelta(seconds=10), "last_at": T0_DT + timedelta(minutes=2, seconds=3),
        "first_processed_at": T0_DT + timedelta(seconds=11),
        "last_processed_at": T0_DT + timedelta(minutes=5, milliseconds=1),
    }
    assert report.distribution == [
        {"label": "neutral", "clips": 4, "share": 0.4},
        {"label": "angry", "clips": 3, "share": 0.3},
        {"label": "fearful", "clips": 1, "share": 0.1},
        {"label": "happy", "clips": 1, "share": 0.1},
        {"label": "sad", "clips": 1, "share": 0.1},
    ]
    assert report.cache == {"clips": 10, "hits": 2, "hit_rate": 0.2}  # l3-a and the reprocessed l2-b


def test_timeline_and_most_negative_sources(report: Report) -> None:
    minute = [T0_DT + timedelta(minutes=m) for m in range(3)]
    timeline = [(r["bucket"], r["source"], r["clips"], r["mean_confidence"], r["negativity"]) for r in report.timeline]
    assert timeline == [
        (minute[0], "line-1", 2, 0.625, 1.0),
        (minute[0], "line-2", 3, pytest.approx(2 / 3), 2 / 3),
        (minute[1], "line-1", 2, 0.8125, 0.0),
        (minute[2], "", 2, 0.5, 0.0),
        (minute[2], "line-3", 1, 0.875, 1.0),
    ]
    assert report.negative_sources == [  # line-3 has 1 clip < min_clips=2
        {"source": "line-2", "clips": 3, "negativity": 2 / 3, "mean_confidence": pytest.approx(2 / 3)},
        {"source": "line-1", "clips": 4, "negativity": 0.5, "mean_confidence": 0.71875},
        {"source": "", "clips": 2, "negativity": 0.0, "mean_confidence": 0.5},
    ]


def test_dead_letters_and_throughput(report: Report) -> None:
    assert report.dead_letters == [
        {"reason": "not_found", "stage": "fetch", "count": 3, "last_failed_at": T0_DT + timedelta(milliseconds=9)},
        {"reason": "malformed", "stage": "decode", "count": 1, "last_failed_at": T0_DT + timedelta(minutes=3)},
    ]
    throughput = [(r["bucket"], r["events"], r["clips"], r["events_per_minute"]) for r in report.throughput]
    assert throughput == [
        (T0_DT, 7, 4, 7.0),  # l1-a (3 windows + summary), l1-b, l2-a, l2-c; l2-b moved to minute 5
        (T0_DT + timedelta(minutes=1), 2, 2, 2.0),
        (T0_DT + timedelta(minutes=2), 3, 3, 3.0),
        (T0_DT + timedelta(minutes=5), 1, 1, 1.0),
    ]


def test_since_and_hour_buckets(client: Any) -> None:
    since = build_report(direct_runner(client), DB, T0_DT + timedelta(minutes=1), min_clips=1, bucket="hour")
    assert since.totals["clips"] == 5 and since.totals["events"] == 6
    assert {r["label"]: r["clips"] for r in since.distribution} == {"neutral": 3, "happy": 1, "fearful": 1}
    assert [(r["bucket"], r["source"], r["clips"]) for r in since.timeline] == [
        (T0_DT, "", 2), (T0_DT, "line-1", 2), (T0_DT, "line-3", 1)]
    assert [(r["bucket"], r["events"], r["events_per_minute"]) for r in since.throughput] == [(T0_DT, 6, 0.1)]
    assert [(r["reason"], r["count"]) for r in since.dead_letters] == [("malformed", 1)]
    assert since.cache == {"clips": 6, "hits": 2, "hit_rate": 2 / 6}  # by processed_at: l2-b counts again
    with pytest.raises(ValueError, match="bucket"):
        build_report(direct_runner(client), DB, None, bucket="week")


def test_until_is_exclusive_and_combines_with_since(client: Any) -> None:
    window = build_report(direct_runner(client), DB, T0_DT + timedelta(seconds=30),
                          until=T0_DT + timedelta(minutes=1, seconds=6), min_clips=1)
    assert window.totals["clips"] == 4  # l2-a, l2-b, l2-c, l1-c; l1-d at exactly `until` is out
    assert {r["label"]: r["clips"] for r in window.distribution} == {"angry": 2, "neutral": 1, "happy": 1}
    assert [r["events"] for r in window.throughput] == [2]  # by processed_at: l2-a, l2-c (l2-b moved to 5:00)
    assert window.dead_letters == []
    until_only = build_report(direct_runner(client), DB, None, until=T0_DT + timedelta(minutes=2))
    assert until_only.totals["clips"] == 7 and [r["count"] for r in until_only.dead_letters] == [3]
    header = format_report(window).splitlines()[0]
    assert "since 2024-03-01 10:00:30Z until 2024-03-01 10:01:06Z" in header
    assert window.to_dict()["until"] == "2024-03-01T10:01:06+00:00"


@pytest.mark.parametrize(("text", "expected"), [
    ("15m", NOW - timedelta(minutes=15)), ("2h", NOW - timedelta(hours=2)), ("7d", NOW - timedelta(days=7)),
    ("30s", NOW - timedelta(seconds=30)), ("1w", NOW - timedelta(weeks=1)),
    ("2024-03-01", datetime(2024, 3, 1, tzinfo=UTC)),
    ("2024-03-01T10:30:00Z", datetime(2024, 3, 1, 10, 30, tzinfo=UTC)),
    ("2024-03-01 12:30+02:00", datetime(2024, 3, 1, 10, 30, tzinfo=UTC)),
])
def test_parse_time_bound(text: str, expected: datetime) -> None:
    assert parse_time_bound(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "15", "-2h", "2 hours", ""])
def test_parse_time_bound_rejects_other_forms(text: str) -> None:
    with pytest.raises(ValueError, match="relative time"):
        parse_time_bound(text, NOW)


def test_plot_title_and_time_axes_follow_the_data(report: Report) -> None:
    assert plot_title(report) == ("emofleet report: 10 clips from 4 source(s), audio produced "
                                  "2024-03-01 10:00:10Z .. 2024-03-01 10:02:03Z")  # no database name
    one = [T0_DT]  # a lone bucket: a minute wide, not years
    assert time_axis_limits(one, "minute") == (T0_DT - timedelta(seconds=30), T0_DT + timedelta(seconds=30))
    buckets = [r["bucket"] for r in report.throughput]
    assert time_axis_limits(buckets, "minute") == (T0_DT - timedelta(seconds=30),
                                                    T0_DT + timedelta(minutes=5, seconds=30))


def test_format_report_prints_every_section(report: Report) -> None:
    text = format_report(report)
    for expected in ("10 clips (13 events incl. windows) from 4 source(s)", "Emotion distribution",
                     "neutral      4  40.0%", "Timeline per minute and source", "Most negative sources (>= 2 clips",
                     "line-2      3       66.7%", "(none)", "Cache hit rate", "20.0% (2 of 10 clips)",
                     "not_found  fetch       3", "Throughput per minute", "2024-03-01 10:05:00Z"):
        assert expected in text, expected
    shortened = format_report(report, max_rows=2)
    assert "(3 earlier rows not shown)" in shortened


def test_empty_database_report_and_plots(client: Any, report: Report, tmp_path: Path) -> None:
    empty = build_report(direct_runner(client), "empty", None)
    assert empty.totals["clips"] == 0 and empty.distribution == [] and empty.cache["hit_rate"] is None
    assert "no clips" in format_report(empty)
    for name, rep in (("full.png", report), ("empty.png", empty)):
        path = plot_report(rep, tmp_path / "plots" / name)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert json.loads(json.dumps(report.to_dict()))["totals"]["first_at"] == "2024-03-01T10:00:10+00:00"


# ------------------------------------------------------------------------------------------ render_rows

ROWS = [
    {"label": "angry", "clips": 3, "share": 0.3333333333, "at": datetime(2024, 3, 1, 10, 0, tzinfo=UTC),
     "raw": b"\xffx", "tags": ["a", "b"], "note": None},
    {"label": "happy, \"very\"", "clips": 12, "share": 1.0, "at": None, "raw": b"", "tags": [], "note": "x"},
]


def test_render_rows_table() -> None:
    text = render_rows(ROWS, "table")
    lines = text.splitlines()
    assert lines[0].split() == ["label", "clips", "share", "at", "raw", "tags", "note"]
    assert lines[2].startswith("angry" + " " * 14 + "3  0.333333  2024-03-01T10:00:00+00:00  \\xffx")
    assert "NULL" in lines[2] and lines[-1] == "(2 rows)"
    assert lines[3].split()[2] == "12"  # numbers right-aligned
    assert render_rows([], "table") == "(0 rows)"


def test_render_rows_csv_and_json() -> None:
    parsed = list(csv.reader(io.StringIO(render_rows(ROWS, "csv"))))
    assert parsed[0] == ["label", "clips", "share", "at", "raw", "tags", "note"]
    assert parsed[1] == ["angry", "3", "0.3333333333", "2024-03-01T10:00:00+00:00", "\\xffx", '["a", "b"]', ""]
    assert parsed[2][0] == 'happy, "very"'
    assert render_rows([], "csv") == ""
    data = json.loads(render_rows(ROWS, "json"))
    assert data[0] == {"label": "angry", "clips": 3, "share": 0.3333333333, "at": "2024-03-01T10:00:00+00:00",
                       "raw": "\\xffx", "tags": ["a", "b"], "note": None}
    assert data[1]["at"] is None and render_rows([], "json") == "[]"
    assert json.loads(render_rows([{"x": float("nan")}], "json")) == [{"x": None}]
    with pytest.raises(ValueError, match="format"):
        render_rows(ROWS, "xml")
