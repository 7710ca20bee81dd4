"""Fixtures every test builds on: one real Kafka broker per run, real Redis, ClickHouse, unique names.

``EMOFLEET_BACKEND`` picks where they come from (infra/backends.py): ``embedded`` (default: a Tansu
broker started for the run, the local Redis, chDB under each test's data directory), ``external``
(your services, from the EMOFLEET_* variables) or ``containers`` (testcontainers). Each test gets its
own topics, consumer groups, Redis key prefix, ClickHouse database (off the embedded backend) and data
directory through the ``settings`` fixture, so tests never see each other's data and a shared cluster
is not disturbed. ``@pytest.mark.backend(...)`` names the backends a test can run on.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from emofleet.infra.backends import (
    BackendError, Endpoints, backend_name, containers, docker_unreachable, external_endpoints,
)
from emofleet.infra.local_stack import ensure_redis, start_broker, stop_process
from emofleet.core.config import BatchSettings, KafkaSettings, Secret, Settings


def pytest_configure(config: pytest.Config) -> None:
    try:
        config.emofleet_backend = backend_name()  # type: ignore[attr-defined]
    except BackendError as error:
        pytest.exit(str(error), returncode=2)
    if config.emofleet_backend == "containers" and (reason := docker_unreachable()):  # type: ignore[attr-defined]
        pytest.exit(f"EMOFLEET_BACKEND=containers: {reason}; use embedded or external", returncode=2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    current = config.emofleet_backend  # type: ignore[attr-defined]
    for item in items:
        marker = item.get_closest_marker("backend")
        if marker and current not in marker.args:
            item.add_marker(pytest.mark.skip(reason=f"{marker.kwargs.get('reason', 'backend-specific')} "
                                                    f"(runs on {', '.join(marker.args)}; this run: {current})"))


@pytest.fixture(scope="session")
def backend(pytestconfig: pytest.Config) -> str:
    return str(pytestconfig.emofleet_backend)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def endpoints(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    if backend == "external":
        yield external_endpoints()
    elif backend == "containers":
        with containers() as started:
            yield started
    else:
        process, bootstrap = start_broker(tmp_path_factory.mktemp("broker") / "broker.log")
        wanted = os.environ.get("EMOFLEET_CACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
        redis, started_pid = ensure_redis(wanted, tmp_path_factory.mktemp("redis"), detach=False)
        yield Endpoints(bootstrap, redis, clickhouse_dsn="")
        stop_process(process.pid)
        if started_pid:
            stop_process(started_pid)


@pytest.fixture(scope="session")
def kafka_bootstrap(endpoints: Endpoints) -> str:
    return endpoints.bootstrap_servers


@pytest.fixture(scope="session")
def redis_url(endpoints: Endpoints) -> str:
    return endpoints.redis_url


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> str:
    """A short name unique to this test invocation, safe for topics, groups and key prefixes."""
    name = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name)[:40].strip("-")
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(endpoints: Endpoints, backend: str, unique: str, tmp_path: Path) -> Settings:
    kafka_bootstrap, redis_url = endpoints.bootstrap_servers, endpoints.redis_url
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
        schema_registry_url=endpoints.schema_registry_url,
        leave_group_on_close=backend != "embedded",  # Tansu mishandles LeaveGroup: tests/test_tansu_group.py
    )
    clickhouse = base.clickhouse
    if endpoints.clickhouse_dsn:  # a shared server or path: a database of the test's own
        clickhouse = replace(clickhouse, dsn=endpoints.clickhouse_dsn, username=endpoints.clickhouse_username,
                             password=Secret(endpoints.clickhouse_password),
                             database="t_" + re.sub(r"[^a-zA-Z0-9]", "_", unique))
    return replace(
        base,
        data_dir=tmp_path / "data",
        kafka=kafka,
        clickhouse=clickhouse,
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
    from emofleet.core.config import ModelSettings

    return load_model(ModelSettings(model="tiny"), cache_dir=tmp_path_factory.mktemp("models"))
