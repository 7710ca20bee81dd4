"""`emofleet aggregate`: windowed emotion aggregates and alerts, a faust-streaming app over the results topic.

Topology (all topics created up front with the configured partition count, see :func:`aggregator_topics`)::

    results topic --route--> <app_id>-scopes (keyed by scope) --aggregate--> aggregates topic, alerts topic
                                                                   |
                                                 table "state" (changelog <app_id>-state-changelog)

* ``route`` decodes each EmotionEvent and, for a whole-clip event, sends one observation per scope
  (source, channel, call) keyed by the scope, so every scope's state lives in one partition.
* ``aggregate`` (:class:`ScopeAggregator`) keeps all state in one faust table: per partition the lanes'
  progress and the event-time watermark (:class:`~emofleet.streams.windows.Progress`), per scope one
  :class:`~emofleet.streams.windows.ScopeState` (its open windows and, for calls, the angry-streak state),
  per counted (scope, event_id) a "seen" marker. The math and the decisions are in
  :mod:`emofleet.streams.windows`; this module orders the state writes and the outputs.
* The router also sends *heartbeats*: how far each of its lanes is and whether it is idle (read to its
  end), to every aggregator partition, when that changes and when it is assigned lanes (then: busy).

Exactness under at-least-once (kill -9 anywhere, restart, replay of the uncommitted tail):

1. Every table write made while processing partition ``p`` goes to changelog partition ``p`` through the
   one producer, in order (aiokafka keeps one batch in flight per partition), so the state restored after
   a crash is the state after some *prefix* of the writes. Faust commits an input offset only after
   flushing the producer, so everything an offset caused is durable before the offset is committed.
   (Faust stops recovery at the end offset the broker reports; Tansu reports the start of the last batch,
   so recovery is made to read to the true end, see :func:`_recover_to_the_log_end`.)
2. For one observation the writes are, in this order: the scope's state (all its windows at once, with
   ``last_event`` = this event), the ``seen`` marker of (scope, event_id), the lanes' progress. On replay:
   ``seen`` present -> duplicate, skipped (this also catches the same event_id published twice upstream,
   or routed twice after a crash of ``route``); otherwise a scope state whose ``last_event`` is this event
   already counted it (the crash came between the two writes) and is not counted again. The progress is
   re-applied for every message, duplicates included, so replaying reproduces the original watermarks
   and with them the same late and close decisions.
3. A window closes when the watermark passes ``end + grace``; it is emitted (key = deterministic
   ``aggregate_id``), the producer is flushed, and only then is it removed from the scope's state. A crash
   in between replays the input and emits the very same record again (same key, same content):
   downstream keeps one per ``aggregate_id``. Alerts likewise: sent and flushed before the state that
   records them, deterministic ``alert_id``.
4. ``seen`` markers are dropped once an event is more than grace + the longest window behind the
   watermark; a duplicate arriving after that is late, and late events are never counted.

``tests/test_aggregator_state.py`` checks 1-4 by crashing after every single state write and replaying.
Due work (closing windows, finalising streaks, dropping old markers) is found through an in-memory heap
per partition, rebuilt from the table after every rebalance, so the table itself is the only state.
"""

from __future__ import annotations

import heapq
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any

from emofleet.core.config import KafkaSettings, Settings, describe
from emofleet.core.metrics import OBSERVATION_OUTCOMES, Metrics
from emofleet.streams.topics import TopicSpec
from emofleet.streams.windows import (
    AggregateConfig,
    Observation,
    Progress,
    ScopeState,
    Streak,
    WindowAgg,
    is_late,
    observations,
)

log = logging.getLogger(__name__)

TABLE_NAME = "state"
HEARTBEAT_SECONDS = 1.0  # how often the router reports lane progress (only when it changed)
_LOUD_LATE_EVENTS = 100  # log this many late events one by one, then only count them (the metrics)


def scope_topic(settings: Settings) -> str:
    return f"{settings.aggregate.app_id}-scopes"


def changelog_topic(settings: Settings) -> str:
    return f"{settings.aggregate.app_id}-{TABLE_NAME}-changelog"


def aggregator_topics(settings: Settings) -> list[TopicSpec]:
    """The topics the aggregator reads and writes, with the configured layout. The results, aggregates
    and alerts topics are pipeline topics (`emofleet topics create`); they are listed so the aggregator
    can start on its own. The scope and changelog partitions must equal each other (faust co-partitioning)."""
    kafka = settings.kafka
    specs = [TopicSpec(name, kafka.partitions, kafka.replication_factor)
             for name in (kafka.results_topic, kafka.aggregates_topic, kafka.alerts_topic, scope_topic(settings))]
    specs.append(TopicSpec(changelog_topic(settings), kafka.partitions, kafka.replication_factor,
                           {"cleanup.policy": "compact"}))
    return specs


# ------------------------------------------------------------------------------------ state keys

# Table keys start with the input partition, so the state of one partition can be found after a restart.
_META, _SCOPE, _SEEN = "m", "c", "s"


def _meta_key(partition: int) -> str:
    return f"{partition}:{_META}"


def _scope_key(partition: int, obs: Observation) -> str:
    return f"{partition}:{_SCOPE}:{obs.scope.key}"


def _seen_key(partition: int, obs: Observation) -> str:
    return f"{partition}:{_SEEN}:" + json.dumps([obs.scope.key, obs.event_id], separators=(",", ":"),
                                               ensure_ascii=False)


def _kind_of(key: str) -> str:
    return key.split(":", 2)[1]


def stats_line(metrics: Metrics, kafka: KafkaSettings) -> str:
    """The periodic "aggregate stats" log line: a few of the aggregator's metrics, read from its registry."""
    def sample(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    counts = {outcome: sample("emofleet_aggregator_observations_total", outcome=outcome)
              for outcome in OBSERVATION_OUTCOMES}
    counts["aggregates"] = sample("emofleet_messages_out_total", topic=kafka.aggregates_topic)
    counts["alerts"] = sample("emofleet_messages_out_total", topic=kafka.alerts_topic)
    counts["flushes"] = sample("emofleet_stage_seconds_count", stage="flush")
    flush_seconds = sample("emofleet_stage_seconds_sum", stage="flush")
    return " ".join(f"{name}={count:.0f}" for name, count in counts.items()) + f" flush_seconds={flush_seconds:.1f}"


@dataclass
class _Due:
    """Min-heap of (watermark at which work is due, key) with lazy deletion: ``due[key]`` is the entry
    that counts; older heap entries for the key are skipped when popped."""

    heap: list[tuple[int, str]] = field(default_factory=list)
    due: dict[str, int] = field(default_factory=dict)

    def schedule(self, key: str, at: int) -> None:
        if self.due.get(key) != at:
            self.due[key] = at
            heapq.heappush(self.heap, (at, key))

    def pop_due(self, watermark: int) -> list[str]:
        keys = []
        while self.heap and self.heap[0][0] <= watermark:
            at, key = heapq.heappop(self.heap)
            if self.due.get(key) == at:
                del self.due[key]
                keys.append(key)
        return keys


@dataclass
class Outputs:
    """Where records go: ``send_aggregate(key, record)``, ``send_alert(key, record)`` (both awaitable,
    may buffer) and ``flush()`` (returns when everything sent so far, table writes included, is durable)."""

    send_aggregate: Callable[[str, dict[str, Any]], Awaitable[None]]
    send_alert: Callable[[str, dict[str, Any]], Awaitable[None]]
    flush: Callable[[], Awaitable[None]]


class ScopeAggregator:
    """The aggregate step over a mutable mapping (a faust table in production, a dict in unit tests).

    Call :meth:`handle` / :meth:`heartbeat` for each message of input partition ``partition``, in partition
    order, and :meth:`forget` after a rebalance. See the module docstring for the order of writes.
    """

    def __init__(self, store: MutableMapping[str, Any], config: AggregateConfig, outputs: Outputs,
                 metrics: Metrics) -> None:
        self.store = store
        self.config = config
        self.outputs = outputs
        self._observations = metrics.aggregator_observations
        self._loud_late_left = _LOUD_LATE_EVENTS
        self._due: dict[int, _Due] = {}

    def forget(self) -> None:
        """Drop the in-memory indexes (after a rebalance the table may hold other partitions' state)."""
        self._due.clear()

    def progress(self, partition: int) -> Progress:
        meta = self.store.get(_meta_key(partition))
        if meta is None:
            return Progress(self.config.lanes)
        return replace(Progress.from_dict(meta), lanes=self.config.lanes)

    def watermark(self, partition: int) -> int | None:
        return self.progress(partition).watermark

    async def handle(self, partition: int, obs: Observation) -> None:
        """One observation of input partition ``partition`` (see the module docstring for the write order)."""
        store, config = self.store, self.config
        due = self._index(partition)
        progress = self.progress(partition)
        watermark = progress.watermark
        seen_key = _seen_key(partition, obs)
        if seen_key in store:
            self._observations.labels("duplicate").inc()
        elif is_late(obs.t, watermark, config.grace_ms):
            self._observations.labels("late").inc()
            (log.info if self._loud_late_left > 0 else log.debug)(
                "late event %s of %s at %d dropped (watermark %d, grace %d ms)", obs.event_id, obs.scope.key,
                obs.t, watermark, config.grace_ms)
            self._loud_late_left = max(self._loud_late_left - 1, 0)
        else:
            key = _scope_key(partition, obs)
            current = store.get(key)
            state = ScopeState.from_dict(current) if current is not None else ScopeState(obs.scope)
            if state.last_event != obs.event_id:  # else: counted before a crash, the seen marker was not
                state = state.add(obs, config.specs)
            breaches = [w for w in state.windows if config.negativity.breached(w)]
            if breaches:
                for window in breaches:
                    alert = config.negativity.alert(window)
                    await self.outputs.send_alert(alert["alert_id"], alert)
                    log.info("alert %s: %s", alert["alert_id"], alert["message"])
                await self.outputs.flush()  # the alerts are durable before the flags saying they were sent
                state = state.with_alerted(breaches)
            if current is None or state.to_dict() != current:
                store[key] = state.to_dict()
            self._schedule(due, key, state)
            store[seen_key] = {"t": obs.t}  # after the scope's write: its presence means that one is durable
            due.schedule(seen_key, obs.t + config.grace_ms + config.retention_ms)
            self._observations.labels("counted").inc()
        progress = self._advance(partition, progress, progress.observe(obs.lane, obs.t))
        if progress.watermark is not None:
            await self._run_due(partition, progress.watermark, due)

    async def heartbeat(self, partition: int, lane: int, t: int | None, idle: bool) -> None:
        """The router's progress report for ``lane`` (see :class:`~emofleet.streams.windows.Progress`)."""
        due = self._index(partition)
        progress = self.progress(partition)
        progress = self._advance(partition, progress, progress.heartbeat(lane, t, idle))
        if progress.watermark is not None:
            await self._run_due(partition, progress.watermark, due)

    def _advance(self, partition: int, old: Progress, new: Progress) -> Progress:
        if new != old:
            self.store[_meta_key(partition)] = new.to_dict()
        return new

    def _schedule(self, due: _Due, key: str, state: ScopeState) -> None:
        at = state.due(self.config.grace_ms, self.config.retention_ms)
        if at is not None:
            due.schedule(key, at)

    async def _run_due(self, partition: int, watermark: int, due: _Due) -> None:
        """Close windows, finalise streaks and drop old markers that the watermark has made due."""
        store, config = self.store, self.config
        closing: list[WindowAgg] = []
        streaks: list[Streak] = []
        updates: list[tuple[str, ScopeState]] = []
        for key in due.pop_due(watermark):
            value = store.get(key)
            if value is None:
                continue
            if _kind_of(key) == _SEEN:
                if watermark >= value["t"] + config.grace_ms + config.retention_ms:
                    del store[key]
                else:
                    due.schedule(key, value["t"] + config.grace_ms + config.retention_ms)
                continue
            state = ScopeState.from_dict(value)
            closed = state.closed(watermark, config.grace_ms)
            run = state.run
            if run is not None:
                run, found = run.finalize(watermark, config.grace_ms, config.angry_streak)
                streaks.extend(found)
                if run.expired(watermark, config.grace_ms, config.retention_ms):
                    run = None
            new = replace(state.without(closed), run=run)
            closing.extend(closed)
            if new != state:
                updates.append((key, new))
            else:
                self._schedule(due, key, state)
        if closing or streaks:
            for window in closing:
                await self.outputs.send_aggregate(window.aggregate_id, window.record())
            for streak in streaks:
                alert = streak.alert(config.angry_streak)
                await self.outputs.send_alert(alert["alert_id"], alert)
                log.info("alert %s: %s", alert["alert_id"], alert["message"])
            await self.outputs.flush()  # outputs durable before the state that says they were sent
        for key, new in updates:
            if new.due(config.grace_ms, config.retention_ms) is None:
                del store[key]
            else:
                store[key] = new.to_dict()
                self._schedule(due, key, new)

    def _index(self, partition: int) -> _Due:
        """The partition's due heap, rebuilt from the table on first use after a start or rebalance."""
        due = self._due.get(partition)
        if due is not None:
            return due
        due = self._due[partition] = _Due()
        config = self.config
        prefix = f"{partition}:"
        entries = 0
        for key in [k for k in self.store.keys() if isinstance(k, str) and k.startswith(prefix)]:
            value = self.store.get(key)
            if value is None:
                continue
            kind = _kind_of(key)
            if kind == _SCOPE:
                self._schedule(due, key, ScopeState.from_dict(value))
            elif kind == _SEEN:
                due.schedule(key, int(value["t"]) + config.grace_ms + config.retention_ms)
            entries += 1
        if entries:
            log.info("partition %d: %d state entries restored, watermark %s", partition, entries,
                     self.watermark(partition))
        return due


@dataclass
class LaneTracker:
    """The router's view of its lanes (results-topic partitions): next offset to process and largest event
    time per lane, and what was last reported, so heartbeats go out only when something changed."""

    next_offset: dict[int, int] = field(default_factory=dict)
    max_t: dict[int, int] = field(default_factory=dict)
    reported: dict[int, tuple[int | None, bool]] = field(default_factory=dict)

    def saw(self, lane: int, offset: int, t: int | None) -> None:
        """Call after everything the message at ``offset`` caused was sent."""
        self.next_offset[lane] = max(offset + 1, self.next_offset.get(lane, 0))
        if t is not None:
            self.max_t[lane] = max(t, self.max_t.get(lane, t))

    def report(self, lane: int, highwater: int, committed: int | None) -> tuple[int | None, bool] | None:
        """``(max event time, idle)`` to broadcast for ``lane``, or None when unchanged since the last report.
        Idle = everything up to ``highwater`` (the log end from the last fetch) was processed."""
        processed = max(self.next_offset.get(lane, 0), committed or 0)
        state = (self.max_t.get(lane), processed >= highwater)
        if self.reported.get(lane) == state:
            return None
        self.reported[lane] = state
        return state

    def busy(self, lane: int) -> tuple[int | None, bool]:
        """Report ``lane`` as busy now (newly assigned: not read to its end yet)."""
        state = self.reported[lane] = (self.max_t.get(lane), False)
        return state

    def forget_reports(self) -> None:
        self.reported.clear()


# ------------------------------------------------------------------------------------ the faust app


def _broker_urls(bootstrap_servers: str) -> list[str]:
    return [f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server.strip()]


def log_end_offsets(client_config: dict[str, Any], hints: dict[tuple[str, int], int],
                    timeout: float = 10.0) -> dict[tuple[str, int], int]:
    """The true end offset of each partition, read from fetch responses (the end-of-partition event).

    ``hints`` are end offsets from ListOffsets, which some Kafka-compatible brokers (Tansu, the embedded
    broker) answer with the start of the last batch + 1 rather than the log end; reading starts one before
    the hint. A partition that does not answer in time keeps its hint.
    """

    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer(client_config | {"group.id": "emofleet-log-end-probe", "enable.auto.commit": False,
                                         "enable.partition.eof": True, "fetch.wait.max.ms": 10, "log_level": 0})
    ends: dict[tuple[str, int], int] = {}
    try:
        consumer.assign([TopicPartition(topic, partition, max(hint - 1, 0))
                         for (topic, partition), hint in hints.items()])
        deadline = time.monotonic() + timeout
        while len(ends) < len(hints) and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=0.2):
                error = message.error()
                if error is not None and error.code() == KafkaError._PARTITION_EOF:
                    ends[(message.topic(), message.partition())] = message.offset()
    finally:
        consumer.close()
    return {tp: max(hint, ends.get(tp, hint)) for tp, hint in hints.items()}


def _recover_to_the_log_end(app: Any, client_config: dict[str, Any]) -> None:
    """Make faust's table recovery read each changelog partition to its true end.

    Faust stops recovering a partition at the end offset ListOffsets reports. On brokers that report the
    start of the last batch instead (Tansu), the rest of that batch would never be applied and the restored
    state would miss the newest writes. Real Kafka reports the true end, and this changes nothing there.
    """
    import asyncio

    recovery = app.tables.recovery
    build_highwaters = recovery._build_highwaters

    async def _build_highwaters(consumer: Any, tps: Any, destination: Any, title: str) -> None:
        await build_highwaters(consumer, tps, destination, title)  # faust stores end - 1 (the last offset)
        hints = {(tp.topic, tp.partition): destination[tp] + 1 for tp in tps}
        if not hints:
            return
        ends = await asyncio.to_thread(log_end_offsets, client_config, hints)
        for tp in tps:
            true_last = ends[(tp.topic, tp.partition)] - 1
            if true_last != destination[tp]:
                log.info("changelog %s[%d]: recovering to offset %d (the broker reported %d)", tp.topic,
                         tp.partition, true_last, destination[tp])
                destination[tp] = true_last

    recovery._build_highwaters = _build_highwaters


def build_app(settings: Settings, lanes: int | None = None, metrics: Metrics | None = None) -> Any:
    """The faust app for these settings (nothing global): topics, the state table, both agents.

    ``lanes`` is the partition count of the results topic (default ``settings.kafka.partitions``);
    ``metrics`` a :class:`emofleet.core.metrics.Metrics` to report into (default: a new one).
    """
    import faust

    from emofleet.schemas.codec import SchemaError, make_codec
    from emofleet.streams.aiokafka_config import aiokafka_options, broker_credentials

    metrics = metrics or Metrics("aggregator")

    kafka, agg = settings.kafka, settings.aggregate
    config = AggregateConfig.from_settings(agg, lanes or kafka.partitions)
    client = aiokafka_options(kafka)
    codec = make_codec(kafka.schema_registry_url, kafka.registry_config)
    data_dir = (settings.data_dir / "aggregator" / agg.app_id).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        agg.app_id,
        broker=_broker_urls(kafka.bootstrap_servers),
        broker_credentials=broker_credentials(client),
        broker_client_id=client.client_id or None,
        processing_guarantee="at_least_once",
        store="memory://",
        datadir=str(data_dir),
        autodiscover=False,
        web_enabled=agg.web_port > 0,
        web_port=agg.web_port or 6066,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        broker_session_timeout=kafka.session_timeout_ms / 1000,
        broker_heartbeat_interval=kafka.heartbeat_interval_ms / 1000,
        broker_commit_interval=agg.commit_interval_seconds,
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        consumer_auto_offset_reset="earliest",
        # aiokafka sends LeaveGroup on stop unless the member is static; where LeaveGroup is unsafe (Tansu,
        # see streams/consumer.py let_go) the worker is a static member named after its app and host.
        consumer_group_instance_id=None if kafka.leave_group_on_close else f"{agg.app_id}@{socket.gethostname()}",
        key_serializer="raw",
        value_serializer="raw",
    )
    results = app.topic(kafka.results_topic, key_type=bytes, value_type=bytes)
    scopes = app.topic(scope_topic(settings), partitions=kafka.partitions, value_serializer="json")
    aggregates = app.topic(kafka.aggregates_topic)
    alerts = app.topic(kafka.alerts_topic)
    table = app.Table(TABLE_NAME, partitions=kafka.partitions,
                      schema=faust.Schema(key_serializer="json", value_serializer="json"))

    async def send_aggregate(key: str, record: dict[str, Any]) -> None:
        value = codec.encode("emotion_aggregate", record, topic=kafka.aggregates_topic)
        await aggregates.send(key=key.encode(), value=value)
        metrics.messages_out.labels(kafka.aggregates_topic).inc()

    async def send_alert(key: str, record: dict[str, Any]) -> None:
        value = codec.encode("emotion_alert", record, topic=kafka.alerts_topic)
        await alerts.send(key=key.encode(), value=value)
        metrics.messages_out.labels(kafka.alerts_topic).inc()

    async def flush() -> None:
        with metrics.time_stage("flush"):
            await app.producer.flush()

    async def send_scope(key: bytes | None, value: dict[str, Any], partition: int | None = None) -> None:
        await scopes.send(key=key, value=value, partition=partition)
        metrics.messages_out.labels(scope_topic(settings)).inc()

    _recover_to_the_log_end(app, kafka.client_config())
    aggregator = ScopeAggregator(table, config, Outputs(send_aggregate, send_alert, flush), metrics)

    tracker = LaneTracker()

    @app.agent(results, name="route")
    async def route(stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            metrics.messages_in.labels(message.topic).inc()
            try:
                record = codec.decode("emotion_event", event.value, topic=kafka.results_topic)
            except SchemaError as error:
                metrics.errors.labels(error.reason).inc()
                log.warning("skipping undecodable result at %s[%d]@%d: %s", message.topic, message.partition,
                            message.offset, error)
                tracker.saw(message.partition, message.offset, None)
                continue
            for obs in observations(record, lane=message.partition):
                await send_scope(obs.scope.key.encode(), obs.to_dict())
            tracker.saw(message.partition, message.offset, int(record["reference_produced_at"]))

    @app.timer(interval=HEARTBEAT_SECONDS)
    async def heartbeats() -> None:
        """Tell every aggregator partition how far each of our lanes is, and whether it is idle."""
        consumer = app.consumer
        try:
            assignment = sorted(tp for tp in consumer.assignment() if tp.topic == kafka.results_topic)
            highwaters = {tp: consumer.highwater(tp) for tp in assignment}
        except Exception:  # noqa: BLE001 - consumer not started or rebalancing: next tick
            return
        committed = getattr(consumer, "_committed_offset", {})  # where faust resumed each partition
        for tp in assignment:
            highwater = highwaters[tp]
            if highwater is None:
                continue
            report = tracker.report(tp.partition, highwater, committed.get(tp))
            if report is None:
                continue
            value = {"heartbeat": {"lane": tp.partition, "t": report[0], "idle": report[1]}}
            for partition in range(kafka.partitions):
                await send_scope(None, value, partition)

    @app.agent(scopes, name="aggregate")
    async def aggregate(stream: Any) -> None:
        async for event in stream.events():
            metrics.messages_in.labels(event.message.topic).inc()
            value = event.value
            if "heartbeat" in value:
                beat = value["heartbeat"]
                await aggregator.heartbeat(event.message.partition, int(beat["lane"]), beat["t"], bool(beat["idle"]))
            else:
                await aggregator.handle(event.message.partition, Observation.from_dict(value))

    @app.on_partitions_revoked.connect
    async def on_revoked(*_args: Any, **_kwargs: Any) -> None:
        aggregator.forget()
        tracker.forget_reports()

    @app.on_partitions_assigned.connect
    async def on_assigned(_sender: Any, assigned: Any = (), **_kwargs: Any) -> None:
        aggregator.forget()
        tracker.forget_reports()
        # Our lanes are busy until we have read them to their end. Said before we route anything, so an
        # aggregator partition cannot take an idle flag from before a restart or rebalance for granted
        # while this lane's backlog is still on its way (the watermark would run ahead of it).
        lanes = sorted(tp for tp in assigned if tp.topic == kafka.results_topic)
        if lanes:
            log.info("routing lanes %s (busy until read to their end)", [tp.partition for tp in lanes])
        for tp in lanes:
            state = tracker.busy(tp.partition)
            value = {"heartbeat": {"lane": tp.partition, "t": state[0], "idle": False}}
            for partition in range(kafka.partitions):
                await send_scope(None, value, partition)

    @app.timer(interval=1.0)
    async def observe() -> None:
        """Liveness and assigned partitions for /healthz, /readyz and /metrics (from faust's event loop)."""
        metrics.heartbeat()
        try:
            metrics.set_assigned(len(app.consumer.assignment()))
        except Exception:  # noqa: BLE001 - consumer not started yet
            pass

    @app.timer(interval=10.0)
    async def report() -> None:
        log.info("aggregate stats: %s", stats_line(metrics, kafka))

    @app.on_before_shutdown.connect
    async def final_report(*_args: Any, **_kwargs: Any) -> None:
        log.info("aggregate stats: %s", stats_line(metrics, kafka))

    return app


def run_aggregator(settings: Settings) -> int:
    """Create the topics, then run one faust worker until SIGTERM/SIGINT (commit on the way out)."""
    import faust
    from confluent_kafka.admin import AdminClient

    from emofleet.streams.topics import ensure_topics

    from aiokafka.codec import has_lz4

    if not has_lz4():
        log.error("aiokafka cannot decompress lz4, the compression the processors publish with: install cramjam "
                  "(aiokafka's codec library, `pip install cramjam`)")
        return 2
    from emofleet.streams.aiokafka_config import aiokafka_options, broker_credentials

    log.info("starting aggregator with settings %s", json.dumps(describe(settings)))
    AggregateConfig.from_settings(settings.aggregate)  # bad window settings fail before anything starts
    broker_credentials(aiokafka_options(settings.kafka))  # ... and client properties aiokafka cannot honour
    admin = AdminClient(settings.kafka.client_config())
    topics = {status.name: status.partitions for status in ensure_topics(admin, aggregator_topics(settings))}
    if topics[scope_topic(settings)] != topics[changelog_topic(settings)]:
        raise RuntimeError(f"{scope_topic(settings)} and {changelog_topic(settings)} must have the same partition "
                           f"count (they have {topics[scope_topic(settings)]} and {topics[changelog_topic(settings)]})")
    from emofleet.core.metrics import aggregator_health, serve

    metrics = Metrics("aggregator")
    server = serve(settings.observability, metrics,  # None when metrics_port is 0
                   aggregator_health(metrics, settings.kafka.client_config(), settings.observability))
    app = build_app(settings, lanes=topics[settings.kafka.results_topic], metrics=metrics)
    log.info("aggregate: %s -> %s + %s (app %s)", settings.kafka.results_topic, settings.kafka.aggregates_topic,
             settings.kafka.alerts_topic, settings.aggregate.app_id)
    # override_logging=False: keep the root handler emofleet configured (--log-format, secret masking). faust's
    # own logging setup would also have dropped its terminal spinner, which writes control codes to stdout.
    worker = faust.Worker(app, quiet=True, redirect_stdouts=False, override_logging=False)
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        if server:
            server.stop()
    return 0
