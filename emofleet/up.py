"""`emofleet up`: the whole pipeline on one machine, as supervised child processes, and how a run knows
when everything it sent has landed.

A run waits by *identity*, never by offsets (a restarted broker or a recreated topic reuses them):

1. Before producing, a :class:`ResultsTap` is positioned at the current end of the results and
   dead-letter topics (no consumer group, nothing committed).
2. Each reference of the run is known by ``(audio_id, produced_at)``, set before it is sent. Whole-clip
   events carry both (``audio_id``, ``reference_produced_at``); dead letters carry the original
   reference bytes. So the tap learns, per reference, the ``event_id`` or ``dead_letter_id`` it ended in.
3. Those ids are then looked up in ClickHouse. A clip whose result was stored by an earlier run (same
   audio, same model: same ``event_id``, which the sink rightly stores once) counts as stored and is
   reported as such.

:class:`RunTracker` holds that bookkeeping as pure state; :func:`follow_run` drives tap, lookups and the
supervisor until every reference is stored, nothing progresses for ``stall_seconds``, or a child
crash-loops (:class:`CrashLoopError`, with the tail of its log).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emofleet.sinks.query_server import QueryError, QueryRunner
from emofleet.core.config import Settings, to_env

RunKey = tuple[str, int]  # (audio_id, produced_at ms): one reference of this run
LOG_TAIL_LINES = 12
LOG_LINE_CHARS = 300  # a startup line carries all settings: the tail shows its start


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a child's log, each cut at ``LOG_LINE_CHARS`` ('' when there is none)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(line if len(line) <= LOG_LINE_CHARS else line[:LOG_LINE_CHARS] + " ..."
                     for line in text.splitlines()[-lines:])


class CrashLoopError(RuntimeError):
    """A child exited again and again soon after starting; ``tail`` is the end of its log."""

    def __init__(self, name: str, code: int, exits: int, log: Path) -> None:
        super().__init__(f"{name} exited {exits} times in a row within seconds of starting (last exit code {code})")
        self.log = log
        self.tail = log_tail(log)


@dataclass
class Supervisor:
    """Keeps named child processes running. A child that exits is restarted after a backoff (1 s, 2 s,
    4 s, ... 30 s) and the restart is announced through ``notify``; ``crash_loop_exits`` exits in a row,
    each within ``quick_exit_seconds`` of its start, raise :class:`CrashLoopError` from :meth:`check`."""

    commands: dict[str, list[str]]
    env: dict[str, str]
    log_dir: Path
    notify: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))
    crash_loop_exits: int = 5
    quick_exit_seconds: float = 30.0
    max_backoff_seconds: float = 30.0
    children: dict[str, subprocess.Popen] = field(default_factory=dict)
    restarts: int = 0
    _started_at: dict[str, float] = field(default_factory=dict)
    _quick_exits: Counter[str] = field(default_factory=Counter)
    _restart_at: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in self.commands:
            self._spawn(name)

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _spawn(self, name: str) -> None:
        with self.log_path(name).open("ab") as log:  # the child keeps its own copy of the descriptor
            self.children[name] = subprocess.Popen(self.commands[name], env=self.env, stdout=log,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._started_at[name] = time.monotonic()

    def check(self) -> None:
        """Restart children whose backoff is over; schedule restarts for children that exited."""
        now = time.monotonic()
        for name, child in list(self.children.items()):
            if name in self._restart_at:
                if now >= self._restart_at[name]:
                    del self._restart_at[name]
                    self.restarts += 1
                    self._spawn(name)
            elif (code := child.poll()) is not None:
                self._exited(name, code, now)

    def _exited(self, name: str, code: int, now: float) -> None:
        quick = now - self._started_at[name] < self.quick_exit_seconds
        self._quick_exits[name] = self._quick_exits[name] + 1 if quick else 1
        exits = self._quick_exits[name]
        if exits >= self.crash_loop_exits:
            raise CrashLoopError(name, code, exits, self.log_path(name))
        delay = min(2.0 ** (exits - 1), self.max_backoff_seconds)
        self._restart_at[name] = now + delay
        self.notify(f"{name} exited with code {code}; restarting in {delay:.0f}s (log: {self.log_path(name)})")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM all (processors finish their batch, the sink flushes), then wait; kill stragglers."""
        self._restart_at.clear()
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


def pipeline_commands(processors: int, metrics_port: int = 0, *, gateway: bool = False) -> dict[str, list[str]]:
    """Child command lines; with ``metrics_port`` each child gets its own port: processors ``metrics_port + i``,
    the sink ``metrics_port + processors``, the aggregator the next one (0: no metrics endpoints). The gateway
    (``emofleet serve``) serves its metrics on its own HTTP port."""
    cli = [sys.executable, "-m", "emofleet.cli"]

    def port(index: int) -> list[str]:
        return ["--metrics-port", str(metrics_port + index)] if metrics_port else []

    return ({f"processor-{i}": [*cli, "process", *port(i)] for i in range(processors)}
            | {"sink": [*cli, "sink", *port(processors)]}
            | {"aggregator": [*cli, "aggregate", *port(processors + 1)]}
            | ({"gateway": [*cli, "serve"]} if gateway else {}))


GATEWAY_KEY_FILE = "gateway-api-keys"  # under the data directory; `up` creates it on its first run
GATEWAY_TENANT = "demo"


def with_gateway(settings: Settings) -> tuple[Settings, Path | None]:
    """`up`'s gateway settings: an API key file of its own (created once, mode 0600) unless keys are configured,
    the uploads directory among the processors' file roots, and a free port when the configured one is taken.
    Returns the settings and the key file it uses (None: keys configured by the user)."""
    from dataclasses import replace

    from emofleet.gateway.auth import ensure_key_file
    from emofleet.gateway.uploads import upload_directory
    from emofleet.infra.local_stack import free_port, port_open

    gateway, audio, key_file = settings.gateway, settings.audio, None
    if not str(gateway.api_keys) and not gateway.api_keys_file:
        key_file = (settings.data_dir / GATEWAY_KEY_FILE).resolve()
        ensure_key_file(key_file, GATEWAY_TENANT)
        gateway = replace(gateway, api_keys_file=str(key_file))
    if port_open(gateway.host, gateway.port):
        gateway = replace(gateway, port=free_port(gateway.host))
    if not gateway.uploads.startswith("s3://"):
        audio = replace(audio, file_roots=(*audio.file_roots, upload_directory(settings)))
    return replace(settings, gateway=gateway, audio=audio), key_file


def gateway_url(settings: Settings) -> str:
    host = settings.gateway.host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{settings.gateway.port}"


# ------------------------------------------------------------------------------------ the run's bookkeeping


def run_key(reference: Mapping[str, Any]) -> RunKey:
    return str(reference["audio_id"]), int(reference["produced_at"])


@dataclass
class RunTracker:
    """Which of this run's references ended where, and which of those outcomes ClickHouse holds."""

    expected: set[RunKey]
    started_ms: int  # rows first inserted before this are "already stored by an earlier run"
    events: dict[RunKey, str] = field(default_factory=dict)  # reference -> whole-clip event_id
    dead_letters: dict[RunKey, tuple[str, str]] = field(default_factory=dict)  # -> (dead_letter_id, reason)
    stored: set[RunKey] = field(default_factory=set)
    earlier: set[RunKey] = field(default_factory=set)

    def observe_event(self, event: Mapping[str, Any]) -> bool:
        """Record a whole-clip event of one of this run's references; True when it was news."""
        key = (str(event["audio_id"]), int(event["reference_produced_at"]))
        if event["segment_index"] != -1 or key not in self.expected or key in self.events:
            return False
        self.events[key] = str(event["event_id"])
        return True

    def observe_dead_letter(self, record: Mapping[str, Any], reference: Mapping[str, Any]) -> bool:
        """Record a dead letter whose original bytes decoded to ``reference``; True when it was news."""
        key = run_key(reference)
        if key not in self.expected or key in self.dead_letters:
            return False
        self.dead_letters[key] = (str(record["dead_letter_id"]), str(record["reason"]))
        return True

    def unconfirmed(self) -> tuple[dict[str, RunKey], dict[str, RunKey]]:
        """Event ids and dead-letter ids seen on the topics but not yet found in ClickHouse."""
        events = {event_id: key for key, event_id in self.events.items() if key not in self.stored}
        dead = {ident: key for key, (ident, _) in self.dead_letters.items() if key not in self.stored}
        return events, dead

    def confirm(self, key: RunKey, first_inserted_ms: int) -> None:
        self.stored.add(key)
        if first_inserted_ms < self.started_ms:
            self.earlier.add(key)

    @property
    def seen(self) -> int:
        return len(self.events.keys() | self.dead_letters.keys())

    @property
    def done(self) -> bool:
        return len(self.stored) >= len(self.expected)

    def summary(self) -> str:
        """One line: the stored count first, then how it splits."""
        dead = Counter(reason for key, (_, reason) in self.dead_letters.items() if key in self.stored)
        new_results = len(self.stored) - len(self.earlier) - sum(dead.values())
        parts = [f"{new_results} new results", f"{len(self.earlier)} already stored by an earlier run"]
        parts.append(f"{sum(dead.values())} dead letters" + (
            f" ({', '.join(f'{reason}: {n}' for reason, n in dead.most_common())})" if dead else ""))
        if missing := len(self.expected) - len(self.stored):
            parts.append(f"{missing} not stored ({len(self.expected) - self.seen} without any result)")
        return f"{len(self.stored)}/{len(self.expected)} references stored in ClickHouse: " + ", ".join(parts)


# ------------------------------------------------------------------------------------ I/O: topics and ClickHouse


class ResultsTap:
    """Reads the results and dead-letter topics from their current end, outside any consumer group."""

    def __init__(self, settings: Settings, codec: Any) -> None:
        from confluent_kafka import Consumer, TopicPartition

        from emofleet.core.logs import kafka_logger

        kafka = settings.kafka
        self._codec = codec
        self._audio_topic = kafka.audio_topic
        self._results_topic, self._dead_letter_topic = kafka.results_topic, kafka.dead_letter_topic
        self._consumer = Consumer(kafka.client_config() | {
            "group.id": f"emofleet-up-{uuid.uuid4().hex}",  # required by librdkafka; never joined or committed
            "enable.auto.commit": False, "fetch.wait.max.ms": 100, "logger": kafka_logger()})
        metadata = self._consumer.list_topics(timeout=10)
        positions = []
        for topic in (self._results_topic, self._dead_letter_topic):
            for partition in metadata.topics[topic].partitions:
                _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                positions.append(TopicPartition(topic, partition, max(high, 0)))
        self._consumer.assign(positions)

    def read(self, tracker: RunTracker, timeout: float) -> int:
        """Feed what arrived to ``tracker``; returns how many references got an outcome."""
        from emofleet.schemas.codec import SchemaError

        news = 0
        for message in self._consumer.consume(num_messages=1000, timeout=timeout):
            if message.error() is not None:
                continue
            try:
                if message.topic() == self._results_topic:
                    record = self._codec.decode("emotion_event", message.value() or b"", topic=message.topic())
                    news += tracker.observe_event(record)
                    continue
                record = self._codec.decode("dead_letter", message.value() or b"", topic=message.topic())
                if record["source_topic"] != self._audio_topic:
                    continue
                reference = self._codec.decode("audio_reference", record["payload"], topic=self._audio_topic)
            except SchemaError:
                continue  # not one of ours: this run only produced well-formed references
            news += tracker.observe_dead_letter(record, reference)
        return news

    def close(self) -> None:
        self._consumer.close()


def first_inserted(run: QueryRunner, database: str, table: str, id_column: str, ids: Iterable[str],
                   chunk: int = 5_000) -> dict[str, int]:
    """``{id: epoch ms of its first row}`` for the ids that ``table`` holds."""
    ids = list(ids)
    found: dict[str, int] = {}
    for start in range(0, len(ids), chunk):
        rows = run(f"SELECT {id_column} AS id, toUnixTimestamp64Milli(min(inserted_at)) AS first_ms "
                   f"FROM {database}.{table} WHERE {id_column} IN {{ids:Array(String)}} GROUP BY {id_column}",
                   {"ids": ids[start:start + chunk]})
        found |= {str(row["id"]): int(row["first_ms"]) for row in rows}
    return found


def confirm_stored(run: QueryRunner, database: str, tracker: RunTracker) -> None:
    """Look up the outcomes seen on the topics in ClickHouse and mark the ones stored."""
    events, dead = tracker.unconfirmed()
    for table, column, pending in (("emotion_events", "event_id", events), ("dead_letters", "dead_letter_id", dead)):
        if pending:
            for ident, first_ms in first_inserted(run, database, table, column, pending).items():
                tracker.confirm(pending[ident], first_ms)


class StalledError(RuntimeError):
    """Nothing progressed for the stall bound; ``log`` names the child most likely at fault."""

    def __init__(self, message: str, log: Path) -> None:
        super().__init__(message)
        self.log = log
        self.tail = log_tail(log)


def follow_run(tracker: RunTracker, tap: ResultsTap, runner: Callable[[], QueryRunner | None], database: str,
               supervisor: Supervisor, *, timeout: float, stall_seconds: float,
               progress: Callable[[int], None]) -> None:
    """Until every reference of the run is stored, ``timeout`` passes, or nothing moved for ``stall_seconds``
    (:class:`StalledError`); a crash-looping child raises :class:`CrashLoopError`."""
    deadline = time.monotonic() + timeout
    last_move = time.monotonic()
    shown = 0
    while not tracker.done and time.monotonic() < deadline:
        supervisor.check()
        moved = tap.read(tracker, timeout=0.2) > 0
        if (run := runner()) is not None:
            try:
                confirm_stored(run, database, tracker)
            except QueryError:
                pass  # the sink is still migrating or restarting: ask again next turn
        if len(tracker.stored) > shown:
            progress(len(tracker.stored) - shown)
            shown, moved = len(tracker.stored), True
        if moved:
            last_move = time.monotonic()
        elif time.monotonic() - last_move > stall_seconds:
            waiting_for = "sink" if tracker.seen > len(tracker.stored) else "processor-0"
            raise StalledError(f"nothing progressed for {stall_seconds:.0f}s: {tracker.seen}/{len(tracker.expected)} "
                               f"references have a result, {len(tracker.stored)} are stored; waiting on "
                               f"the {waiting_for.split('-')[0]}", supervisor.log_path(waiting_for))
