"""The consumer loop: one poll thread, one processing contract, the commit policy in one place.

Everything that consumes with a group (the processor, the ClickHouse sink) runs on :class:`ConsumerLoop`
and differs only in its :class:`Strategy`, after Sentry's Arroyo:

- **A fresh strategy per assignment.** The loop asks a factory for a strategy over the partitions it owns
  (``factory(partitions, report)``). When the assignment changes (partitions assigned, revoked or lost, or a
  partition's log restarted under us), the current strategy is joined (``join(timeout)``: finish what it
  holds, for at most ``join_timeout_seconds``) and closed (``close()``: what is left is reported dropped),
  the finished prefix is committed, partitions kept but holding dropped work are rewound to their first
  unfinished offset, and a new strategy takes over. A strategy therefore never sees its partitions change,
  and a report from a closed strategy is ignored (each strategy reports under its own generation). Messages
  the old strategy finished past the first unfinished one are not submitted again when the rewind re-reads
  them (their outputs are out already); they just count as finished.
- **Submit / poll / join / close.** ``submit`` takes one message without blocking for long; ``poll`` runs on
  the poll thread once per turn for due work (the sink's inserts) and raises the strategy's fatal error;
  every submitted message is reported exactly once, ``finished`` (its outputs are delivered) or dropped.
- **Backpressure is one signal.** A strategy that cannot take a message raises :class:`MessageRejected`, and
  the loop itself refuses when ``max_in_flight`` messages are unsettled. Either way the loop holds that
  message, pauses every partition and keeps polling (heartbeats, rebalances); anything still delivered
  meanwhile is rewound to be read again. The held message is offered again each turn (for the in-flight
  bound once half the work drained) and the partitions resume when it is taken.
- **Commits** (here only): offsets are stored over a finished prefix per partition (see offsets.py), committed
  about every ``commit_interval_seconds``, and synchronously on every assignment change and on a clean stop.
  A loop that stops on an error commits nothing more: the next owner replays, and outputs are idempotent.
- The poll thread never runs the strategy's slow work (the processor's inference runs on its own threads;
  the sink's inserts are bounded by ClickHouse's timeouts), so max.poll.interval.ms is never exceeded.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from emofleet.core.config import KafkaSettings
from emofleet.core.logs import kafka_logger
from emofleet.core.metrics import CommitTimer, LagMonitor, Metrics
from emofleet.streams.offsets import OffsetTracker
from emofleet.streams.offsets import TopicPartition as TP

log = logging.getLogger(__name__)


class MessageRejected(Exception):
    """Raised by :meth:`Strategy.submit`: the strategy cannot take the message now (backpressure)."""


class Reporter(Protocol):
    def __call__(self, tp: TP, offset: int, *, finished: bool) -> None: ...


class Strategy(Protocol):
    """What the loop drives, over a fixed set of partitions. Every submitted message is reported exactly
    once through the reporter the factory was given (from any thread)."""

    def submit(self, message: Message) -> None:
        """Take one message, or raise :class:`MessageRejected`; must not block the poll thread for long."""

    def poll(self) -> None:
        """Due work on the poll thread, once per turn; raises the strategy's fatal error."""

    def join(self, timeout: float) -> None:
        """Finish what was submitted, within ``timeout`` seconds; no more messages come."""

    def close(self) -> None:
        """Stop: report everything unfinished dropped, release what the strategy holds."""


StrategyFactory = Callable[[frozenset[TP], Reporter], Strategy]


@dataclass(frozen=True)
class LoopLimits:
    max_in_flight: int  # unsettled messages before the loop holds back
    commit_interval_seconds: float
    join_timeout_seconds: float  # how long a strategy may finish its work when the assignment changes
    poll_batch: int = 500  # messages asked of the consumer per turn


@dataclass(frozen=True)
class Settled:
    """A strategy's report on one message."""

    generation: int  # of the strategy that reported it
    tp: TP
    offset: int
    finished: bool  # False: dropped unfinished; never committed past


def consumer_config(kafka: KafkaSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    config = kafka.client_config() | {
        "group.id": group_id,
        "partition.assignment.strategy": "cooperative-sticky",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": kafka.session_timeout_ms,
        "heartbeat.interval.ms": kafka.heartbeat_interval_ms,
        "max.poll.interval.ms": kafka.max_poll_interval_ms,
        "queued.max.messages.kbytes": 16_384,
        # An idle long poll returns after this at the latest; librdkafka's 500 ms default delays the
        # first message on brokers that hold empty fetches for the full wait (Tansu does).
        "fetch.wait.max.ms": 100,
        "logger": kafka_logger(),
    }
    if kafka.group_instance_id:
        config["group.instance.id"] = kafka.group_instance_id
    return config | overrides


def let_go(consumer: Consumer, *, leave_group: bool) -> None:
    """End a consumer after its last commit; the caller then drops the last references to it at once.

    With ``leave_group`` it closes (LeaveGroup: the group rebalances at once). Without, the handle is
    destroyed when its last reference goes, without the consumer close (confluent-kafka's destructor skips
    it), and the coordinator evicts the member after session.timeout.ms: the one safe way to leave a Tansu
    group, whose coordinator keeps a departed leader forever when it leaves mid-rebalance
    (tests/test_tansu_group.py).
    """
    if leave_group:
        consumer.close()


class ConsumerLoop:
    def __init__(self, config: dict[str, Any], topics: list[str], factory: StrategyFactory, limits: LoopLimits, *,
                 metrics: Metrics, lag_interval: float = 5.0, leave_group: bool = True) -> None:
        self.metrics = metrics
        self._commit_timer = CommitTimer(metrics)
        self._consumer = Consumer(config | {"on_commit": self._commit_timer.on_commit})
        self._lag = LagMonitor(self._consumer, metrics.consumer_lag, lag_interval)
        self._topics = topics
        self._factory = factory
        self._limits = limits
        self._leave_group = leave_group
        self._settled: queue.SimpleQueue[Settled] = queue.SimpleQueue()
        self._tracker = OffsetTracker()
        self._last_offset: dict[TP, int] = {}  # of the last message taken per partition
        self._done: dict[TP, set[int]] = {}  # finished before a rewind: not submitted again when re-read
        self._strategy: Strategy | None = None
        self._generation = 0
        self._held: Message | None = None  # a message offered but not taken (backpressure)
        self._rewound: set[TP] = set()  # partitions rewound while holding
        self._paused = False
        self._stop = threading.Event()
        self._last_commit = time.monotonic()
        self._peak_in_flight = 0  # behind the in_flight_peak gauge
        self.assigned: set[TP] = set()

    def stop(self) -> None:
        """Ask the loop to finish (signal-safe)."""
        self._stop.set()

    @property
    def paused(self) -> bool:
        return self._paused

    def in_flight(self) -> int:
        return self._tracker.in_flight()

    # ------------------------------------------------------------ poll thread

    def run(self) -> None:
        self._consumer.subscribe(self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)
        clean = False
        try:
            while not self._stop.is_set():
                self._turn()
            clean = True
        finally:
            self._shutdown(clean=clean)

    def _turn(self) -> None:
        # Near the bound this still asks for one message: consume() is also what serves heartbeats and
        # rebalance callbacks.
        room = max(1, min(self._limits.poll_batch, self._limits.max_in_flight - self._tracker.in_flight()))
        # While holding, the partitions are paused and nothing comes: a short wait, so the held message is offered
        # again as soon as work drains rather than a whole poll timeout later.
        timeout = 0.005 if self._held is not None else 0.1
        for message in self._consumer.consume(num_messages=room, timeout=timeout):
            self._accept(message)
        self._drain_settled()
        if self._strategy is not None:
            self._strategy.poll()
        self._drain_settled()
        if self._held is not None:
            self._offer_held()
        if time.monotonic() - self._last_commit >= self._limits.commit_interval_seconds:
            self._commit(asynchronous=True)
        self._observe()

    def _observe(self) -> None:
        """Gauges, lag and the liveness heartbeat, once per turn of the loop."""
        metrics = self.metrics
        metrics.heartbeat()
        metrics.in_flight.set(self._tracker.in_flight())
        metrics.set_assigned(len(self.assigned))
        metrics.paused_partitions.set(len(self.assigned) if self._paused else 0)
        self._lag.update(self.assigned)

    def _accept(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            if error.fatal():
                raise KafkaException(error)
            self.metrics.errors.labels("consumer").inc()
            log.warning("consumer error: %s", error.str())
            return
        tp = (message.topic(), message.partition())
        if tp not in self.assigned:  # arrived for a partition revoked meanwhile
            return
        if self._held is not None:
            self._rewind(message)
            return
        self.metrics.messages_in.labels(tp[0]).inc()
        if message.offset() <= self._last_offset.get(tp, -1):
            self._restart_partition(tp, message.offset())
        if message.offset() in self._done.get(tp, ()):
            self._pass_finished(tp, message.offset())
            return
        self._offer(message)

    def _pass_finished(self, tp: TP, offset: int) -> None:
        """A message re-read after a rewind whose outputs an earlier strategy already delivered: it counts as
        finished without being processed again (its results are not duplicated)."""
        self._done[tp].discard(offset)
        self._tracker.consumed(tp, offset)
        self._tracker.finished(tp, offset)
        self._last_offset[tp] = offset

    def _offer(self, message: Message) -> bool:
        """Submit, or hold the message and pause (backpressure); True when the strategy took it."""
        bound = self._limits.max_in_flight // 2 if self._paused else self._limits.max_in_flight
        taken = self._tracker.in_flight() < max(1, bound) and self._submit(message)
        if not taken:
            self._hold(message)
        return taken

    def _submit(self, message: Message) -> bool:
        assert self._strategy is not None
        try:
            self._strategy.submit(message)
        except MessageRejected:
            return False
        tp = (message.topic(), message.partition())
        self._tracker.consumed(tp, message.offset())
        self._last_offset[tp] = message.offset()
        self._record_peak(self._tracker.in_flight())
        return True

    def _hold(self, message: Message) -> None:
        self._held = message
        if not self._paused:
            self._set_paused(True)

    def _offer_held(self) -> None:
        held, self._held = self._held, None
        assert held is not None
        if self._offer(held):
            self._rewound.clear()
            self._set_paused(False)

    def _rewind(self, message: Message) -> None:
        """A message delivered while holding: seek its partition back to it (paused), to read it again."""
        tp = (message.topic(), message.partition())
        if tp not in self._rewound:
            self._rewound.add(tp)
            self._consumer.seek(TopicPartition(tp[0], tp[1], message.offset()))

    def _record_peak(self, in_flight: int) -> None:
        if in_flight > self._peak_in_flight:
            self._peak_in_flight = in_flight
            self.metrics.in_flight_peak.set(in_flight)

    def _report(self, generation: int, tp: TP, offset: int, *, finished: bool) -> None:
        self._settled.put(Settled(generation, tp, offset, finished))  # any thread

    def _drain_settled(self) -> None:
        while True:
            try:
                item = self._settled.get_nowait()
            except queue.Empty:
                return
            if item.generation != self._generation:
                continue  # from a strategy already closed: its partitions were rewound or given away
            if item.finished:
                self._tracker.finished(item.tp, item.offset)
            else:
                self._tracker.dropped(item.tp, item.offset)

    def _set_paused(self, paused: bool) -> None:
        partitions = [TopicPartition(t, p) for t, p in self.assigned]
        if partitions:
            (self._consumer.pause if paused else self._consumer.resume)(partitions)
        if paused:
            self.metrics.backpressure_pauses.inc()
        self._paused = paused

    def _commit(self, *, asynchronous: bool, partitions: list[TP] | None = None) -> None:
        self._last_commit = time.monotonic()
        offsets = self._tracker.to_commit(partitions)
        if not offsets:
            return
        started = time.perf_counter()
        if asynchronous:
            self._commit_timer.requested(offsets)  # timed until the broker answers (on_commit)
        try:
            self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                  asynchronous=asynchronous)
        except KafkaException as error:
            if error.args[0].fatal():
                raise
            if error.args[0].code() != KafkaError._NO_OFFSET:
                # e.g. UNKNOWN_MEMBER_ID after a broker restart: the work is done and its outputs are
                # idempotent, so whoever reads it again just repeats it
                self.metrics.commit_failures.inc()
                log.warning("commit failed (will retry): %s", error.args[0].str())
            return
        if not asynchronous:
            self.metrics.commit_seconds.labels("sync").observe(time.perf_counter() - started)
        self._lag.committed(offsets)
        self._tracker.mark_committed(offsets)

    # ------------------------------------------------------------ assignment changes (poll thread)

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("assign").inc()
        added = {(p.topic, p.partition) for p in partitions}
        self._replace_strategy(kept=set(self.assigned), gone=set())
        self.assigned |= added
        if self._paused and partitions:
            self._consumer.pause(partitions)
        self._start_strategy()
        log.info("assigned %s", sorted(f"{t}[{p}]" for t, p in self.assigned))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release({(p.topic, p.partition) for p in partitions}, lost=False)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release({(p.topic, p.partition) for p in partitions}, lost=True)

    def _release(self, gone: set[TP], *, lost: bool) -> None:
        self.metrics.rebalances.labels("lost" if lost else "revoke").inc()
        self._replace_strategy(kept=self.assigned - gone, gone=set() if lost else gone, forget=gone if lost else set())
        self.assigned -= gone
        self._lag.forget(gone)
        self._start_strategy()
        log.info("revoked %s", sorted(f"{t}[{p}]" for t, p in gone))

    def _restart_partition(self, tp: TP, offset: int) -> None:
        """Offsets went back within one assignment: the broker serves a new log (topic recreated, memory storage
        restarted) before the group noticed. What was tracked for the old log is forgotten uncommitted (its
        offsets mean nothing in the new one) and a fresh strategy starts (the sink then asks for the log's id)."""
        log.warning("offsets of %s[%d] went back to %d: the partition has a new log; reading it from there",
                    tp[0], tp[1], offset)
        self._replace_strategy(kept=self.assigned - {tp}, gone=set(), forget={tp})
        self._start_strategy()

    def _replace_strategy(self, *, kept: set[TP], gone: set[TP], forget: frozenset[TP] | set[TP] = frozenset()) -> None:
        """End the current strategy: join it, close it, commit the finished prefix of ``kept`` and ``gone``,
        forget ``forget`` uncommitted, and rewind the kept partitions whose work was dropped."""
        for tp in forget:
            self._tracker.forget([tp])
            self._last_offset.pop(tp, None)
        if self._strategy is not None:
            self._strategy.join(self._limits.join_timeout_seconds)
            self._strategy.close()
            self._strategy = None
        self._drain_settled()
        self._generation += 1  # later reports of the closed strategy are ignored
        held, self._held = self._held, None
        self._rewound.clear()
        self._commit(asynchronous=False, partitions=sorted(kept | gone))
        rewind = {tp: offset for tp in kept if (offset := self._tracker.first_unfinished(tp)) is not None}
        if held is not None and (tp := (held.topic(), held.partition())) in kept:
            rewind.setdefault(tp, held.offset())
        for tp, offset in rewind.items():
            self._consumer.seek(TopicPartition(tp[0], tp[1], offset))
            self._done[tp] = self._done.get(tp, set()) | self._tracker.finished_beyond_commit(tp)
        self._tracker.forget(list(kept | gone))
        for tp in kept | gone:
            self._last_offset.pop(tp, None)
        for tp in (gone | set(forget)) - kept:
            self._done.pop(tp, None)
        if self._paused:
            self._set_paused(False)

    def _start_strategy(self) -> None:
        if self.assigned:
            self._strategy = self._factory(frozenset(self.assigned), functools.partial(self._report, self._generation))

    # ------------------------------------------------------------ shutdown

    def _shutdown(self, *, clean: bool) -> None:
        try:
            if self._strategy is not None:
                if clean:
                    self._strategy.join(self._limits.join_timeout_seconds)
                self._strategy.close()
                self._drain_settled()
            if clean:
                self._commit(asynchronous=False)
            else:  # nothing more is committed, not even by the revoke callbacks a closing consumer runs
                self._tracker.forget(list(self.assigned))
        finally:
            # close() runs the revoke callbacks, which need the loop intact; then the last references go
            self._strategy = None
            let_go(self._consumer, leave_group=self._leave_group)
            self._consumer = self._lag = None  # type: ignore[assignment]
