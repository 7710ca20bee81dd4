"""Fault injection: one pipeline, ~7,000 references, and a fault per phase; nothing lost, nothing doubled.

The campaign (tests/fault_harness.py) runs the real pieces: Tansu on S3 storage (moto), a dedicated
Redis, processor subprocesses plus in-process members, and the ClickHouse sink on chDB. Each test is a
phase: it feeds references at a steady rate, injects its fault while they flow, waits (bounded) until
every reference of the phase has an outcome, then checks, reading ClickHouse WITHOUT ``FINAL``:

* every reference is accounted for exactly once: one whole-clip row or one dead letter, never both;
* distinct whole-clip event_ids = references - dead-lettered; ``count() == uniqExact(event_id)``;
* every dead letter has a reason, and the right one for the input;
* the whole tables have no duplicate rows either.

Each phase adds a row (fault, what happened, lost, duplicated, recovery time) to ``faults.json``
(in the module's tmp dir, or ``$EMOFLEET_FAULTS_REPORT``); ``bench/reliability_table.py`` turns it into
the table in RELIABILITY.md. Recovery time = seconds from the end of a fault until every reference
sent before that moment was stored in ClickHouse (the worst over a phase's repeated faults).
"""

from __future__ import annotations

import logging
import os
import platform
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from emofleet.sinks.clickhouse import connect
from emofleet.sinks.query_server import direct_runner
from emofleet.sinks.schema import migrate
from emofleet.streams.config import Settings

from fault_harness import (
    ClipPool, DurableBroker, FailingInserts, Feeder, HttpFixture, Message, SinkRunner, SubprocessMember,
    ThreadMember, account, campaign_settings, dedicated_redis, good_messages, poison_files, poison_messages,
    prepare_model, recovery_seconds, settled_count, write_report,
)
from pipeline_helpers import create_topics

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.backend("embedded", reason="starts its own broker")]

RATE = 60.0  # references per second offered during a phase
SETTLE_SECONDS = 150.0  # bound on waiting for a phase's last outcome


class Campaign:
    def __init__(self, workdir: Path, redis_url: str, redis_pid: int) -> None:
        import torch

        self._torch_threads = torch.get_num_threads()
        self.workdir = workdir
        self.name = f"faults-{uuid.uuid4().hex[:6]}"
        self.redis_pid = redis_pid
        self.rng = random.Random(8)
        self.broker = DurableBroker(workdir)
        self.http = HttpFixture()
        root = workdir / "audio"
        self.settings = campaign_settings(Settings(), bootstrap=self.broker.bootstrap, redis_url=redis_url,
                                          name=self.name, data_dir=workdir / "data", file_root=root,
                                          http_host=self.http.host)
        prepare_model(self.settings)
        create_topics(self.settings)
        self.pool = ClipPool(root / "clips")
        self.poison = poison_files(root / "poison")
        self.root = root
        self.client = connect(self.settings.clickhouse, self.settings.clickhouse_dsn)
        migrate(self.client, self.settings.clickhouse.database)
        self.lock = threading.Lock()
        self.inserts = FailingInserts(self.client)
        self.run = direct_runner(self.client, self.lock)
        self.sink = SinkRunner(self.settings, self.inserts, self.lock)
        self.sink.start()
        self.sink_restarts: list[float] = []
        self.members: list[SubprocessMember] = []
        self.threads: list[ThreadMember] = []
        self.unplanned_exits: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.sent = 0
        self.spawned = 0
        self.started = time.monotonic()
        self._log_handler = logging.FileHandler(workdir / "in-process.log")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(levelname)s %(name)s %(message)s"))
        logging.getLogger("emofleet").addHandler(self._log_handler)
        logging.getLogger("emofleet").setLevel(logging.INFO)
        for _ in range(2):
            self.add_subprocess()
        self.threads.append(ThreadMember(self.settings))  # a steady member, so the group is never empty

    # ------------------------------------------------------------------ members

    def add_subprocess(self) -> SubprocessMember:
        self.spawned += 1
        member = SubprocessMember(self.settings, self.workdir / f"member-{self.spawned}.log")
        self.members.append(member)
        return member

    def supervise(self) -> None:
        """What a supervisor does: restart processors that died on their own, and the sink."""
        for member in list(self.members):
            if not member.alive():
                self.unplanned_exits.append(f"processor pid {member.pid} exited {member.process.returncode}")
                self.members.remove(member)
                self.add_subprocess()
        if self.sink.restart_if_dead():
            self.sink_restarts.append(time.time())

    def pause(self, seconds: float) -> None:
        """Let time pass (a fault's duration, a cadence), supervising meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.supervise()
            threading.Event().wait(min(0.2, left))

    def wait_for(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.pause(0.2)

    # ------------------------------------------------------------------ phases

    def phase(self, phase: str, fault: str, messages: list[Message], inject: Callable[[Feeder], list[float]],
              *, rate: float = RATE) -> tuple[Any, dict[str, Any]]:
        prefix = f"{self.name}-{phase}-"
        assert all(m.ident.startswith(prefix) for m in messages)
        before = self.sink.stats()
        started = time.time()
        feeder = Feeder(self.settings, messages, rate)
        fault_ends = inject(feeder)
        while not feeder.done:
            self.pause(0.2)
        feeder.join()
        assert not feeder.failed, f"references not delivered to Kafka: {feeder.failed[:5]}"
        self.sent += len(messages)
        database = self.settings.clickhouse.database
        deadline = time.monotonic() + SETTLE_SECONDS
        settled = 0
        while (settled := settled_count(self.run, database, prefix)) < len(messages) and time.monotonic() < deadline:
            self.pause(0.5)
        result = account(self.run, database, prefix, messages)
        after = self.sink.stats()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        recovery = max([recovery_seconds(result, feeder.sent_at, end) for end in fault_ends] or [0.0])
        row = {
            "phase": phase, "fault": fault, "references": len(messages),
            "stored": result.stored_events, "dead_lettered": result.dead_lettered,
            "lost": len(result.lost), "duplicated": result.duplicate_rows + len(result.double_outcome),
            "recovery_seconds": round(recovery, 2), "faults_injected": len(fault_ends),
            "seconds": round(time.time() - started, 1),
            "sink": {k: v for k, v in delta.items() if v},
            "dead_letter_reasons": result.reasons,
            "notes": [],
        }
        self.rows.append(row)
        return result, row

    def check(self, result: Any, messages: list[Message]) -> None:
        assert not result.lost, f"{len(result.lost)} references lost, e.g. {result.lost[:5]}"
        assert result.duplicate_rows == 0, f"{result.duplicate_rows} duplicate rows (read without FINAL)"
        assert not result.double_outcome, f"both a result and a dead letter: {result.double_outcome[:5]}"
        assert not result.unexpected_dead, f"good references dead-lettered: {result.unexpected_dead[:5]}"
        assert not result.wrong_reason, f"wrong outcomes: {result.wrong_reason[:5]}"
        assert result.distinct_event_ids == len(messages) - result.dead_lettered
        assert result.empty_reason == 0, "every dead letter has a reason"
        self.check_tables()

    def check_tables(self) -> None:
        database = self.settings.clickhouse.database
        (events,) = self.run(f"SELECT count() AS rows, uniqExact(event_id) AS ids FROM {database}.emotion_events", {})
        (dead,) = self.run(f"SELECT count() AS rows, uniqExact(dead_letter_id) AS ids FROM {database}.dead_letters", {})
        assert events["rows"] == events["ids"], f"emotion_events without FINAL: {events}"
        assert dead["rows"] == dead["ids"], f"dead_letters without FINAL: {dead}"

    def good(self, phase: str, count: int) -> list[Message]:
        return good_messages(phase, f"{self.name}-{phase}-", self.pool, self.settings.kafka.audio_topic, count)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        import torch

        for member in self.members:
            if member.alive():
                member.terminate(30)
        for thread in self.threads:
            thread.stop()
        self.sink.stop()
        self.client.close()
        self.broker.close()
        self.http.close()
        torch.set_num_threads(self._torch_threads)
        logging.getLogger("emofleet").removeHandler(self._log_handler)
        self._log_handler.close()

    def report(self) -> dict[str, Any]:
        return {"run": self.name, "references": self.sent, "broker_storage": self.broker.storage,
                "seconds": round(time.monotonic() - self.started, 1), "cpus": os.cpu_count(),
                "load_average": os.getloadavg(), "python": platform.python_version(),
                "unplanned_processor_exits": self.unplanned_exits, "unplanned_sink_deaths": self.sink.unplanned}


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    workdir = tmp_path_factory.mktemp("faults")
    with dedicated_redis(workdir) as (redis_url, redis_pid):
        run = Campaign(workdir, redis_url, redis_pid)
        try:
            run.wait_for(lambda: any(m.assigned() for m in run.members), 120, "a processor subprocess to join")
            yield run
        finally:
            report = Path(os.environ.get("EMOFLEET_FAULTS_REPORT") or workdir / "faults.json")
            write_report(run.rows, run.report(), report)
            print(f"\nfault report: {report}")
            run.close()


# ---------------------------------------------------------------------------------------- phases


def test_baseline_without_faults(campaign: Campaign) -> None:
    messages = campaign.good("base", int(os.environ.get("BASE_N", "300")))
    result, _ = campaign.phase("base", "none (baseline)", messages, lambda feeder: [])
    campaign.check(result, messages)


def test_processors_killed_with_sigkill_five_times(campaign: Campaign) -> None:
    """(a) kill -9 a processor process that owns partitions, five times, restarting it each time."""
    kills: list[float] = []

    def inject(feeder: Feeder) -> list[float]:
        for _ in range(5):
            campaign.wait_for(lambda: any(m.assigned() and m.alive() for m in campaign.members), 90,
                              "a processor process with partitions")
            victim = next(m for m in campaign.members if m.assigned() and m.alive())
            campaign.members.remove(victim)
            victim.kill9()
            kills.append(time.time())
            campaign.add_subprocess()  # what a supervisor (or Kubernetes) does
            campaign.pause(2.0)
        return kills

    messages = campaign.good("kill", 1500)
    result, row = campaign.phase("kill", "processor kill -9 (x5)", messages, inject)
    row["notes"].append(f"{len(kills)} processor processes killed with SIGKILL while holding partitions and "
                        "restarted; their uncommitted references were replayed by the group")
    campaign.check(result, messages)
    assert len(kills) >= 5


def test_processors_join_and_leave_every_few_seconds(campaign: Campaign) -> None:
    """(c) add and remove group members every 2.5 s while references flow."""
    changes: list[str] = []

    def inject(feeder: Feeder) -> list[float]:
        ends = []
        while not feeder.done:
            if len(campaign.threads) < 3 and (len(changes) % 2 == 0 or len(campaign.threads) < 2):
                campaign.threads.append(ThreadMember(campaign.settings))
                changes.append("join")
            else:
                campaign.threads.pop(0).stop()  # a clean leave: finish the batch, commit, go
                changes.append("leave")
            ends.append(time.time())
            campaign.pause(2.5)
        member = campaign.members.pop(0)  # and one process leaving with SIGTERM, replaced
        assert member.terminate(60) == 0, "a processor leaving on SIGTERM exits 0"
        campaign.add_subprocess()
        changes.append("process SIGTERM + restart")
        ends.append(time.time())
        return ends

    messages = campaign.good("churn", 1200)
    result, row = campaign.phase("churn", "processors join and leave every 2.5 s", messages, inject)
    row["notes"].append(f"{len(changes)} membership changes: {changes.count('join')} joins, "
                        f"{changes.count('leave')} leaves, 1 process SIGTERM + restart")
    campaign.check(result, messages)
    assert changes.count("join") >= 3 and changes.count("leave") >= 3


def test_sink_killed_between_insert_and_commit(campaign: Campaign) -> None:
    """(b) the sink dies after ClickHouse took a batch and before Kafka got the commit; restarted."""

    def inject(feeder: Feeder) -> list[float]:
        for _ in range(3):
            campaign.pause(2.0)
            before = campaign.sink.crashes
            campaign.sink.crash_armed.set()
            campaign.wait_for(lambda: campaign.sink.crashes > before and campaign.sink.alive, 60,
                              "the sink to crash before a commit and be restarted")
        return campaign.sink_restarts[-3:]

    messages = campaign.good("sink", 900)
    result, row = campaign.phase("sink", "sink killed between insert and commit (x3)", messages, inject)
    row["notes"].append("crashed 3 times after an insert and before its commit; restarted each time, it skipped "
                        f"the {row['sink'].get('skipped_replays', 0)} replayed messages ClickHouse already had")
    campaign.check(result, messages)
    assert row["sink"].get("skipped_replays", 0) > 0, "the restarted sink saw the uncommitted batch again"


def test_clickhouse_inserts_fail_for_twelve_seconds(campaign: Campaign) -> None:
    """(e) every ClickHouse insert fails for 12 s."""

    def inject(feeder: Feeder) -> list[float]:
        campaign.pause(3.0)
        campaign.inserts.failing.set()
        campaign.pause(12.0)
        campaign.inserts.failing.clear()
        return [time.time()]

    messages = campaign.good("inserts", 900)
    result, row = campaign.phase("inserts", "ClickHouse inserts fail for 12 s", messages, inject)
    row["notes"].append(f"{row['sink'].get('insert_failures', 0)} failed insert attempts; the sink paused its "
                        "partitions, kept polling, retried with backoff")
    campaign.check(result, messages)
    assert row["sink"].get("insert_failures", 0) >= 3


def test_redis_stopped_for_twelve_seconds(campaign: Campaign) -> None:
    """(d) the cache's Redis frozen (SIGSTOP) for 12 s, then resumed."""

    def inject(feeder: Feeder) -> list[float]:
        campaign.pause(3.0)
        os.kill(campaign.redis_pid, signal.SIGSTOP)
        try:
            campaign.pause(12.0)
        finally:
            os.kill(campaign.redis_pid, signal.SIGCONT)
        return [time.time()]

    messages = campaign.good("redis", 900)
    result, row = campaign.phase("redis", "Redis stopped (SIGSTOP) for 12 s", messages, inject)
    row["notes"].append("processors timed out on Redis, went on without the cache, used it again after")
    campaign.check(result, messages)


def test_broker_killed_and_restarted_on_durable_storage(campaign: Campaign) -> None:
    """(f) kill -9 the broker (Tansu, s3:// storage) and start it again on the same port."""
    if not campaign.broker.durable:
        pytest.skip("moto is not installed (pip install -e '.[test]'): the broker's storage would not survive")

    def inject(feeder: Feeder) -> list[float]:
        campaign.pause(4.0)
        campaign.broker.kill()
        campaign.pause(3.0)
        campaign.broker.start()
        return [time.time()]

    messages = campaign.good("broker", 900)
    result, row = campaign.phase("broker", "broker kill -9 + restart (Tansu on S3)", messages, inject)
    row["notes"].append("broker down 3 s; producers queued, consumers reconnected, committed offsets survived")
    campaign.check(result, messages)


def test_poison_inputs_are_dead_lettered_with_their_reason(campaign: Campaign) -> None:
    """(g) 37 kinds of bad input among good references; each lands in dead letters with the right reason."""
    phase = "poison"
    prefix = f"{campaign.name}-{phase}-"
    poison = poison_messages(phase, prefix, campaign.root, campaign.poison, campaign.http.host,
                             campaign.settings.kafka.audio_topic, copies=2)
    messages = poison + good_messages(phase, prefix, campaign.pool, campaign.settings.kafka.audio_topic, 400)
    random.Random(3).shuffle(messages)
    kinds = {m.kind for m in poison}
    assert len(kinds) >= 20
    result, row = campaign.phase(phase, f"poison inputs ({len(kinds)} kinds)", messages, lambda feeder: [])
    row["notes"].append(f"{len(poison)} bad references of {len(kinds)} kinds: {', '.join(sorted(kinds))}")
    campaign.check(result, messages)
    assert result.dead_lettered == len(poison)
