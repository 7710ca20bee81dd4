"""Shared pieces of pipeline tests: clips on disk, references on the audio topic, reading outcomes, a sink
to break."""

from __future__ import annotations

import threading
from typing import Any
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from confluent_kafka.admin import AdminClient

from emofleet.processors.service import Processor, build_processor
from emofleet.samples import write_samples
from emofleet.schemas.codec import make_codec
from emofleet.sinks.service import ClickHouseSink
from emofleet.core.config import Settings
from emofleet.streams.producer import AudioReferenceProducer
from emofleet.streams.references import make_reference
from emofleet.streams.topics import ensure_topics, pipeline_topics

from kafka_helpers import TopicReader


def create_topics(settings: Settings) -> None:
    ensure_topics(AdminClient(settings.kafka.client_config()), pipeline_topics(settings.kafka))


def enqueue_uris(settings: Settings, uris: list[str], **fields: str) -> list[dict]:
    references = [make_reference({"uri": uri, **fields}) for uri in uris]
    with AudioReferenceProducer(settings.kafka, make_codec()) as producer:
        for reference in references:
            producer.send(reference)
    assert producer.report.failed == []
    return references


def sample_uris(directory: Path, count: int, **kwargs: float) -> list[str]:
    return [p.resolve().as_uri() for p in write_samples(directory, count, **kwargs)]


@contextmanager
def running_processor(settings: Settings, **kwargs) -> Iterator[Processor]:
    processor = build_processor(settings, **kwargs)
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    try:
        yield processor
    finally:
        processor.stop()
        thread.join(30)
        assert not thread.is_alive()


def outcomes(settings: Settings, expected: int, timeout: float = 60.0) -> tuple[list[dict], list[dict]]:
    """(whole-clip events, dead letters) once ``expected`` distinct source messages are accounted for."""
    codec = make_codec()
    results = TopicReader(settings.kafka.bootstrap_servers, settings.kafka.results_topic)
    dead_letters = TopicReader(settings.kafka.bootstrap_servers, settings.kafka.dead_letter_topic)
    deadline = time.monotonic() + timeout
    try:
        while True:
            events = [codec.decode("emotion_event", m.value(), topic=m.topic()) for m in results.poll()]
            dead = [codec.decode("dead_letter", m.value(), topic=m.topic()) for m in dead_letters.poll()]
            whole = [e for e in events if e["segment_index"] == -1]
            settled = {(e["source_partition"], e["source_offset"]) for e in whole}
            settled |= {(d["source_partition"], d["source_offset"]) for d in dead}
            if len(settled) >= expected or time.monotonic() > deadline:
                return whole, dead
    finally:
        results.close()
        dead_letters.close()


class FlakyClient:
    """The real client, with inserts failing while ``failing`` is set (ClickHouse unreachable)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.failing = threading.Event()
        self.failed = 0

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        if self.failing.is_set():
            self.failed += 1
            raise ConnectionError("injected: ClickHouse unreachable")
        return self._client.insert(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class SinkWithCommitHook(ClickHouseSink):
    """The sink, calling ``before_commit`` once stored rows are about to be committed: where a test makes it die
    between insert and commit. It wraps the loop's one commit path (tests only)."""

    def __init__(self, *args: Any, before_commit: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        loop = self.loop
        commit, tracker = loop._commit, loop._tracker

        def commit_after_hook(*, asynchronous: bool, partitions: list[tuple[str, int]] | None = None) -> None:
            if tracker.to_commit(partitions):
                before_commit()
            commit(asynchronous=asynchronous, partitions=partitions)

        loop._commit = commit_after_hook  # type: ignore[method-assign]


class Crash(BaseException):
    """The sink process dying between insert and commit (raised by :func:`crash_once`)."""


def crash_once() -> Callable[[], None]:
    """A ``before_commit`` hook that raises :class:`Crash` the first time only."""
    crashes = iter([True])

    def hook() -> None:
        if next(crashes, False):
            raise Crash("killed between insert and commit")

    return hook
