"""The backend switch: the same tests and `emofleet up` against services named from outside."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from emofleet.infra.local_stack import start_broker, stop_process
from emofleet.sinks.clickhouse import connect
from emofleet.core.config import ClickHouseSettings

pytestmark = [pytest.mark.slow, pytest.mark.backend("embedded", reason="starts its own external services")]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def outside_services(tmp_path: Path, redis_url: str) -> Iterator[dict[str, str]]:
    """A broker and a chDB path started apart from the suite, as a user's own cluster would be."""
    process, bootstrap = start_broker(tmp_path / "outside-broker.log")
    yield {"EMOFLEET_BACKEND": "external", "EMOFLEET_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "EMOFLEET_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'outside-chdb'}", "EMOFLEET_CACHE_REDIS_URL": redis_url}
    stop_process(process.pid)


def _databases(dsn: str) -> set[str]:
    client = connect(ClickHouseSettings(), dsn)
    try:
        return {row[0] for row in client.query("SHOW DATABASES").result_rows}
    finally:
        client.close()


def test_external_backend_runs_the_same_tests_on_the_given_services(outside_services: dict[str, str]) -> None:
    chosen = ["tests/test_producer.py::test_one_calls_clips_keep_their_order",
              "tests/test_processor.py::test_processor_turns_references_into_events",
              "tests/test_sink.py::test_events_land_once_and_queries_route_through_the_owner"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *chosen],
                         cwd=REPO, env=os.environ | outside_services, capture_output=True, text=True, timeout=600)

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "3 passed" in run.stdout
    topics = AdminClient({"bootstrap.servers": outside_services["EMOFLEET_KAFKA_BOOTSTRAP_SERVERS"]}
                         ).list_topics(timeout=10).topics
    assert any(name.startswith("test-one-calls-clips-keep-their-order-") for name in topics), \
        "the tests used the given broker, on topics of their own"
    assert any(db.startswith("t_test_events_land_once") for db in _databases(outside_services["EMOFLEET_CLICKHOUSE_DSN"])), \
        "the sink test wrote into a database of its own on the given ClickHouse"


def test_up_runs_on_the_external_backend(outside_services: dict[str, str], tmp_path: Path, unique: str) -> None:
    env = os.environ | outside_services | {"EMOFLEET_CACHE_KEY_PREFIX": f"test:{unique}",
                                           "EMOFLEET_KAFKA_SESSION_TIMEOUT_MS": "3000"}
    run = subprocess.run([sys.executable, "-m", "emofleet.cli", "up", "--model", "tiny", "--samples", "12",
                          "--processors", "1", "--data-dir", str(tmp_path / "data"), "--timeout", "300"],
                         env=env, capture_output=True, text=True, timeout=400)

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "external backend" in run.stdout and "12/12 references stored" in run.stdout
    assert not (tmp_path / "data" / "stack.json").exists(), "no embedded stack was started"
    client = connect(ClickHouseSettings(), outside_services["EMOFLEET_CLICKHOUSE_DSN"])
    try:
        assert client.query("SELECT uniqExact(audio_id) FROM emofleet.emotion_events "
                            "WHERE segment_index = -1").result_rows == [(12,)]
    finally:
        client.close()


def test_containers_backend_without_docker_says_so_in_one_line(tmp_path: Path) -> None:
    env = os.environ | {"EMOFLEET_BACKEND": "containers", "DOCKER_HOST": f"unix://{tmp_path / 'no-docker.sock'}"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_offsets.py"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    assert run.returncode != 0
    assert "EMOFLEET_BACKEND=containers: no Docker engine reachable" in run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
