"""Processor replays reach the sink as the same event_id at a new Kafka position: stored once, without FINAL.

A processor killed after producing results but before committing its offsets makes the group process
those references again; the results topic then holds each of those events twice (same ``event_id``,
same source position, another results offset). ``ReplacingMergeTree`` would collapse them at some merge,
but readers without ``FINAL`` would count both until then (seen in tests/test_faults.py's runs).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from emofleet.schemas.codec import make_codec
from emofleet.sinks.clickhouse import connect
from emofleet.sinks.query_server import direct_runner, owner_runner
from emofleet.sinks.migrations import migrate
from emofleet.sinks.service import ClickHouseSink, RecentIds
from emofleet.core.config import Settings

from metrics_helpers import metric
from pipeline_helpers import create_topics
from sink_samples import sample_dead_letter
from test_sink import counts, make_events, publish, running_sink, wait_rows


@pytest.fixture
def sink_settings(settings: Settings) -> Settings:
    create_topics(settings)
    return replace(settings, clickhouse=replace(settings.clickhouse, batch_rows=200, batch_seconds=0.2))


@pytest.fixture
def chdb(sink_settings: Settings):
    client = connect(sink_settings.clickhouse, sink_settings.clickhouse_dsn)
    migrate(client, sink_settings.clickhouse.database)
    yield client
    client.close()


def skipped_ids(sink: ClickHouseSink) -> float:
    """Messages the sink dropped because it had already stored their id (a processor's replay)."""
    return metric(sink.metrics, "emofleet_sink_skipped_replays_total", by="id")


def test_recent_ids_are_bounded_and_forget_the_oldest_first() -> None:
    recent = RecentIds(3)
    assert [recent.add(k) for k in "abca"] == [True, True, True, False]
    recent.add("d")  # "a" is forgotten
    assert len(recent) == 3 and recent.add("a") and not recent.add("d")
    recent.discard(["d"])
    assert recent.add("d")
    off = RecentIds(0)
    assert off.add("x") and off.add("x") and len(off) == 0


def test_replayed_events_and_dead_letters_are_stored_once(sink_settings: Settings, chdb) -> None:
    database = sink_settings.clickhouse.database
    events = make_events(300)
    publish(sink_settings, events)
    publish(sink_settings, events[100:160])  # the replay after a processor's kill -9: new positions
    codec = make_codec()
    from confluent_kafka import Producer

    producer = Producer(sink_settings.kafka.client_config())
    topic = sink_settings.kafka.dead_letter_topic
    for letter in [sample_dead_letter(offset=o, failed_at_ms=1_764_000_000_000 + i) for i, o in enumerate((1, 2, 1))]:
        producer.produce(topic, value=codec.encode("dead_letter", letter, topic=topic))
    assert producer.flush(10) == 0

    with running_sink(sink_settings, chdb) as sink:
        run = owner_runner(sink_settings.data_dir)
        wait_rows(run, database, 300)
        import time

        deadline = time.monotonic() + 30
        while skipped_ids(sink) < 61 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the sink's progress, bounded
        (dead,) = run(f"SELECT count() AS rows, uniqExact(dead_letter_id) AS ids FROM {database}.dead_letters", {})

    assert counts(direct_runner(chdb), database) == (300, 300), "no duplicate rows without FINAL"
    assert (dead["rows"], dead["ids"]) == (2, 2)
    assert skipped_ids(sink) == 61
    assert metric(sink.metrics, "emofleet_sink_inserted_rows_total", table="emotion_events") == 300


def test_a_restarted_sink_remembers_what_is_stored(sink_settings: Settings, chdb) -> None:
    """The ids come back from ClickHouse on assignment, so a replay that arrives after a sink restart
    is dropped too."""
    database = sink_settings.clickhouse.database
    events = make_events(200)
    publish(sink_settings, events)
    with running_sink(sink_settings, chdb):
        wait_rows(owner_runner(sink_settings.data_dir), database, 200)

    publish(sink_settings, events[50:80] + make_events(20, start=200))
    with running_sink(sink_settings, chdb) as restarted:
        wait_rows(owner_runner(sink_settings.data_dir), database, 220)
        import time

        deadline = time.monotonic() + 30
        while skipped_ids(restarted) < 30 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the sink's progress, bounded

    assert counts(direct_runner(chdb), database) == (220, 220)
    assert skipped_ids(restarted) == 30


class _CommitFailsOnce:
    """The sink loop's consumer, whose first commit fails as after a broker restart."""

    def __init__(self, consumer: object) -> None:
        self._consumer = consumer
        self.failed = 0

    def commit(self, *args: object, **kwargs: object) -> object:
        from confluent_kafka import KafkaError, KafkaException

        if not self.failed:
            self.failed += 1
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "Commit failed: Broker: Unknown member"))
        return self._consumer.commit(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self._consumer, name)


def test_a_failed_commit_does_not_stop_the_sink(sink_settings: Settings, chdb) -> None:
    """Found by tests/test_faults.py: after a broker restart the group forgot the sink's member and its sync
    commit raised UNKNOWN_MEMBER_ID out of run(). The rows are stored, so the sink carries on."""
    database = sink_settings.clickhouse.database
    publish(sink_settings, make_events(100))
    with running_sink(sink_settings, chdb) as sink:
        sink.loop._consumer = failing = _CommitFailsOnce(sink.loop._consumer)  # noqa: SLF001 - fault injection
        run = owner_runner(sink_settings.data_dir)
        wait_rows(run, database, 100)
        publish(sink_settings, make_events(50, start=100))
        rows, ids = wait_rows(run, database, 150)
    assert failing.failed == 1
    assert sink.errors == []  # type: ignore[attr-defined]
    assert (rows, ids) == (150, 150)
