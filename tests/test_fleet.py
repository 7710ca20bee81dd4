"""Several processor processes in one group: rebalances and crashes lose nothing, commits never run ahead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from emofleet.processors.tiny_model import build_tiny_model
from emofleet.schemas.codec import make_codec
from emofleet.core.config import Settings, to_env

from kafka_helpers import TopicReader
from pipeline_helpers import create_topics, enqueue_uris, sample_uris

pytestmark = pytest.mark.slow


class Fleet:
    """Processor processes plus a view of their outputs and of the group's committed offsets."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.members: list[subprocess.Popen] = []
        self.codec = make_codec()
        self.results = TopicReader(settings.kafka.bootstrap_servers, settings.kafka.results_topic)
        self.dead = TopicReader(settings.kafka.bootstrap_servers, settings.kafka.dead_letter_topic)
        self.events: dict[tuple[int, int], list[dict]] = {}
        self.dead_letters: dict[tuple[int, int], dict] = {}
        self._committed_reader = Consumer(settings.kafka.client_config() | {"group.id": settings.kafka.processor_group})

    def log_of(self, member: subprocess.Popen) -> Path:
        return self.logs / f"member-{self.members.index(member)}.log"

    def wait_assigned(self, member: subprocess.Popen, timeout: float = 60) -> None:
        """Wait until the member logs a non-empty assignment (it has joined the group)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "assigned ['" in self.log_of(member).read_text():
                return
            time.sleep(0.1)  # polling the member's log for an event, bounded by the deadline
        raise AssertionError(f"member never got partitions; log:\n{self.log_of(member).read_text()[-2000:]}")

    def start(self) -> subprocess.Popen:
        log = open(self.logs / f"member-{len(self.members)}.log", "wb")  # noqa: SIM115
        member = subprocess.Popen([sys.executable, "-m", "emofleet.cli", "process", "--log-level", "info"],
                                  env=os.environ | to_env(self.settings), stdout=log, stderr=subprocess.STDOUT)
        self.members.append(member)
        return member

    def refresh(self) -> int:
        """Read new outputs; returns how many source messages are settled."""
        for message in self.results.poll()[sum(map(len, self.events.values())):]:
            event = self.codec.decode("emotion_event", message.value(), topic=message.topic())
            if event["segment_index"] == -1:
                self.events.setdefault((event["source_partition"], event["source_offset"]), []).append(event)
        for message in self.dead.poll()[len(self.dead_letters):]:
            record = self.codec.decode("dead_letter", message.value(), topic=message.topic())
            self.dead_letters[(record["source_partition"], record["source_offset"])] = record
        return len(self.events.keys() | self.dead_letters.keys())

    def committed(self) -> dict[int, int]:
        partitions = [TopicPartition(self.settings.kafka.audio_topic, p) for p in range(self.settings.kafka.partitions)]
        return {tp.partition: tp.offset for tp in self._committed_reader.committed(partitions, timeout=10)
                if tp.offset >= 0}

    def assert_commits_never_run_ahead(self) -> None:
        """Results are delivered before their offset is committed, so reading after sampling the commit
        points must find an outcome for every offset below them."""
        committed = self.committed()
        self.refresh()
        settled = self.events.keys() | self.dead_letters.keys()
        for partition, commit_point in committed.items():
            missing = [o for o in range(commit_point) if (partition, o) not in settled]
            assert not missing, f"partition {partition} committed {commit_point} but offsets {missing[:5]} have no outcome"

    def wait_settled(self, count: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (settled := self.refresh()) < count and time.monotonic() < deadline:
            time.sleep(0.2)  # polling cadence for a progress check, not synchronization
        return settled

    def stop(self) -> None:
        for member in self.members:
            if member.poll() is None:
                member.send_signal(signal.SIGTERM)
        for member in self.members:
            try:
                member.wait(30)
            except subprocess.TimeoutExpired:
                member.kill()
        self.results.close()
        self.dead.close()
        self._committed_reader.close()


@pytest.fixture
def fleet_settings(settings: Settings, tmp_path: Path) -> Settings:
    settings = replace(settings, kafka=replace(settings.kafka, partitions=6),
                       cache=replace(settings.cache, enabled=False))
    build_tiny_model(settings.data_dir / "models" / "tiny-emotion2vec")  # once, before members race to it
    create_topics(settings)
    return settings


def _enqueue(settings: Settings, tmp_path: Path, count: int) -> int:
    uris = sample_uris(tmp_path / "clips", 100, min_seconds=0.3, max_seconds=1.2)
    return len(enqueue_uris(settings, [uris[i % len(uris)] for i in range(count)]))


def test_members_join_and_leave_and_nothing_is_lost(fleet_settings: Settings, tmp_path: Path) -> None:
    fleet = Fleet(fleet_settings, tmp_path)
    try:
        first, second = fleet.start(), fleet.start()
        total = _enqueue(fleet_settings, tmp_path, 2000)
        assert fleet.wait_settled(400, 120) >= 400
        third = fleet.start()
        fleet.wait_assigned(third)
        fleet.assert_commits_never_run_ahead()
        assert fleet.wait_settled(1000, 120) >= 1000
        third.send_signal(signal.SIGTERM)
        assert third.wait(60) == 0, "a leaving member finishes its batch, commits and exits 0"
        fleet.assert_commits_never_run_ahead()
        settled = fleet.wait_settled(total, 180)
        fleet.assert_commits_never_run_ahead()
    finally:
        fleet.stop()

    assert settled == total, f"{total - settled} references were lost"
    assert fleet.dead_letters == {}
    assert all(m.returncode == 0 for m in (first, second))
    duplicated = {k: v for k, v in fleet.events.items() if len(v) > 1}
    assert all(len({e["event_id"] for e in v}) == 1 for v in duplicated.values())


def test_a_killed_member_is_replaced_by_the_others(fleet_settings: Settings, tmp_path: Path) -> None:
    fleet = Fleet(fleet_settings, tmp_path)
    try:
        fleet.start(), fleet.start()
        victim = fleet.start()
        fleet.wait_assigned(victim)
        total = _enqueue(fleet_settings, tmp_path, 1200)
        assert fleet.wait_settled(300, 120) >= 300
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        fleet.assert_commits_never_run_ahead()
        settled = fleet.wait_settled(total, 180)
        fleet.assert_commits_never_run_ahead()
    finally:
        fleet.stop()

    assert settled == total, f"{total - settled} references were lost after kill -9"
    duplicated = {k: v for k, v in fleet.events.items() if len(v) > 1}
    assert all(len({e["event_id"] for e in v}) == 1 for v in duplicated.values()), \
        "reprocessed messages carry identical event ids"
