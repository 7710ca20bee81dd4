"""`emofleet up`: the whole pipeline on the embedded stack, as supervised child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from emofleet.sinks.query_server import QueryRunner
from emofleet.streams.config import Settings, to_env


@dataclass
class Supervisor:
    """Keeps named child processes running; restarts any that exit until stopped."""

    commands: dict[str, list[str]]
    env: dict[str, str]
    log_dir: Path
    children: dict[str, subprocess.Popen] = field(default_factory=dict)
    restarts: int = 0

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children = {name: self._spawn(name) for name in self.commands}

    def _spawn(self, name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the child
        return subprocess.Popen(self.commands[name], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)

    def check(self) -> None:
        for name, child in self.children.items():
            if child.poll() is not None:
                self.restarts += 1
                self.children[name] = self._spawn(name)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM all (processors finish their batch, the sink flushes), then wait; kill stragglers."""
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def child_env(settings: Settings) -> dict[str, str]:
    """The parent's environment plus the complete settings, so children run exactly this config."""
    return dict(os.environ) | to_env(settings)


def pipeline_commands(processors: int) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "emofleet.cli"]
    return {f"processor-{i}": [*cli, "process"] for i in range(processors)} | {"sink": [*cli, "sink"]}


def offset_ranges(delivered: list[tuple[int, int]]) -> dict[int, tuple[int, int, int]]:
    """Per partition: (lowest offset, highest offset, count) of the references this run enqueued."""
    ranges: dict[int, tuple[int, int, int]] = {}
    for partition, offset in delivered:
        low, high, count = ranges.get(partition, (offset, offset, 0))
        ranges[partition] = (min(low, offset), max(high, offset), count + 1)
    return ranges


def settled_in_clickhouse(run: QueryRunner, settings: Settings, ranges: dict[int, tuple[int, int, int]]) -> int:
    """How many of this run's references have a whole-clip row or a dead-letter row in ClickHouse."""
    if not ranges:
        return 0
    spans = " OR ".join(f"(source_partition = {int(p)} AND source_offset BETWEEN {int(lo)} AND {int(hi)})"
                        for p, (lo, hi, _) in ranges.items())
    database = settings.clickhouse.database
    rows = run(
        f"SELECT source_partition AS partition, uniqExact(source_offset) AS settled FROM ("
        f" SELECT source_partition, source_offset FROM {database}.emotion_events"
        f"  WHERE source_topic = {{topic:String}} AND segment_index = -1 AND ({spans})"
        f" UNION ALL SELECT source_partition, source_offset FROM {database}.dead_letters"
        f"  WHERE source_topic = {{topic:String}} AND ({spans})) GROUP BY source_partition",
        {"topic": settings.kafka.audio_topic})
    return sum(min(int(r["settled"]), ranges[int(r["partition"])][2]) for r in rows)


def wait_until_stored(settings: Settings, delivered: list[tuple[int, int]], supervisor: Supervisor, *,
                      timeout: float, progress: object) -> int:
    """Follow ClickHouse (through the sink's query server) until every reference is stored."""
    from emofleet.sinks.query_server import QueryError, owner_runner

    ranges = offset_ranges(delivered)
    deadline = time.monotonic() + timeout
    settled = 0
    while settled < len(delivered) and time.monotonic() < deadline:
        supervisor.check()
        run = owner_runner(settings.data_dir)
        if run is not None:
            try:
                now = settled_in_clickhouse(run, settings, ranges)
            except QueryError:
                now = settled  # the sink is still migrating or restarting
            progress.update(now - settled)  # type: ignore[attr-defined]
            settled = now
        time.sleep(0.5)  # progress polling cadence
    return settled
