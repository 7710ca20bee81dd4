"""Rows ClickHouse rejects for good become dead letters while the rest goes on; frame-level results reach
``emotion_frames``. Real broker, real chDB: the rejections are real constraint violations."""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from emofleet.schemas.codec import make_codec
from emofleet.schemas.emotions import EMOTIONS
from emofleet.sinks.rows import pooled_frames
from emofleet.sinks.service import REJECTED, ClickHouseSink
from emofleet.core.config import Settings

from metrics_helpers import metric
from pipeline_helpers import Crash, crash_once
from sink_samples import sample_dead_letter, sample_events
from waiting import wait_for
from test_sink import chdb, make_events, running_sink, sink_settings  # noqa: F401 - fixtures

WAIT_SECONDS = 60.0  # for the sink to insert and commit, generous for a loaded test machine


def inserted(sink: ClickHouseSink, table: str) -> float:
    """Rows of ``table`` ClickHouse acknowledged to this sink."""
    return metric(sink.metrics, "emofleet_sink_inserted_rows_total", table=table)


def produce(settings: Settings, schema: str, topic: str, records: list[dict],
            partitions: list[int]) -> list[tuple[int, int]]:
    """Each record to its partition; returns the (partition, offset) each got."""
    codec = make_codec()
    producer = Producer(settings.kafka.client_config() | {"enable.idempotence": True})
    positions: dict[int, tuple[int, int]] = {}
    for i, (record, partition) in enumerate(zip(records, partitions, strict=True)):
        producer.produce(topic, key=f"k{i}".encode(), value=codec.encode(schema, record, topic=topic),
                         partition=partition,
                         on_delivery=lambda error, message, i=i: positions.__setitem__(
                             i, (message.partition(), message.offset())))
    assert producer.flush(30) == 0
    return [positions[i] for i in range(len(records))]


def committed(settings: Settings, topic: str) -> dict[int, int]:
    consumer = Consumer(settings.kafka.client_config() | {"group.id": settings.kafka.sink_group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(settings.kafka.partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        consumer.close()


def ends(positions: list[tuple[int, int]]) -> dict[int, int]:
    """Next offset per partition after ``positions``."""
    result: dict[int, int] = {}
    for partition, offset in positions:
        result[partition] = max(result.get(partition, 0), offset + 1)
    return result


def wait_committed(settings: Settings, topic: str, positions: list[tuple[int, int]]) -> None:
    """Until the sink group's commits on ``topic`` are just past ``positions``."""
    wait_for(lambda: committed(settings, topic) == ends(positions),
             lambda: f"commits at {ends(positions)}, have {committed(settings, topic)}", timeout=WAIT_SECONDS)


def query(client: Any, sql: str) -> list[dict[str, Any]]:
    result = client.query(sql, query_formats={"String": "bytes"})
    return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


def test_a_row_clickhouse_rejects_becomes_a_dead_letter_and_the_rest_goes_on(sink_settings: Settings, chdb) -> None:
    database, topic = sink_settings.clickhouse.database, sink_settings.kafka.results_topic
    chdb.command(f"ALTER TABLE {database}.emotion_events ADD CONSTRAINT conf_ok CHECK confidence <= 1")
    events = make_events(40)
    events[9]["confidence"] = 2.0  # partition 1, with good rows before and after it there
    positions = produce(sink_settings, "emotion_event", topic, events, [i % 4 for i in range(40)])
    bad_partition, bad_offset = positions[9]

    with running_sink(sink_settings, chdb) as sink:
        wait_for(lambda: inserted(sink, "emotion_events") >= 39 and inserted(sink, "dead_letters") >= 1,
                 lambda: f"39 events and 1 dead letter, have {inserted(sink, 'emotion_events')} and "
                         f"{inserted(sink, 'dead_letters')}", timeout=WAIT_SECONDS)
        later = make_events(1, start=40)
        positions += produce(sink_settings, "emotion_event", topic, later, [(bad_partition + 1) % 4])
        wait_for(lambda: inserted(sink, "emotion_events") >= 40,
                 lambda: f"40 events, have {inserted(sink, 'emotion_events')}", timeout=WAIT_SECONDS)
        wait_committed(sink_settings, topic, positions)

    assert sink.errors == []  # type: ignore[attr-defined]
    (row,) = query(chdb, f"SELECT count() AS rows, uniqExact(event_id) AS ids, "
                         f"countIf(event_id = '{events[9]['event_id']}') AS bad FROM {database}.emotion_events")
    assert (row["rows"], row["ids"], row["bad"]) == (40, 40, 0), "every good row exactly once, the bad one not"
    (dead,) = query(chdb, f"SELECT * FROM {database}.dead_letters")
    assert (dead["reason"], dead["stage"], dead["processor"]) == (REJECTED.encode(), b"sink", b"sink")
    assert (dead["source_topic"], dead["source_partition"], dead["source_offset"]) == (
        topic.encode(), bad_partition, bad_offset)
    assert dead["payload"] == make_codec().encode("emotion_event", events[9], topic=topic)
    assert dead["key"] == b"k9" and dead["audio_id"] == events[9]["audio_id"].encode()
    message = dead["error_message"].decode()
    assert "conf_ok" in message and "VIOLATED_CONSTRAINT" in message and "\n" not in message
    assert metric(sink.metrics, "emofleet_dead_letters_total", reason=REJECTED, stage="sink") == 1
    assert metric(sink.metrics, "emofleet_errors_total", kind=REJECTED) == 0, "no dead letter was dropped"


def test_a_rejected_dead_letter_is_logged_and_counted_not_sent_round_again(sink_settings: Settings, chdb) -> None:
    database, topic = sink_settings.clickhouse.database, sink_settings.kafka.dead_letter_topic
    chdb.command(f"ALTER TABLE {database}.dead_letters ADD CONSTRAINT no_poison CHECK reason != 'poison'")
    letters = [sample_dead_letter(offset=o, reason=r, failed_at_ms=1_764_000_000_000 + o)
               for o, r in enumerate(("not_found", "poison", "not_found"))]
    positions = produce(sink_settings, "dead_letter", topic, letters, [0, 0, 0])

    with running_sink(sink_settings, chdb) as sink:
        wait_committed(sink_settings, topic, positions)

    assert sink.errors == []  # type: ignore[attr-defined]
    assert [r["source_offset"] for r in query(chdb, f"SELECT source_offset FROM {database}.dead_letters "
                                                    "ORDER BY source_offset")] == [0, 2]
    assert metric(sink.metrics, "emofleet_errors_total", kind=REJECTED) == 1, "the rejected dead letter was dropped"
    assert metric(sink.metrics, "emofleet_dead_letters_total", reason=REJECTED, stage="sink") == 0
    assert sink.metrics.registry.get_sample_value("emofleet_messages_out_total", {"topic": topic}) is None, \
        "nothing was produced back to the dead-letter topic"


# ------------------------------------------------------------------------------------------ frames


def test_pooled_frames_average_runs_and_keep_the_first_index() -> None:
    frames = [{name: float(i) for name in EMOTIONS} for i in range(7)]
    pooled = pooled_frames(frames, 3)
    assert [index for index, _ in pooled] == [0, 3, 6]
    assert [scores[0] for _, scores in pooled] == [1.0, 4.0, 6.0]  # means of 0-2, 3-5, and the short run 6
    assert pooled_frames(frames, 7) == [(i, [float(i)] * len(EMOTIONS)) for i in range(7)]


def test_frame_rows_reach_emotion_frames_bounded_and_once_across_a_crash(sink_settings: Settings, chdb) -> None:
    from dataclasses import replace

    settings = replace(sink_settings, clickhouse=replace(sink_settings.clickhouse, max_frames_per_clip=10))
    database, topic = settings.clickhouse.database, settings.kafka.results_topic
    long_clip = sample_events(audio_id="long", produced_at_ms=1_764_000_000_000, tenant="acme",
                              windows=[(0.0, 30.0), (30.0, 34.0)], frames=12)  # 2 windows + summary, 24 frames
    short_clip = sample_events(audio_id="short", produced_at_ms=1_764_000_001_000, tenant="beta", frames=5)
    plain = make_events(20)
    events = long_clip + short_clip + plain
    positions = produce(settings, "emotion_event", topic, events, [i % 4 for i in range(len(events))])

    with running_sink(settings, chdb, before_commit=crash_once()) as crashed:
        wait_for(lambda: inserted(crashed, "emotion_frames") > 0, "frames in the batch that crashed",
                 timeout=WAIT_SECONDS)
    assert isinstance(crashed.errors[0], Crash)  # type: ignore[attr-defined]

    with running_sink(settings, chdb) as restarted:
        wait_committed(settings, topic, positions)

    assert restarted.errors == []  # type: ignore[attr-defined]
    frames = query(chdb, f"SELECT event_id, tenant, frame_index, score_neutral FROM {database}.emotion_frames "
                         "ORDER BY event_id, frame_index")
    long_id, short_id = long_clip[-1]["event_id"], short_clip[-1]["event_id"]
    assert long_clip[-1]["segment_index"] == -1 and short_clip[-1]["segment_index"] == -1
    by_event = {event_id: [(f["tenant"], f["frame_index"]) for f in frames if f["event_id"] == event_id.encode()]
                for event_id in (long_id, short_id)}
    assert by_event[long_id] == [(b"acme", i) for i in range(0, 24, 3)]
    assert by_event[short_id] == [(b"beta", i) for i in range(5)]
    assert len(frames) == 13, "no frame row twice (no FINAL), none from window events or plain events"
    assert {f["score_neutral"] for f in frames} == {long_clip[-1]["scores"]["neutral"]}  # same scores per frame
    (row,) = query(chdb, f"SELECT count() AS rows FROM {database}.emotion_events")
    assert row["rows"] == len(events)
