"""Nothing lost on the ordinary path: topics recreated, the broker restarted, `up` run again and again.

The sink resumes each partition after the highest position it stored *for the topic's current
incarnation* (its Kafka topic id): a recreated topic or a restarted memory-backed broker numbers offsets
from 0 again, and old rows must never hide new messages. `up` waits for exactly the references it sent,
by identity, and says which of them an earlier run had already stored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from emofleet.infra.local_stack import start_broker, stop_process
from emofleet.samples import write_samples
from emofleet.sinks.clickhouse import connect
from emofleet.sinks.query_server import direct_runner
from emofleet.sinks.migrations import migrate
from emofleet.core.config import ClickHouseSettings, Settings
from emofleet.streams.topics import ensure_topics, pipeline_topics, topic_ids

from pipeline_helpers import create_topics
from test_sink import counts, make_events, publish, running_sink, wait_rows


def recreate_results_topic(settings: Settings) -> None:
    admin = AdminClient(settings.kafka.client_config())
    for future in admin.delete_topics([settings.kafka.results_topic], operation_timeout=10).values():
        future.result()
    ensure_topics(admin, [s for s in pipeline_topics(settings.kafka) if s.name == settings.kafka.results_topic])


@pytest.fixture
def sink_settings(settings: Settings) -> Settings:
    create_topics(settings)
    return replace(settings, clickhouse=replace(settings.clickhouse, batch_rows=200, batch_seconds=0.2))


def test_a_topic_recreated_while_the_sink_is_down_is_read_from_its_start(sink_settings: Settings) -> None:
    database = sink_settings.clickhouse.database
    client = connect(sink_settings.clickhouse, sink_settings.clickhouse_dsn)
    migrate(client, database)
    run = direct_runner(client)
    try:
        publish(sink_settings, make_events(12))
        with running_sink(sink_settings, client):
            assert wait_rows(run, database, 12) == (12, 12)
        before = topic_ids(AdminClient(sink_settings.kafka.client_config()), [sink_settings.kafka.results_topic])

        recreate_results_topic(sink_settings)  # new incarnation: offsets from 0 again, under a new topic id
        after = topic_ids(AdminClient(sink_settings.kafka.client_config()), [sink_settings.kafka.results_topic])
        assert before != after
        publish(sink_settings, make_events(12, start=100))
        with running_sink(sink_settings, client) as sink:
            assert wait_rows(run, database, 24) == (24, 24)
        assert sink.errors == []  # type: ignore[attr-defined]
        (row,) = run(f"SELECT uniqExact(kafka_topic_id) AS incarnations FROM {database}.emotion_events", {})
        assert row["incarnations"] == 2
    finally:
        client.close()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[dict]:
    """A Tansu broker of this test's own, restartable on the same port (memory storage: a restart loses
    every topic, offset and group)."""
    log = tmp_path / "broker.log"
    process, bootstrap = start_broker(log)
    broker = {"process": process, "bootstrap": bootstrap}

    def restart() -> None:
        os.kill(broker["process"].pid, signal.SIGKILL)
        broker["process"].wait()
        broker["process"], _ = start_broker(log, port=int(bootstrap.rsplit(":", 1)[1]))

    broker["restart"] = restart
    yield broker
    stop_process(broker["process"].pid)


@pytest.mark.backend("embedded", reason="kills and restarts a Tansu broker of its own")
def test_broker_killed_and_restarted_loses_nothing_with_the_sink_down_or_running(
        sink_settings: Settings, own_broker: dict) -> None:
    settings = replace(sink_settings, kafka=replace(sink_settings.kafka, bootstrap_servers=own_broker["bootstrap"]))
    database = settings.clickhouse.database
    client = connect(settings.clickhouse, settings.clickhouse_dsn)
    migrate(client, database)
    run = direct_runner(client)
    try:
        create_topics(settings)
        publish(settings, make_events(10))
        with running_sink(settings, client):
            assert wait_rows(run, database, 10) == (10, 10)

        own_broker["restart"]()  # sink down: the next sink meets a new, shorter log
        create_topics(settings)
        publish(settings, make_events(10, start=100))
        with running_sink(settings, client) as sink:
            assert wait_rows(run, database, 20) == (20, 20)
            own_broker["restart"]()  # sink running: its positions now point past the new log's end
            create_topics(settings)
            publish(settings, make_events(10, start=200))
            assert wait_rows(run, database, 30, timeout=120) == (30, 30)
        assert sink.errors == []  # type: ignore[attr-defined]
        assert counts(run, database) == (30, 30)
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.backend("embedded", reason="runs `emofleet up` on the embedded stack it starts and stops")
def test_up_again_and_again_across_stack_stop_and_broker_kill_stores_each_reference_once(
        tmp_path: Path, unique: str, redis_url: str) -> None:
    data_dir, audio = tmp_path / "data", tmp_path / "audio"
    write_samples(audio, 6, min_seconds=0.5, max_seconds=2.0)
    (audio / "broken.wav").write_bytes(b"this is not audio")  # a dead letter in every run, each its own
    env = os.environ | {"EMOFLEET_CACHE_KEY_PREFIX": f"test:{unique}", "EMOFLEET_CACHE_REDIS_URL": redis_url,
                        "EMOFLEET_KAFKA_SESSION_TIMEOUT_MS": "3000", "EMOFLEET_KAFKA_HEARTBEAT_INTERVAL_MS": "500"}
    cli = [sys.executable, "-m", "emofleet.cli"]

    def up() -> str:
        done = subprocess.run([*cli, "up", "--model", "tiny", "--audio", str(audio), "--data-dir", str(data_dir),
                               "--stall-timeout", "90", "--timeout", "240"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return next(line for line in done.stdout.splitlines() if "references stored in ClickHouse" in line)

    def kill_broker() -> None:
        os.kill(json.loads((data_dir / "stack.json").read_text())["broker_pid"], signal.SIGKILL)

    try:
        assert up().startswith("7/7 references stored in ClickHouse: 6 new results, 0 already stored by an "
                               "earlier run, 1 dead letters (not_audio: 1)")
        write_samples(audio, 9, min_seconds=0.5, max_seconds=2.0)  # 3 new clips beside the 6 stored ones
        assert up().startswith("10/10 references stored in ClickHouse: 3 new results, 6 already stored")
        assert up().startswith("10/10 references stored in ClickHouse: 0 new results, 9 already stored")
        subprocess.run([*cli, "stack", "stop", "--data-dir", str(data_dir)], env=env, check=True, timeout=60)
        assert up().startswith("10/10 references stored in ClickHouse: 0 new results, 9 already stored")
        kill_broker()  # the next `up` finds it dead and starts a new one: empty log, offsets from 0 again
        assert up().startswith("10/10 references stored in ClickHouse: 0 new results, 9 already stored")
    finally:
        subprocess.run([*cli, "stack", "stop", "--data-dir", str(data_dir)], env=env, timeout=60)

    client = connect(ClickHouseSettings(), f"chdb://{data_dir.resolve() / 'chdb'}")
    try:
        ((rows, clips),) = client.query("SELECT count(), uniqExact(audio_id) FROM emofleet.emotion_events "
                                        "WHERE segment_index = -1").result_rows
        ((dead, dead_ids),) = client.query("SELECT count(), uniqExact(dead_letter_id) FROM emofleet.dead_letters"
                                           ).result_rows
    finally:
        client.close()
    assert (rows, clips) == (9, 9)
    assert (dead, dead_ids) == (5, 5)  # one per run: five references of broken.wav, five dead letters
