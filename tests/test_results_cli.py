"""`emofleet results`: a range of the results topic with filters, table and JSON lines; a call looked up in
ClickHouse; one error line for bad filters and an unreachable broker; `emofleet schemas`."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from confluent_kafka import Producer

from emofleet.cli import main
from emofleet.core.config import Settings, to_env
from emofleet.schemas.codec import make_codec
from emofleet.sinks.clickhouse import connect, insert_rows
from emofleet.sinks.migrations import migrate
from emofleet.sinks.rows import EVENT_COLUMNS, event_row

from pipeline_helpers import create_topics
from sink_samples import sample_events

NOW_MS = int(datetime.now(UTC).timestamp() * 1000)


def events() -> list[dict]:
    return [*sample_events(audio_id="a-angry", label="angry", confidence=0.875, tenant="acme", source="line-1",
                           call_id="c-1", produced_at_ms=NOW_MS - 60_000, processed_at_ms=NOW_MS - 50_000,
                           windows=((0.0, 30.0), (30.0, 40.0))),
            *sample_events(audio_id="a-happy", label="happy", confidence=0.5, tenant="acme", source="line-2",
                           call_id="c-1", produced_at_ms=NOW_MS - 40_000, processed_at_ms=NOW_MS - 30_000),
            *sample_events(audio_id="a-other-tenant", label="angry", confidence=0.75, tenant="globex",
                           produced_at_ms=NOW_MS - 7_200_000, processed_at_ms=NOW_MS - 7_100_000)]


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in to_env(settings).items():
        monkeypatch.setenv(name, value)
    return settings


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_results_from_the_topic_filtered_as_table_and_json_lines(cli_env: Settings,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    create_topics(cli_env)
    codec, topic = make_codec(), cli_env.kafka.results_topic
    producer = Producer(cli_env.kafka.client_config())
    for event in events():
        producer.produce(topic, key=event["audio_id"].encode(), value=codec.encode("emotion_event", event, topic=topic))
    assert producer.flush(30) == 0

    code, out, _ = cli(capsys, "results", "--format", "jsonl")
    assert code == 0
    assert sorted(json.loads(line)["audio_id"] for line in out.splitlines()) == ["a-angry", "a-happy", "a-other-tenant"]

    code, out, _ = cli(capsys, "results", "--format", "jsonl", "--segments", "--audio-id", "a-angry", "--from", "topic")
    assert sorted(json.loads(line)["segment_index"] for line in out.splitlines()) == [-1, 0, 1]

    code, out, _ = cli(capsys, "results", "--tenant", "acme", "--label", "angry", "--min-confidence", "0.8")
    header, *rows = out.splitlines()
    assert header.split() == ["processed_at", "tenant", "source", "call_id", "audio_id", "segment", "label",
                              "confidence"]
    assert len(rows) == 1 and "a-angry" in rows[0] and "0.875" in rows[0]

    code, out, _ = cli(capsys, "results", "--since", "1h", "--format", "jsonl")
    assert sorted(json.loads(line)["audio_id"] for line in out.splitlines()) == ["a-angry", "a-happy"]

    code, out, err = cli(capsys, "results", "--source", "nowhere")
    assert code == 0 and out == "" and "no results match" in err


def test_a_call_is_looked_up_in_clickhouse(cli_env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    client = connect(cli_env.clickhouse, cli_env.clickhouse_dsn)
    try:
        migrate(client, cli_env.clickhouse.database)
        inserted = datetime.now(UTC)
        rows = [event_row(e, "results", 0, i, inserted) for i, e in enumerate(events())]
        insert_rows(client, cli_env.clickhouse.database, "emotion_events", EVENT_COLUMNS, rows, dedup_token="t")
    finally:
        client.close()

    code, out, _ = cli(capsys, "results", "--call-id", "c-1", "--format", "jsonl")
    found = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [e["audio_id"] for e in found] == ["a-angry", "a-happy"]
    expected = next(e for e in events() if e["audio_id"] == "a-angry" and e["segment_index"] == -1)
    assert found[0]["scores"] == pytest.approx(expected["scores"])
    assert found[0]["processed_at"] == expected["processed_at"] and found[0]["event_id"] == expected["event_id"]


def test_bad_filters_and_unreachable_systems_are_one_error_line(cli_env: Settings, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for args, message in ((["--label", "grumpy"], "is not an emotion"),
                          (["--min-confidence", "2"], "outside [0, 1]"),
                          (["--since", "yesterday"], "neither a relative time"),
                          (["--since", "1h", "--until", "2h"], "--since is not before --until"),
                          (["--follow", "--from", "clickhouse"], "--follow reads the topic")):
        code, out, err = cli(capsys, "results", *args)
        assert code == 2 and out == "" and message in err and "hint:" in err, args

    code, _, err = cli(capsys, "results", "--bootstrap-servers", "127.0.0.1:1")
    assert code == 2 and err.startswith("emofleet: error: cannot reach Kafka at 127.0.0.1:1")
    code, _, err = cli(capsys, "results", "--call-id", "c-1", "--dsn", "chdb:///nonexistent/dir")
    assert code == 2 and "no ClickHouse data" in err
    code, _, err = cli(capsys, "dead-letters", "replay")
    assert code == 2 and "replay needs a selection" in err


def test_schemas_lists_prints_and_fingerprints(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "schemas")
    assert code == 0 and "emotion_event  io.emofleet.EmotionEvent  versions 2" in out
    code, out, _ = cli(capsys, "schemas", "dead_letter")
    assert json.loads(out)["name"] == "DeadLetter"
    code, out, _ = cli(capsys, "schemas", "emotion_event", "--fingerprint")
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["v1", "v2"]
    assert lines[1].split()[2] == "c301" + make_codec().encode(
        "emotion_event", events()[0], topic="t")[2:10].hex(), "the header the codec writes"
