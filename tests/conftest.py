"""Fixtures every test builds on: one real Kafka broker (Tansu) per run, real Redis, unique names.

Each test gets its own topics, consumer groups, Redis key prefix and data directory through the
``settings`` fixture, so tests never see each other's data.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from emofleet.infra.local_stack import ensure_redis, start_broker, stop_process
from emofleet.streams.config import BatchSettings, KafkaSettings, Settings


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("broker")
    process, bootstrap = start_broker(logs / "broker.log")
    yield bootstrap
    stop_process(process.pid)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    wanted = os.environ.get("EMOFLEET_CACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
    url, started_pid = ensure_redis(wanted, tmp_path_factory.mktemp("redis"), detach=False)
    yield url
    if started_pid:
        stop_process(started_pid)


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> str:
    """A short name unique to this test invocation, safe for topics, groups and key prefixes."""
    name = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name)[:40].strip("-")
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(kafka_bootstrap: str, redis_url: str, unique: str, tmp_path: Path) -> Settings:
    base = Settings()
    kafka = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        audio_topic=f"{unique}.audio",
        results_topic=f"{unique}.emotions",
        dead_letter_topic=f"{unique}.dead-letters",
        alerts_topic=f"{unique}.alerts",
        aggregates_topic=f"{unique}.aggregates",
        partitions=4,
        processor_group=f"{unique}.processors",
        sink_group=f"{unique}.sink",
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
    )
    return replace(
        base,
        data_dir=tmp_path / "data",
        kafka=kafka,
        audio=replace(base.audio, file_roots=(tmp_path,)),
        cache=replace(base.cache, redis_url=redis_url, key_prefix=f"test:{unique}"),
        model=replace(base.model, model="tiny"),
        batch=BatchSettings(max_wait_ms=50, commit_interval_seconds=0.2),
    )


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[object]:
    import redis

    client = redis.Redis.from_url(settings.cache.redis_url)
    yield client
    keys = list(client.scan_iter(f"{settings.cache.key_prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> object:
    """One loaded tiny emotion2vec for every in-process processor test (FunASR's import costs ~8 s)."""
    from emofleet.processors.model import load_model
    from emofleet.streams.config import ModelSettings

    return load_model(ModelSettings(model="tiny"), cache_dir=tmp_path_factory.mktemp("models"))
