"""Shared pieces of the benchmarks: an embedded Tansu broker, Redis checks, unique settings, tables.

Not a benchmark itself; ``bench/<name>.py`` scripts import it (their directory is on sys.path).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path

from confluent_kafka.admin import AdminClient

from emofleet.infra.local_stack import redis_answers, start_broker, stop_process
from emofleet.core.config import AudioSettings, BatchSettings, CacheSettings, KafkaSettings, Settings
from emofleet.streams.topics import TopicSpec, ensure_topics, pipeline_topics

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def embedded_broker(workdir: Path) -> Iterator[str]:
    """A Tansu broker (memory storage) on a free loopback port for the duration of the block."""
    process, bootstrap = start_broker(workdir / "broker.log")
    log(f"Tansu broker up at {bootstrap} (pid {process.pid})")
    try:
        yield bootstrap
    finally:
        stop_process(process.pid)


@contextmanager
def workspace(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        yield Path(directory)


def require_redis(url: str) -> str:
    if not redis_answers(url):
        raise SystemExit(f"Redis does not answer at {url}: start it or pass --redis-url")
    return url


def delete_redis_prefix(url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def unique(name: str) -> str:
    return f"bench-{name}-{uuid.uuid4().hex[:8]}"


def bench_settings(bootstrap: str, redis_url: str, name: str, data_dir: Path, *,
                   file_roots: Sequence[Path] = (), key_prefix: str | None = None,
                   partitions: int = 4, batch: BatchSettings | None = None) -> Settings:
    """Like tests/conftest.py's ``settings`` fixture: unique topics, groups and key prefix, fast joins."""
    run = unique(name)
    base = Settings()
    topics = {"audio_topic": f"{run}.audio", "results_topic": f"{run}.emotions",
              "dead_letter_topic": f"{run}.dead-letters", "alerts_topic": f"{run}.alerts",
              "aggregates_topic": f"{run}.aggregates"}
    known = {f.name for f in fields(KafkaSettings)}  # the topic set grows with the project
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        **{name: topic for name, topic in topics.items() if name in known},
        partitions=partitions,
        processor_group=f"{run}.processors",
        sink_group=f"{run}.sink",
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
    )
    return replace(
        base,
        data_dir=data_dir,
        kafka=kafka,
        audio=replace(AudioSettings(), file_roots=tuple(file_roots)),
        cache=replace(CacheSettings(), redis_url=redis_url, key_prefix=key_prefix or f"bench:{run}"),
        batch=batch or BatchSettings(max_wait_ms=50, commit_interval_seconds=0.2),
    )


def create_pipeline_topics(settings: Settings) -> None:
    ensure_topics(AdminClient(settings.kafka.client_config()), pipeline_topics(settings.kafka))


def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), [TopicSpec(name, partitions, 1)])


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            if value != value:  # NaN
                return "-"
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    import platform

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load average at the end {load}"
