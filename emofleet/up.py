"""`emofleet up`: the whole pipeline on the embedded stack, as supervised child processes."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from emofleet.streams.config import Settings, to_env


@dataclass
class Supervisor:
    """Keeps N copies of a command running; restarts any that exit until stopped."""

    command: list[str]
    count: int
    env: dict[str, str]
    log_dir: Path
    children: list[subprocess.Popen] = field(default_factory=list)
    restarts: int = 0

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children = [self._spawn(i) for i in range(self.count)]

    def _spawn(self, index: int) -> subprocess.Popen:
        log = open(self.log_dir / f"processor-{index}.log", "ab")  # noqa: SIM115 - lives as long as the child
        return subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)

    def check(self) -> None:
        for index, child in enumerate(self.children):
            if child.poll() is not None:
                self.restarts += 1
                self.children[index] = self._spawn(index)

    def stop(self, timeout: float = 30.0) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def child_env(settings: Settings) -> dict[str, str]:
    """The parent's environment plus the complete settings, so children run exactly this config."""
    return dict(os.environ) | to_env(settings)


def processor_command() -> list[str]:
    return [sys.executable, "-m", "emofleet.cli", "process"]


@dataclass
class Tally:
    """Where each enqueued reference ended up, counted once per source message."""

    wanted: set[tuple[int, int]]
    settled: set[tuple[int, int]] = field(default_factory=set)
    labels: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    cache_hits: int = 0

    def add_event(self, event: dict) -> None:
        key = (event["source_partition"], event["source_offset"])
        if event["segment_index"] == -1 and key in self.wanted and key not in self.settled:
            self.settled.add(key)
            self.labels[event["label"]] += 1
            self.cache_hits += event["cache_hit"]

    def add_dead_letter(self, record: dict) -> None:
        key = (record["source_partition"], record["source_offset"])
        if key in self.wanted and key not in self.settled:
            self.settled.add(key)
            self.reasons[record["reason"]] += 1


def watch_outcomes(settings: Settings, wanted: set[tuple[int, int]], supervisor: Supervisor, *,
                   timeout: float, progress: object) -> Tally:
    """Count results and dead letters for the ``wanted`` (partition, offset) references until all settled."""
    from confluent_kafka import Consumer, TopicPartition

    from emofleet.schemas.codec import make_codec

    codec = make_codec(settings.kafka.schema_registry_url)
    consumer = Consumer(settings.kafka.client_config() | {"group.id": f"emofleet-up-{os.getpid()}",
                                                          "enable.auto.commit": False})
    metadata = consumer.list_topics(timeout=10)
    topics = (settings.kafka.results_topic, settings.kafka.dead_letter_topic)
    consumer.assign([TopicPartition(t, p, 0) for t in topics for p in metadata.topics[t].partitions])
    tally = Tally(wanted)
    deadline = time.monotonic() + timeout
    try:
        while len(tally.settled) < len(wanted) and time.monotonic() < deadline:
            before = len(tally.settled)
            for message in consumer.consume(500, timeout=0.5):
                if message.error():
                    continue
                if message.topic() == settings.kafka.results_topic:
                    tally.add_event(codec.decode("emotion_event", message.value(), topic=message.topic()))
                else:
                    tally.add_dead_letter(codec.decode("dead_letter", message.value(), topic=message.topic()))
            progress.update(len(tally.settled) - before)  # type: ignore[attr-defined]
            supervisor.check()
    finally:
        consumer.close()
    return tally


def print_summary(tally: Tally, expected: int, seconds: float) -> None:
    processed = sum(tally.labels.values())
    print(f"\n{len(tally.settled)}/{expected} references settled in {seconds:.1f}s: "
          f"{processed} analysed ({tally.cache_hits} from cache), {sum(tally.reasons.values())} dead-lettered")
    for label, count in tally.labels.most_common():
        print(f"  {label:<10} {count:>6}  {100 * count / max(processed, 1):5.1f}%")
    for reason, count in tally.reasons.most_common():
        print(f"  dead letter: {reason:<22} {count:>6}")
