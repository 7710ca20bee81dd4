"""`emofleet aggregate` as a real worker process on the real broker: exact windows with out-of-order and late
events, alerts once per breach, kill -9 and restart from the changelog without counting anything twice, and the
sink writing the aggregates into ClickHouse once per aggregate_id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from emofleet.schemas.codec import make_codec
from emofleet.schemas.emotions import EMOTIONS, NEGATIVE_LABELS
from emofleet.streams.aggregator import scope_topic
from emofleet.core.config import Settings, to_env
from emofleet.streams.producer import idempotent_producer_config
from emofleet.streams.topics import TopicSpec, ensure_topics, pipeline_topics

from kafka_helpers import TopicReader
from metrics_helpers import metric
from sink_samples import sample_events

pytestmark = pytest.mark.slow

S = 1000
T0 = 1_764_000_000_000 - 1_764_000_000_000 % (300 * S)  # aligned to 5 minutes


def aggregator_settings(settings: Settings, *, results_partitions: int, **aggregate: Any) -> Settings:
    settings = replace(settings, aggregate=replace(
        settings.aggregate, app_id=settings.kafka.results_topic.replace(".emotions", "-agg"),
        commit_interval_seconds=0.2, **aggregate))
    admin = AdminClient(settings.kafka.client_config())
    ensure_topics(admin, [TopicSpec(settings.kafka.results_topic, results_partitions, 1)])
    ensure_topics(admin, pipeline_topics(settings.kafka))
    return settings


class Worker:
    """One `python -m emofleet.cli aggregate` process with the test's settings."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "emofleet.cli", "aggregate", "--log-level", "info"],
            env=os.environ | to_env(settings), stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Outputs:
    """Decoded aggregates and alerts read from their topics, accumulated across polls."""

    def __init__(self, settings: Settings) -> None:
        self.codec = make_codec()
        self.kafka = settings.kafka
        self._aggregates = TopicReader(settings.kafka.bootstrap_servers, settings.kafka.aggregates_topic)
        self._alerts = TopicReader(settings.kafka.bootstrap_servers, settings.kafka.alerts_topic)

    def aggregates(self) -> list[dict]:
        return [self.codec.decode("emotion_aggregate", m.value(), topic=m.topic()) for m in self._aggregates.poll()]

    def alerts(self) -> list[dict]:
        return [self.codec.decode("emotion_alert", m.value(), topic=m.topic()) for m in self._alerts.poll()]

    def wait_aggregates(self, expected: int, worker: Worker, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.aggregates()
            if len({a["aggregate_id"] for a in found}) >= expected:
                return found
            assert worker.process.poll() is None, f"worker exited:\n{worker.text()[-3000:]}"
        raise AssertionError(f"{len(self.aggregates())} of {expected} aggregates; log:\n{worker.text()[-3000:]}")

    def close(self) -> None:
        self._aggregates.close()
        self._alerts.close()


def publish(settings: Settings, events: list[dict], partition: int | None = None) -> dict[int, int]:
    """Send in order (idempotent producer keeps it); returns the highest offset written per partition."""
    codec = make_codec()
    topic = settings.kafka.results_topic
    producer = Producer(idempotent_producer_config(settings.kafka))  # lz4, as the processors publish
    last: dict[int, int] = {}

    def delivered(error: Any, message: Any) -> None:
        assert error is None, error
        last[message.partition()] = max(message.offset(), last.get(message.partition(), -1))

    for event in events:
        key = f"{event['tenant']}/{event['call_id']}" if event.get("call_id") else event["audio_id"]
        kwargs = {} if partition is None else {"partition": partition}
        producer.produce(topic, key=key.encode(), value=codec.encode("emotion_event", event, topic=topic),
                         on_delivery=delivered, **kwargs)
    assert producer.flush(30) == 0
    return last


def clip(audio_id: str, t: int, label: str, confidence: float = 0.75, **fields: Any) -> list[dict]:
    fields = {"tenant": "acme", "source": None, "channel": None, "call_id": None} | fields
    return sample_events(audio_id=audio_id, label=label, confidence=confidence, produced_at_ms=t, **fields)


def expected_windows(events: list[dict]) -> dict[tuple, dict]:
    """Independent expectation: every distinct whole-clip event counts once in every window (tumbling 60 s,
    hopping 300 s every 60 s) of each of its scopes."""
    windows: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for event in events:
        if event["segment_index"] != -1 or not event.get("tenant"):
            continue
        t = event["reference_produced_at"]
        for scope, field in (("source", "source"), ("channel", "channel"), ("call", "call_id")):
            if not event.get(field):
                continue
            for kind, size in (("tumbling", 60 * S), ("hopping", 300 * S)):
                for start in range(t - t % (60 * S) - size + 60 * S, t + 1, 60 * S):
                    windows[(scope, event["tenant"], event[field], kind, start)][event["event_id"]] = event
    expected = {}
    for key, members in windows.items():
        items = list(members.values())
        expected[key] = {
            "clips": len(items),
            "label_counts": {name: sum(1 for e in items if e["label"] == name) for name in EMOTIONS},
            "negativity": sum(1 for e in items if e["label"] in NEGATIVE_LABELS) / len(items),
            "first_event_at": min(e["reference_produced_at"] for e in items),
            "last_event_at": max(e["reference_produced_at"] for e in items),
            "mean_confidence": sum(e["confidence"] for e in items) / len(items)}
    return expected


def as_expected(aggregate: dict) -> tuple[tuple, dict]:
    key = (aggregate["scope"], aggregate["tenant"], aggregate["scope_value"], aggregate["window_type"],
           aggregate["window_start"])
    return key, {name: aggregate[name] for name in ("clips", "label_counts", "negativity", "first_event_at",
                                                     "last_event_at", "mean_confidence")}


def check_exact(found: list[dict], events: list[dict]) -> None:
    expected = expected_windows(events)
    by_id: dict[str, list[dict]] = defaultdict(list)
    for aggregate in found:
        by_id[aggregate["aggregate_id"]].append(aggregate)
    for copies in by_id.values():
        assert all(copy == copies[0] for copy in copies), "one aggregate_id, two different contents"
    got = dict(as_expected(copies[0]) for copies in by_id.values())
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        mine, theirs = dict(got[key]), dict(value)
        mine["mean_confidence"] = round(mine["mean_confidence"], 9)
        theirs["mean_confidence"] = round(theirs["mean_confidence"], 9)
        assert mine == theirs, key


# ------------------------------------------------------------------------------------ exactness and alerts


def scenario() -> tuple[list[dict], list[dict], dict]:
    """One lane (a one-partition results topic), so arrival order is publish order. Returns (published in order,
    the events that must count, facts for the assertions)."""
    a, n = "angry", "neutral"
    timeline: list[dict] = []
    # src-a opens with 6 negative clips: rule (a) fires in each of the 5 hopping windows holding them.
    for i, label in enumerate([a, "sad", a, "fearful", "disgusted", a]):
        timeline += clip(f"burst{i}", T0 + i * 5 * S, label, 0.875, source="src-a", channel="web", call_id="a1")
    # then calm clips every 20 s up to T0+280 s, some on channel web; no hopping window after T0 breaches.
    for i in range(13):
        timeline += clip(f"calm{i}", T0 + (40 + 20 * i) * S, ["neutral", "happy"][i % 2], [0.5, 0.625][i % 2],
                         source="src-a", channel="web" if i % 2 == 0 else None, call_id="a2")
    # a long clip (two windows + the whole-clip summary): only the summary counts
    timeline += clip("long", T0 + 222 * S, "angry", 0.75, source="src-a", windows=((0.0, 30.0), (30.0, 42.0)),
                     window_labels=["angry", "neutral"])
    # src-b: 4 neutral then 4 angry: never >= 0.6 over >= 5 clips in arrival order
    for i, label in enumerate([n] * 4 + [a] * 4):
        timeline += clip(f"b{i}", T0 + (100 + 5 * i) * S, label, source="src-b")
    # calls without a source: 'c-streak' A A N A A A A (one streak), 'c-none' A A N A A (none)
    streak_labels = [a, a, n, a, a, a, a]
    for i, label in enumerate(streak_labels):
        timeline += clip(f"s{i}", T0 + (150 + 4 * i) * S, label, call_id="c-streak")
    for i, label in enumerate([a, a, n, a, a]):
        timeline += clip(f"x{i}", T0 + (200 + 4 * i) * S, label, call_id="c-none")
    timeline.sort(key=lambda e: (e["reference_produced_at"], e["segment_index"] == -1))

    order = list(timeline)
    def move_after(audio_id: str, after: str) -> None:  # out-of-order delivery
        event = next(e for e in order if e["audio_id"] == audio_id and e["segment_index"] == -1)
        order.remove(event)
        order.insert(next(i for i, e in enumerate(order) if e["audio_id"] == after) + 1, event)

    move_after("calm6", "calm7")  # T0+160 s arrives after T0+180 s (crosses a window boundary)
    move_after("s2", "s4")  # the streak's clips arrive shuffled
    move_after("s6", "x0")
    move_after("calm11", "calm12")  # T0+260 s after T0+280 s, 20 s behind: inside grace

    late = clip("late", T0 + 200 * S, "angry", source="src-a")[0]  # 80 s behind src-a's T0+280 s: late
    duplicate = next(e for e in order if e["audio_id"] == "calm12")  # published again: must count once
    closer = clip("closer", T0 + 3600 * S, "neutral", source="zz-closer")[0]  # moves the watermark past all
    order += [late, duplicate, closer]

    # The in-grace and late claims hold whatever the partition layout: the watermark never exceeds the
    # largest event time published before, and src-a's own events reach src-a's partition in order.
    published_max = T0
    for event in order[:-3]:
        assert event["reference_produced_at"] + 30 * S >= published_max, event["audio_id"]
        published_max = max(published_max, event["reference_produced_at"])
    assert late["reference_produced_at"] + 30 * S < T0 + 280 * S
    counted = [e for e in order if e is not late and e is not closer]
    facts = {"late": late, "streak": [e["event_id"] for e in timeline if e["audio_id"] in ("s3", "s4", "s5")
                                      and e["segment_index"] == -1]}
    return order, counted, facts


def test_windows_are_exact_with_out_of_order_and_late_events_and_alerts_fire_once(
        settings: Settings, tmp_path: Path) -> None:
    from emofleet.infra.local_stack import free_port

    settings = aggregator_settings(settings, results_partitions=1)
    settings = replace(settings, observability=replace(settings.observability, metrics_port=free_port(),
                                                       metrics_host="127.0.0.1"))
    order, counted, facts = scenario()
    publish(settings, order)
    expected = expected_windows(counted)
    outputs = Outputs(settings)
    worker = Worker(settings, tmp_path / "worker.log")
    try:
        found = outputs.wait_aggregates(len(expected), worker)
        check_exact(found, counted)
        assert len(found) == len(expected), "a window was emitted twice"
        deadline = time.monotonic() + 30
        while len(alerts := outputs.alerts()) < 6 and time.monotonic() < deadline:
            pass
        late_id = facts["late"]["event_id"]
        assert f"late event {late_id}" in worker.text(), "the late event is logged (and counted) as late"
        import httpx

        base = f"http://127.0.0.1:{settings.observability.metrics_port}"
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        exposition = httpx.get(f"{base}/metrics", timeout=5).text
        assert f'emofleet_messages_out_total{{topic="{settings.kafka.aggregates_topic}"}} ' \
               f"{float(len(expected))}" in exposition, exposition[-1500:]
    finally:
        worker.stop()
        outputs.close()

    negativity = [a for a in alerts if a["rule"] == "negativity"]
    streaks = [a for a in alerts if a["rule"] == "angry_streak"]
    assert len(alerts) == len({a["alert_id"] for a in alerts}) == 6, alerts
    assert {a["scope_value"] for a in negativity} == {"src-a"}
    assert sorted(a["window_start"] - T0 for a in negativity) == [-240 * S, -180 * S, -120 * S, -60 * S, 0]
    assert all(a["clips"] == 5 and a["value"] == 1.0 for a in negativity)
    assert len(streaks) == 1 and streaks[0]["scope_value"] == "c-streak"
    assert streaks[0]["event_ids"] == facts["streak"]
    assert worker.process.returncode == 0, worker.text()[-2000:]


# ------------------------------------------------------------------------------------ kill -9


def committed(settings: Settings, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer(settings.kafka.client_config() | {"group.id": settings.aggregate.app_id})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        consumer.close()


def wait_committed(settings: Settings, topic: str, partitions: int, ends: dict[int, int], worker: Worker,
                   timeout: float = 60) -> None:
    """Until the aggregator's group has committed ``topic`` up to ``ends`` (next offsets) everywhere."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = committed(settings, topic, partitions)
        if all(done.get(p, 0) >= end for p, end in ends.items()):
            return
        assert worker.process.poll() is None, worker.text()[-3000:]
        time.sleep(0.1)  # polling the broker for a commit, bounded by the deadline
    raise AssertionError(f"{topic}: committed {committed(settings, topic, partitions)}, want {ends}")


def calls(prefix: str, count: int, start: int, step: int) -> list[dict]:
    events = []
    for i in range(count):
        label = ["angry", "neutral", "sad", "happy", "neutral"][i % 5]
        events += clip(f"{prefix}{i}", T0 + start + i * step, label, [0.5, 0.625, 0.75, 0.875][i % 4],
                       source=f"src-{i % 3}", channel=["web", "phone"][i % 2], call_id=f"{prefix}-call{i % 7}")
    return events


def scope_topic_ends(settings: Settings) -> dict[int, int]:
    reader = TopicReader(settings.kafka.bootstrap_servers, scope_topic(settings))
    try:
        ends: dict[int, int] = {}
        for message in reader.poll(1.0):
            ends[message.partition()] = max(ends.get(message.partition(), 0), message.offset() + 1)
        return ends
    finally:
        reader.close()


def test_kill_9_and_restart_restores_state_from_the_changelog_and_counts_nothing_twice(
        settings: Settings, tmp_path: Path) -> None:
    partitions = settings.kafka.partitions
    settings = aggregator_settings(settings, results_partitions=partitions, grace_seconds=3600)
    results = settings.kafka.results_topic
    phase1, phase2, phase3 = calls("p1-", 40, 0, 5 * S), calls("p2-", 400, 200 * S, 400), calls("p3-", 20, 380 * S, 5 * S)
    outputs = Outputs(settings)
    first = Worker(settings, tmp_path / "first.log")
    try:
        ends = {p: last + 1 for p, last in publish(settings, phase1).items()}
        wait_committed(settings, results, partitions, ends, first)
        # Phase 1 is routed and its observations are committed too: from now on their counts exist only in the
        # changelog of the state table (the input will not be read again).
        wait_committed(settings, scope_topic(settings), partitions, scope_topic_ends(settings), first)
        ends2 = {p: last + 1 for p, last in publish(settings, phase2).items()}
        deadline = time.monotonic() + 30
        while not any(offset > ends.get(p, 0) for p, offset in committed(settings, results, partitions).items()):
            assert time.monotonic() < deadline, "phase 2 was never picked up"
            time.sleep(0.02)  # polling the broker for a commit, bounded by the deadline
        first.kill9()  # part-way through phase 2: some of it committed, some processed but not committed
        left = {p: end - committed(settings, results, partitions).get(p, 0) for p, end in ends2.items()}
        scopes = {p: end - committed(settings, scope_topic(settings), partitions).get(p, 0)
                  for p, end in scope_topic_ends(settings).items()}
        print(f"killed with {sum(left.values())} results and {sum(scopes.values())} observations uncommitted")
    finally:
        first.stop()
    assert outputs.aggregates() == [], "nothing closes before the closers (grace 3600 s)"

    second = Worker(settings, tmp_path / "second.log")
    try:
        publish(settings, phase3)
        closers = []
        for p in range(partitions):  # every lane moves far ahead, so every window closes
            closer = clip(f"closer{p}", T0 + 100_000 * S, "neutral", source=f"zz-{p}")
            publish(settings, closer, partition=p)
            closers += closer
        counted = phase1 + phase2 + phase3
        found = outputs.wait_aggregates(len(expected_windows(counted)), second, timeout=60)
        check_exact(found, counted)
        assert "state entries restored" in second.text(), "the restarted worker rebuilt its state from the changelog"
        alerts: dict[str, list[dict]] = defaultdict(list)
        for alert in outputs.alerts():
            alerts[alert["alert_id"]].append(alert)
        assert all(copy == copies[0] for copies in alerts.values() for copy in copies)
    finally:
        second.stop()
        outputs.close()
    assert second.process.returncode == 0, second.text()[-2000:]
    # The last "aggregate stats" line is the worker's final view of its metrics (read from its registry).
    line = [line for line in second.text().splitlines() if "aggregate stats: " in line][-1]
    print("after restart:", line)
    final = dict(pair.split("=") for pair in line.split("aggregate stats: ")[1].split())
    assert float(final["counted"]) > 0, "the restarted worker counted the uncommitted tail and phase 3"
    assert float(final["late"]) == 0, "with a grace of an hour nothing is late, even while lanes catch up"


# ------------------------------------------------------------------------------------ into ClickHouse


def test_sink_writes_aggregates_once_per_aggregate_id(settings: Settings) -> None:
    from emofleet.sinks.clickhouse import connect
    from emofleet.sinks.query_server import direct_runner
    from emofleet.sinks.migrations import migrate
    from emofleet.sinks.service import ClickHouseSink
    from emofleet.streams.windows import Scope, WindowAgg, WindowSpec, observations

    ensure_topics(AdminClient(settings.kafka.client_config()), pipeline_topics(settings.kafka))
    settings = replace(settings, clickhouse=replace(settings.clickhouse, batch_rows=100, batch_seconds=0.2))
    events = [e for i in range(12) for e in clip(f"k{i}", T0 + i * 7 * S, ["angry", "happy", "sad"][i % 3],
                                                  source="src-a") if e["segment_index"] == -1]
    spec = WindowSpec("tumbling", 60 * S, 60 * S)
    aggs: dict[int, WindowAgg] = {}
    for obs in (o for e in events for o in observations(e)):
        start = obs.t - obs.t % (60 * S)
        aggs[start] = aggs.get(start, WindowAgg(Scope("source", "acme", "src-a"), spec, start, start + 60 * S)).add(obs)
    records = [agg.record() for agg in aggs.values()]
    codec = make_codec()
    topic = settings.kafka.aggregates_topic
    producer = Producer(settings.kafka.client_config())
    for record in records + records:  # every aggregate published twice, as after an aggregator crash
        producer.produce(topic, key=record["aggregate_id"].encode(),
                         value=codec.encode("emotion_aggregate", record, topic=topic))
    assert producer.flush(30) == 0

    client = connect(settings.clickhouse, settings.clickhouse_dsn)
    migrate(client, settings.clickhouse.database)
    sink = ClickHouseSink(settings, client, codec)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while (metric(sink.metrics, "emofleet_sink_inserted_rows_total", table="emotion_aggregates") < 2 * len(records)
               and time.monotonic() < deadline):
            time.sleep(0.05)  # polling the sink's counter, bounded by the deadline
    finally:
        sink.stop()
        thread.join(30)
    run = direct_runner(client)
    db = settings.clickhouse.database
    rows = run(f"SELECT aggregate_id, clips, count_angry, count_sad, negativity, window_start "
               f"FROM {db}.emotion_aggregates FINAL ORDER BY window_start", {})
    client.close()
    assert [r["aggregate_id"] for r in rows] == [r["aggregate_id"] for r in sorted(records, key=lambda r: r["window_start"])]
    for row, record in zip(rows, sorted(records, key=lambda r: r["window_start"]), strict=True):
        assert (row["clips"], row["count_angry"], row["count_sad"]) == (
            record["clips"], record["label_counts"]["angry"], record["label_counts"]["sad"])
        assert row["negativity"] == pytest.approx(record["negativity"])
