"""Where Kafka, Redis and ClickHouse come from: one switch, ``EMOFLEET_BACKEND``, for tests and `emofleet up`.

- ``embedded`` (default): the local stack (Tansu broker, local Redis, chDB under the data directory).
- ``external``: your own services, named by the usual settings variables
  (``EMOFLEET_KAFKA_BOOTSTRAP_SERVERS``, ``EMOFLEET_KAFKA_SCHEMA_REGISTRY_URL``,
  ``EMOFLEET_CLICKHOUSE_DSN``, ``EMOFLEET_CACHE_REDIS_URL``).
- ``containers``: Apache Kafka (KRaft), ClickHouse server and Redis started with testcontainers;
  needs a reachable Docker engine and ``pip install -e ".[containers]"``.
"""

from __future__ import annotations

from emofleet.core.errors import UserFacingError

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

BACKENDS = ("embedded", "external", "containers")
KAFKA_IMAGE = "apache/kafka:4.0.0"
CLICKHOUSE_IMAGE = "clickhouse/clickhouse-server:25.8"
REDIS_IMAGE = "redis:7.4-alpine"


class BackendError(UserFacingError, RuntimeError):
    """The chosen backend cannot be used; the message says why and what to set."""

    hint = "EMOFLEET_BACKEND=embedded needs nothing but this machine"


@dataclass(frozen=True)
class Endpoints:
    bootstrap_servers: str
    redis_url: str
    clickhouse_dsn: str  # "" = chDB under the data directory
    schema_registry_url: str = ""
    clickhouse_username: str = "default"
    clickhouse_password: str = ""


def backend_name(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    name = env.get("EMOFLEET_BACKEND", "embedded").strip().lower() or "embedded"
    if name not in BACKENDS:
        raise BackendError(f"EMOFLEET_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def external_endpoints(env: Mapping[str, str] | None = None) -> Endpoints:
    env = os.environ if env is None else env
    missing = [n for n in ("EMOFLEET_KAFKA_BOOTSTRAP_SERVERS", "EMOFLEET_CLICKHOUSE_DSN") if not env.get(n)]
    if missing:
        raise BackendError(f"EMOFLEET_BACKEND=external needs {' and '.join(missing)} (see README, "
                           "'Running against your own Kafka and ClickHouse')")
    return Endpoints(env["EMOFLEET_KAFKA_BOOTSTRAP_SERVERS"],
                     env.get("EMOFLEET_CACHE_REDIS_URL", "redis://127.0.0.1:6379/0"),
                     env["EMOFLEET_CLICKHOUSE_DSN"], env.get("EMOFLEET_KAFKA_SCHEMA_REGISTRY_URL", ""),
                     env.get("EMOFLEET_CLICKHOUSE_USERNAME", "default"), env.get("EMOFLEET_CLICKHOUSE_PASSWORD", ""))


def docker_unreachable(env: Mapping[str, str] | None = None) -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    env = os.environ if env is None else env
    host = env.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    parsed = urlparse(host)
    try:
        if parsed.scheme == "unix":
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(parsed.path)
        else:
            socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 2375), timeout=2).close()
    except OSError as error:
        return f"no Docker engine reachable at {host} ({error.strerror or error})"
    return None


@contextlib.contextmanager
def containers() -> Iterator[Endpoints]:
    """Start Kafka, ClickHouse and Redis containers for the duration of the block."""
    if reason := docker_unreachable():
        raise BackendError(f"EMOFLEET_BACKEND=containers: {reason}; use embedded or external")
    try:
        from testcontainers.clickhouse import ClickHouseContainer
        from testcontainers.kafka import KafkaContainer
        from testcontainers.redis import RedisContainer
    except ImportError:
        raise BackendError('EMOFLEET_BACKEND=containers needs testcontainers: pip install -e ".[containers]"') from None
    with KafkaContainer(KAFKA_IMAGE).with_kraft() as kafka, \
            ClickHouseContainer(CLICKHOUSE_IMAGE) as clickhouse, RedisContainer(REDIS_IMAGE) as redis:
        host = clickhouse.get_container_host_ip()
        yield Endpoints(
            kafka.get_bootstrap_server(),
            f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0",
            f"http://{host}:{clickhouse.get_exposed_port(8123)}",
            clickhouse_username=clickhouse.username, clickhouse_password=clickhouse.password,
        )
