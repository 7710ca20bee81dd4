"""The ClickHouse sink against the real broker and chDB: effectively-once inserts, faults, routing."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from emofleet.processors.events import ClipResult, ModelIdentity, emotion_events, prediction_from_scores
from emofleet.schemas.codec import make_codec
from emofleet.sinks.clickhouse import connect
from emofleet.sinks.query_server import QueryServer, QueryError, direct_runner, owner_runner
from emofleet.sinks.migrations import migrate
from emofleet.sinks.service import ClickHouseSink
from emofleet.core.config import Settings
from emofleet.streams.dead_letters import Lineage

from metrics_helpers import metric
from pipeline_helpers import Crash, FlakyClient, SinkWithCommitHook, crash_once, create_topics


def make_events(count: int, *, start: int = 0) -> list[dict]:
    rng = np.random.default_rng(start)
    model = ModelIdentity("tiny", "r1", "utterance", False)
    events = []
    for i in range(start, start + count):
        scores = rng.dirichlet(np.ones(9)).astype(np.float32)
        result = ClipResult(((0.0, 2.0),), (prediction_from_scores(scores),))
        reference = {"audio_id": f"a{i}", "uri": f"s3://b/{i}.wav", "produced_at": 1_764_000_000_000 + i * 1000,
                     "tenant": "acme", "source": f"src{i % 3}", "channel": None, "call_id": None, "attributes": {}}
        events += emotion_events(reference, Lineage("audio", i % 4, i), f"{i:064x}", result, model,
                                 cache_hit=bool(i % 5 == 0), processed_at_ms=1_764_000_000_500 + i * 1000,
                                 latency_ms=12)
    return events


def publish(settings: Settings, events: list[dict]) -> None:
    codec = make_codec()
    producer = Producer(settings.kafka.client_config() | {"enable.idempotence": True})
    for event in events:
        producer.produce(settings.kafka.results_topic, key=event["audio_id"].encode(),
                         value=codec.encode("emotion_event", event, topic=settings.kafka.results_topic))
    assert producer.flush(30) == 0


@pytest.fixture
def sink_settings(settings: Settings) -> Settings:
    create_topics(settings)
    return replace(settings, clickhouse=replace(settings.clickhouse, batch_rows=200, batch_seconds=0.2))


@pytest.fixture
def chdb(sink_settings: Settings) -> Iterator[object]:
    """One chDB client for the test (chDB allows one per data directory and process)."""
    client = connect(sink_settings.clickhouse, sink_settings.clickhouse_dsn)
    migrate(client, sink_settings.clickhouse.database)
    yield client
    client.close()


@contextmanager
def running_sink(settings: Settings, client: object, *, before_commit: Callable[[], None] | None = None,
                 **kwargs: object) -> Iterator[ClickHouseSink]:
    lock = threading.Lock()
    if before_commit is None:
        sink = ClickHouseSink(settings, client, make_codec(), client_lock=lock, **kwargs)
    else:
        sink = SinkWithCommitHook(settings, client, make_codec(), client_lock=lock, before_commit=before_commit,
                                  **kwargs)
    server = QueryServer(direct_runner(client, lock), settings.data_dir)
    server.start()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sink.run()
        except BaseException as error:  # noqa: BLE001 - reported to the test
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        sink.stop()
        thread.join(30)
        server.stop()
    sink.errors = errors  # type: ignore[attr-defined]


def counts(run, database: str) -> tuple[int, int]:
    (row,) = run(f"SELECT count() AS rows, uniqExact(event_id) AS ids FROM {database}.emotion_events", {})
    return int(row["rows"]), int(row["ids"])


def wait_rows(run, database: str, expected: int, timeout: float = 60) -> tuple[int, int]:
    import time

    deadline = time.monotonic() + timeout
    while (found := counts(run, database))[0] < expected and time.monotonic() < deadline:
        time.sleep(0.1)  # polling ClickHouse for the sink's progress, bounded
    return found


def test_events_land_once_and_queries_route_through_the_owner(sink_settings: Settings, chdb) -> None:
    database = sink_settings.clickhouse.database
    events = make_events(500)
    publish(sink_settings, events)

    with running_sink(sink_settings, chdb) as sink:
        run = owner_runner(sink_settings.data_dir)
        assert run is not None, "the owner file points at the running sink"
        rows, ids = wait_rows(run, database, len(events))
        with pytest.raises(QueryError, match="readonly"):
            run(f"INSERT INTO {database}.emotion_events (event_id) VALUES ('x')", {})

    assert (rows, ids) == (500, 500)
    assert metric(sink.metrics, "emofleet_sink_batch_rows_count") >= 2, "rows were batched by count and time"
    assert owner_runner(sink_settings.data_dir) is None, "the owner file is removed on stop"


def test_crash_between_insert_and_commit_leaves_no_duplicates(sink_settings: Settings, chdb) -> None:
    database = sink_settings.clickhouse.database
    events = make_events(600)
    publish(sink_settings, events)

    with running_sink(sink_settings, chdb, before_commit=crash_once()) as crashed:
        wait_rows(owner_runner(sink_settings.data_dir), database, 1)
    assert isinstance(crashed.errors[0], Crash)  # type: ignore[attr-defined]
    stored_before_restart = counts(direct_runner(chdb), database)[0]
    assert stored_before_restart > 0, "the first batch was inserted before the crash"

    with running_sink(sink_settings, chdb) as restarted:
        run = owner_runner(sink_settings.data_dir)
        rows, ids = wait_rows(run, database, len(events))

    assert (rows, ids) == (600, 600), "zero duplicate rows (no FINAL) and zero missing"
    assert metric(restarted.metrics, "emofleet_sink_skipped_replays_total", by="position") >= stored_before_restart


def test_insert_failures_pause_and_retry_without_loss(sink_settings: Settings, chdb) -> None:
    database = sink_settings.clickhouse.database
    flaky = FlakyClient(chdb)
    flaky.failing.set()
    publish(sink_settings, make_events(300))

    with running_sink(sink_settings, flaky) as sink:
        import time

        deadline = time.monotonic() + 30
        while flaky.failed < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until several inserts have failed
        assert counts(owner_runner(sink_settings.data_dir), database) == (0, 0)
        flaky.failing.clear()
        publish(sink_settings, make_events(100, start=300))
        rows, ids = wait_rows(owner_runner(sink_settings.data_dir), database, 400)

    assert (rows, ids) == (400, 400)
    assert metric(sink.metrics, "emofleet_sink_insert_failures_total") >= 3


def test_malformed_events_reach_the_dead_letter_table(sink_settings: Settings, chdb) -> None:
    database = sink_settings.clickhouse.database
    publish(sink_settings, make_events(10))
    producer = Producer(sink_settings.kafka.client_config())
    producer.produce(sink_settings.kafka.results_topic, key=b"bad", value=b"definitely not avro")
    producer.flush(10)

    with running_sink(sink_settings, chdb):
        run = owner_runner(sink_settings.data_dir)
        wait_rows(run, database, 10)
        import time

        deadline = time.monotonic() + 30
        dead: list[dict] = []
        while not dead and time.monotonic() < deadline:
            dead = run(f"SELECT reason, stage, source_topic, payload FROM {database}.dead_letters", {})
            time.sleep(0.1)  # polling for the dead letter's round trip through Kafka

    assert dead == [{"reason": "malformed", "stage": "sink", "source_topic": sink_settings.kafka.results_topic,
                     "payload": "definitely not avro"}]
