"""The consumer loop's contract, on the real broker, with strategies written here.

What any strategy (the processor's, the sink's) relies on: a fresh strategy per assignment over a fixed set
of partitions; every message offered in offset order per partition; backpressure (MessageRejected or the
in-flight bound) pauses and offers the same message again, losing and reordering nothing; commits never pass
an unfinished message; work a replaced strategy could not finish is read again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from emofleet.core.config import Settings
from emofleet.core.metrics import Metrics
from emofleet.streams.consumer import ConsumerLoop, LoopLimits, MessageRejected, Reporter, consumer_config

from metrics_helpers import metric
from waiting import wait_for

TP = tuple[str, int]
PARTITIONS = 4


class Recording:
    """Strategies that record what they are given and finish it at once, except what ``hold`` says to keep
    open (never finished: dropped at close) and ``reject`` says to refuse."""

    def __init__(self, *, reject: Callable[[Message], bool] = lambda _: False,
                 hold: Callable[[Message], bool] = lambda _: False) -> None:
        self.reject = reject
        self.hold = hold
        self.created: list[frozenset[TP]] = []
        self.submitted: list[tuple[int, TP, int]] = []  # (strategy number, partition, offset)
        self.rejected = 0
        self.lock = threading.Lock()

    def __call__(self, partitions: frozenset[TP], report: Reporter) -> Any:
        with self.lock:
            self.created.append(partitions)
            number = len(self.created)
        return _Strategy(self, number, partitions, report)

    def offsets(self, tp: TP) -> list[int]:
        with self.lock:
            return [offset for _, p, offset in self.submitted if p == tp]


class _Strategy:
    def __init__(self, owner: Recording, number: int, partitions: frozenset[TP], report: Reporter) -> None:
        self.owner, self.number, self.partitions, self.report = owner, number, partitions, report
        self.open: list[TP | int] = []

    def submit(self, message: Message) -> None:
        tp = (message.topic(), message.partition())
        assert tp in self.partitions, f"{tp} is not this strategy's"
        if self.owner.reject(message):
            self.owner.rejected += 1
            raise MessageRejected
        with self.owner.lock:
            self.owner.submitted.append((self.number, tp, message.offset()))
        if self.owner.hold(message):
            self.open.append((tp, message.offset()))  # type: ignore[arg-type]
        else:
            self.report(tp, message.offset(), finished=True)

    def poll(self) -> None:
        pass

    def join(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        for tp, offset in self.open:  # type: ignore[misc]
            self.report(tp, offset, finished=False)


def make_topic(settings: Settings, count: int) -> tuple[str, dict[int, int]]:
    """A fresh topic with ``count`` messages; returns it and the number of messages per partition."""
    topic = settings.kafka.audio_topic
    admin = AdminClient(settings.kafka.client_config())
    for future in admin.create_topics([NewTopic(topic, PARTITIONS, 1)]).values():
        future.result(30)
    producer = Producer(settings.kafka.client_config())
    per_partition = dict.fromkeys(range(PARTITIONS), 0)
    for i in range(count):
        producer.produce(topic, value=str(i).encode(), partition=i % PARTITIONS)
        per_partition[i % PARTITIONS] += 1
    assert producer.flush(30) == 0
    return topic, per_partition


def committed(settings: Settings, topic: str, group: str) -> dict[int, int]:
    consumer = Consumer(settings.kafka.client_config() | {"group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        consumer.close()


@contextmanager
def running(settings: Settings, topic: str, factory: Any, *, max_in_flight: int = 1_000,
            group: str | None = None) -> Iterator[ConsumerLoop]:
    limits = LoopLimits(max_in_flight=max_in_flight, commit_interval_seconds=0.2, join_timeout_seconds=2.0,
                        poll_batch=100)
    loop = ConsumerLoop(consumer_config(settings.kafka, group or settings.kafka.processor_group), [topic], factory,
                        limits, metrics=Metrics("processor"), leave_group=settings.kafka.leave_group_on_close)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            loop.run()
        except BaseException as error:  # noqa: BLE001 - surfaced below
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.stop()
        thread.join(30)
        assert not thread.is_alive() and errors == []


def test_every_message_once_in_order_and_commits_reach_the_end(settings: Settings) -> None:
    topic, counts = make_topic(settings, 400)
    strategies = Recording()
    with running(settings, topic, strategies) as loop:
        wait_for(lambda: committed(settings, topic, settings.kafka.processor_group) == counts, "every commit")
        assert loop.in_flight() == 0
    for p in range(PARTITIONS):
        assert strategies.offsets((topic, p)) == list(range(counts[p])), "each offset once, in order"
    assert strategies.created and all(c <= {(topic, p) for p in range(PARTITIONS)} for c in strategies.created)


def test_a_rejected_message_pauses_and_is_offered_again_without_loss_or_reordering(settings: Settings) -> None:
    topic, counts = make_topic(settings, 200)
    refusals = iter([True] * 5)  # the first five offers of every 40th message are refused

    def reject(message: Message) -> bool:
        return int(message.value()) % 40 == 0 and next(refusals, False)

    strategies = Recording(reject=reject)
    with running(settings, topic, strategies) as loop:
        wait_for(lambda: committed(settings, topic, settings.kafka.processor_group) == counts, "every commit")
        pauses = metric(loop.metrics, "emofleet_backpressure_pauses_total")
    assert strategies.rejected == 5 and pauses >= 1
    for p in range(PARTITIONS):
        assert strategies.offsets((topic, p)) == list(range(counts[p]))


def test_the_in_flight_bound_holds_and_commits_never_pass_open_work(settings: Settings) -> None:
    topic, counts = make_topic(settings, 100)
    kept_open = {(0, 10)}  # (partition, offset) never finished by the first strategy
    strategies = Recording(hold=lambda m: (m.partition(), m.offset()) in kept_open)
    with running(settings, topic, strategies, max_in_flight=4) as loop:
        wait_for(lambda: all(len(strategies.offsets((topic, p))) >= counts[p] for p in range(1, PARTITIONS))
                   and len(strategies.offsets((topic, 0))) >= 11, "everything offered")
        wait_for(lambda: committed(settings, topic, settings.kafka.processor_group).get(1) == counts[1],
                   "partition 1 committed")
        assert committed(settings, topic, settings.kafka.processor_group).get(0, 0) <= 10
        assert metric(loop.metrics, "emofleet_in_flight_messages_peak") <= 4


def test_a_new_member_replaces_the_strategy_and_unfinished_work_is_read_again(settings: Settings) -> None:
    """A second member joins: the first member's strategy is joined and closed, a fresh one gets the partitions it
    keeps, and a message the old one left open is offered again (by whichever member owns it now)."""
    topic, counts = make_topic(settings, 80)
    first_strategy_holds = Recording(hold=lambda m: m.offset() == counts[m.partition()] - 1)
    second = Recording()
    with running(settings, topic, first_strategy_holds) as first:
        wait_for(lambda: len(first_strategy_holds.submitted) == sum(counts.values()), "all offered to the first")
        first_strategy_holds.hold = lambda _: False  # strategies made from now on finish everything
        with running(settings, topic, second) as other:
            wait_for(lambda: other.assigned and first.assigned and len(first_strategy_holds.created) >= 2,
                       "the group rebalanced")
            wait_for(lambda: committed(settings, topic, settings.kafka.processor_group) == counts, "every commit")
    again = [(tp, offset) for number, tp, offset in first_strategy_holds.submitted if number > 1]
    again += [(tp, offset) for _, tp, offset in second.submitted]
    last = {(topic, p): counts[p] - 1 for p in range(PARTITIONS)}
    assert {tp for tp, offset in again if offset == last[tp]} == set(last), "every open message was read again"
    kept = first_strategy_holds.created[-1]
    assert kept and kept < first_strategy_holds.created[0], "the first member's fresh strategy has fewer partitions"


def test_after_a_rewind_only_the_unfinished_message_is_processed_again(settings: Settings) -> None:
    """Offset 5 of every partition stays open; everything after it finishes. When the assignment changes, the
    partitions the first member keeps are rewound to 5, and only 5 is submitted again: 6.. were finished (their
    outputs are out), so they are passed over, and the commit then reaches the end."""
    topic, counts = make_topic(settings, 80)
    strategies = Recording(hold=lambda m: m.offset() == 5)
    with running(settings, topic, strategies) as first:
        wait_for(lambda: len(strategies.submitted) == sum(counts.values()), "all offered once")
        strategies.hold = lambda _: False
        with running(settings, topic, Recording()) as other:
            wait_for(lambda: other.assigned and len(strategies.created) >= 2, "the group rebalanced")
            wait_for(lambda: committed(settings, topic, settings.kafka.processor_group) == counts, "every commit")
            kept = strategies.created[-1]
    assert kept, "the first member kept some partitions"
    for tp in kept:
        again = [offset for number, p, offset in strategies.submitted if number > 1 and p == tp]
        assert again == [5], f"{tp}: only the unfinished message is processed again, got {again}"
