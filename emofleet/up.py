"""`emofleet up`: the whole pipeline on the embedded stack, as supervised child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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


def pipeline_commands(processors: int, metrics_port: int = 0) -> dict[str, list[str]]:
    """Child command lines; with ``metrics_port`` each child gets its own port: processors ``metrics_port + i``,
    the sink ``metrics_port + processors``, the aggregator the next one (0: no metrics endpoints)."""
    cli = [sys.executable, "-m", "emofleet.cli"]

    def port(index: int) -> list[str]:
        return ["--metrics-port", str(metrics_port + index)] if metrics_port else []

    return ({f"processor-{i}": [*cli, "process", *port(i)] for i in range(processors)}
            | {"sink": [*cli, "sink", *port(processors)]}
            | {"aggregator": [*cli, "aggregate", *port(processors + 1)]})


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


def wait_until_stored(settings: Settings, ranges: dict[int, tuple[int, int, int]], supervisor: Supervisor, *,
                      runner: Callable[[], QueryRunner | None], timeout: float, progress: object) -> int:
    """Follow ClickHouse until every reference is stored; ``runner`` gives a way in once there is one
    (the sink's query server for embedded chDB, which only exists once the sink has started)."""
    from emofleet.sinks.query_server import QueryError

    expected = sum(count for *_, count in ranges.values())
    deadline = time.monotonic() + timeout
    settled = 0
    while settled < expected and time.monotonic() < deadline:
        supervisor.check()
        run = runner()
        if run is not None:
            try:
                now = settled_in_clickhouse(run, settings, ranges)
            except QueryError:
                now = settled  # the sink is still migrating or restarting
            progress.update(now - settled)  # type: ignore[attr-defined]
            settled = now
        time.sleep(0.5)  # progress polling cadence
    return settled
