from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from confluent_kafka.admin import AdminClient

from emofleet.infra.local_stack import LocalStack, ensure_redis, free_port, redis_answers, stop_process
from emofleet.core.config import Settings
from emofleet.streams.topics import ensure_topics, pipeline_topics


def test_topic_creation_is_idempotent(settings: Settings) -> None:
    admin = AdminClient(settings.kafka.client_config())
    specs = pipeline_topics(settings.kafka)

    first = ensure_topics(admin, specs)
    second = ensure_topics(admin, specs)

    assert [s.outcome for s in first] == ["created"] * 5
    assert [s.outcome for s in second] == ["exists"] * 5
    assert {s.name for s in second} == {settings.kafka.audio_topic, settings.kafka.results_topic,
                                        settings.kafka.dead_letter_topic, settings.kafka.alerts_topic,
                                        settings.kafka.aggregates_topic}
    assert all(s.partitions == settings.kafka.partitions for s in second)


def test_local_stack_start_status_stop(tmp_path: Path, redis_url: str) -> None:
    stack = LocalStack(tmp_path / "data", redis_url)

    state = stack.start()
    again = stack.start()

    assert again.bootstrap_servers == state.bootstrap_servers, "a second start reuses the running broker"
    assert stack.status()["broker"].startswith(f"up at {state.bootstrap_servers}")
    assert Path(state.chdb_path).is_dir()
    assert stack.stop() is True
    assert stack.status()["broker"] == "stopped"
    assert redis_answers(redis_url), "stop never touches a Redis it did not start"


def test_redis_is_started_when_nothing_answers(tmp_path: Path) -> None:
    dead_url = f"redis://127.0.0.1:{free_port()}/0"

    url, pid = ensure_redis(dead_url, tmp_path)
    try:
        assert pid is not None
        assert redis_answers(url)
    finally:
        stop_process(pid)
    assert not redis_answers(url)


def test_cli_topics_create_prints_what_exists(settings: Settings) -> None:
    env_args = ["--bootstrap-servers", settings.kafka.bootstrap_servers]
    env = {"EMOFLEET_KAFKA_AUDIO_TOPIC": settings.kafka.audio_topic,
           "EMOFLEET_KAFKA_RESULTS_TOPIC": settings.kafka.results_topic,
           "EMOFLEET_KAFKA_DEAD_LETTER_TOPIC": settings.kafka.dead_letter_topic,
           "EMOFLEET_KAFKA_ALERTS_TOPIC": settings.kafka.alerts_topic,
           "EMOFLEET_KAFKA_AGGREGATES_TOPIC": settings.kafka.aggregates_topic,
           "EMOFLEET_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin"}
    run = lambda: subprocess.run([sys.executable, "-m", "emofleet.cli", "topics", "create", *env_args,
                                  "--partitions", "3"], env=env, capture_output=True, text=True, timeout=60)
    first, second = run(), run()

    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created") == 5 and "partitions=3" in first.stdout
    assert second.stdout.count("exists") == 5
