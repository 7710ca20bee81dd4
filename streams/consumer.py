"""The consumer loop: polls on one thread, hands messages to a processing strategy running elsewhere.

Design (after Sentry's Arroyo):
- The poll thread owns the Consumer. It never runs inference, so heartbeats and rebalances go on
  however slow a batch is, and max.poll.interval.ms is never exceeded.
- The strategy reports each message back exactly once, as finished (outputs delivered) or dropped.
  Offsets are stored only over a finished prefix (see offsets.py) and committed about once per
  ``commit_interval_seconds``, and synchronously on revoke and shutdown.
- Backpressure: when ``max_in_flight`` messages are unsettled the loop pauses its partitions but
  keeps polling; it resumes them once half the work drained.
- Revoke (cooperative-sticky, so only the moving partitions): the strategy drops queued work of those
  partitions, in-progress work gets ``revoke_grace_seconds`` to finish, the finished prefix is
  committed, and the rest is redelivered to the partition's next owner.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from emofleet.core.config import BatchSettings, KafkaSettings
from emofleet.core.logs import kafka_logger
from emofleet.core.metrics import CommitTimer, LagMonitor, Metrics
from emofleet.streams.offsets import OffsetTracker
from emofleet.streams.offsets import TopicPartition as TP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settled:
    """A strategy's report on one message."""

    tp: TP
    offset: int
    finished: bool  # False: dropped unfinished (revoked or shutting down); never committed past


class Reporter(Protocol):
    def __call__(self, tp: TP, offset: int, *, finished: bool) -> None: ...


class Strategy(Protocol):
    """What the loop drives. Every submitted message must be reported exactly once via the reporter."""

    def submit(self, message: Message, generation: int) -> None:
        """Take one message; must not block the poll thread for long."""

    def revoke(self, partitions: set[TP]) -> None:
        """Drop queued work of these partitions (report it dropped); in-progress work may finish."""

    def close(self, timeout: float) -> None:
        """Stop: finish in-progress work, drop the rest, flush outputs."""

    def failure(self) -> BaseException | None:
        """A fatal error in the strategy (the loop then stops without committing past it)."""


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
    def __init__(self, config: dict[str, Any], topics: list[str],
                 strategy_factory: Callable[[Reporter, Callable[[TP, int], bool]], Strategy],
                 batch: BatchSettings, *, metrics: Metrics | None = None, lag_interval: float = 5.0,
                 leave_group: bool = True) -> None:
        self.metrics = metrics or Metrics("processor")
        self._commit_timer = CommitTimer(self.metrics)
        self._consumer = Consumer(config | {"on_commit": self._commit_timer.on_commit})
        self._lag = LagMonitor(self._consumer, self.metrics.consumer_lag, lag_interval)
        self._topics = topics
        self._leave_group = leave_group
        self._batch = batch
        self._settled: queue.SimpleQueue[Settled] = queue.SimpleQueue()
        self._tracker = OffsetTracker()
        self._generations: dict[TP, int] = {}
        self._generation_counter = 0
        self._paused = False
        self._stop = threading.Event()
        self._last_commit = time.monotonic()
        self.strategy = strategy_factory(self._report, self.is_current)
        self.assigned: set[TP] = set()
        self._peak_in_flight = 0  # behind the in_flight_peak gauge

    # ------------------------------------------------------------ called from worker threads

    def _report(self, tp: TP, offset: int, *, finished: bool) -> None:
        self._settled.put(Settled(tp, offset, finished))

    def is_current(self, tp: TP, generation: int) -> bool:
        """True while the partition is still assigned under the generation the work was submitted in."""
        return self._generations.get(tp) == generation

    def stop(self) -> None:
        """Ask the loop to finish (signal-safe)."""
        self._stop.set()

    # ------------------------------------------------------------ poll thread

    def run(self) -> None:
        self._consumer.subscribe(self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)
        try:
            while not self._stop.is_set():
                if (failure := self.strategy.failure()) is not None:
                    raise failure
                self._poll_once()
        finally:
            self._shutdown()

    def _poll_once(self) -> None:
        # At the bound this still asks for one message: consume() is also what serves heartbeats and
        # rebalance callbacks, and the partitions are paused by then, so at most prefetched ones come.
        room = max(1, self._batch.max_in_flight - self._tracker.in_flight())
        for message in self._consumer.consume(num_messages=min(room, 500), timeout=0.1):
            self._accept(message)
        self._drain_settled()
        self._apply_backpressure()
        if time.monotonic() - self._last_commit >= self._batch.commit_interval_seconds:
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
        generation = self._generations.get(tp)
        if generation is None:  # arrived for a partition revoked meanwhile
            return
        self.metrics.messages_in.labels(tp[0]).inc()
        self._tracker.consumed(tp, message.offset())
        self._record_peak(self._tracker.in_flight())
        self.strategy.submit(message, generation)

    def _record_peak(self, in_flight: int) -> None:
        if in_flight > self._peak_in_flight:
            self._peak_in_flight = in_flight
            self.metrics.in_flight_peak.set(in_flight)

    def _drain_settled(self, timeout: float = 0.0) -> None:
        try:
            item = self._settled.get(timeout=timeout) if timeout > 0 else self._settled.get_nowait()
        except queue.Empty:
            return
        while True:
            if item.finished:
                self._tracker.finished(item.tp, item.offset)
            else:
                self._tracker.dropped(item.tp, item.offset)
            try:
                item = self._settled.get_nowait()
            except queue.Empty:
                return

    def _apply_backpressure(self) -> None:
        in_flight = self._tracker.in_flight()
        if not self._paused and in_flight >= self._batch.max_in_flight:
            self._set_paused(True)
        elif self._paused and in_flight <= self._batch.max_in_flight // 2:
            self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        partitions = [TopicPartition(t, p) for t, p in self.assigned]
        if partitions:
            (self._consumer.pause if paused else self._consumer.resume)(partitions)
        self._paused = paused
        if paused:
            self.metrics.backpressure_pauses.inc()

    @property
    def paused(self) -> bool:
        return self._paused

    def in_flight(self) -> int:
        return self._tracker.in_flight()

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
            if error.args[0].code() != KafkaError._NO_OFFSET:
                self.metrics.commit_failures.inc()
                log.warning("commit failed (will retry): %s", error.args[0].str())
            return
        if not asynchronous:
            self.metrics.commit_seconds.labels("sync").observe(time.perf_counter() - started)
        self._lag.committed(offsets)
        self._tracker.mark_committed(offsets)

    # ------------------------------------------------------------ rebalance callbacks (poll thread)

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("assign").inc()
        for partition in partitions:
            tp = (partition.topic, partition.partition)
            self._generation_counter += 1
            self._generations[tp] = self._generation_counter
            self.assigned.add(tp)
        if self._paused and partitions:
            self._consumer.pause(partitions)
        log.info("assigned %s", sorted(f"{t}[{p}]" for t, p in self.assigned))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, commit=True)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, commit=False)

    def _release(self, partitions: list[TopicPartition], *, commit: bool) -> None:
        self.metrics.rebalances.labels("revoke" if commit else "lost").inc()
        revoked = {(p.topic, p.partition) for p in partitions}
        for tp in revoked:
            self._generations.pop(tp, None)
        self.strategy.revoke(revoked)
        self._wait_settled(revoked, self._batch.revoke_grace_seconds)
        if commit:
            self._commit(asynchronous=False, partitions=list(revoked))
        self._tracker.forget(list(revoked))
        self._lag.forget(revoked)
        self.assigned -= revoked
        log.info("revoked %s", sorted(f"{t}[{p}]" for t, p in revoked))

    def _wait_settled(self, partitions: set[TP], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(self._tracker.unsettled(tp) for tp in partitions) and time.monotonic() < deadline:
            self._drain_settled(timeout=min(0.05, max(0.0, deadline - time.monotonic())))

    # ------------------------------------------------------------ shutdown

    def _shutdown(self) -> None:
        try:
            self.strategy.close(self._batch.revoke_grace_seconds)
            self._wait_settled(set(self.assigned), 1.0)
            self._drain_settled()
            self._commit(asynchronous=False)
        finally:
            # close() runs the revoke callbacks, which need the loop intact; then the last references go
            let_go(self._consumer, leave_group=self._leave_group)
            self._consumer = self._lag = None  # type: ignore[assignment]
