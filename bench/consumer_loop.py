"""Consumer-loop overhead: emofleet's ConsumerLoop vs Sentry Arroyo's StreamProcessor, on pass-through work.

    python bench/consumer_loop.py [--messages 200000] [--repeat 3] [--partitions 4]

Needs the ``bench`` extra (``pip install -e '.[bench]'``: sentry-arroyo). One embedded Tansu broker, one topic
of ``--partitions`` partitions filled once with ``--messages`` small values (round-robin over partitions; the
expected end offset of each partition is taken from the delivery reports, not from ListOffsets, which Tansu
answers wrongly). Every run reads the whole topic in a fresh consumer group, as the group's only member:

* ``emofleet ConsumerLoop, inline`` -- a strategy that reports each message finished in ``submit``.
* ``Arroyo StreamProcessor, CommitOffsets`` -- ``CommitOffsets`` as the whole strategy.
* ``..., 4 threads`` -- the same work finished on a pool of 4 threads, so completions arrive out of order:
  ours reports from the pool, Arroyo runs ``RunTaskInThreads(concurrency=4) -> CommitOffsets``.

Both loops get the librdkafka settings of ``streams.consumer.consumer_config`` (Arroyo through
``build_kafka_consumer_configuration``, which adds its own statistics callback) and commit every
``--commit-interval`` seconds, with the same bound on unfinished messages. One difference is forced: Arroyo
2.48's Kafka consumer calls ``assign()`` in its assignment callback, which librdkafka refuses under
cooperative-sticky ("Failed to set assignment: Local: Erroneous state"), so Arroyo runs with ``range``. With a
single member both protocols assign every partition once.

The clock starts when the loop's strategy factory is first called (the partitions are assigned; the group join
before it is not timed). "to last hand-over" stops it when the strategy takes the last message (ours counts in
its strategy; Arroyo's strategy is wrapped in a counting step, one Python call more per message); "to all
committed" when the group's committed offsets, read every 20 ms by a separate client, equal the produced end
offsets. The gap between the two is the commit tail: ours consumes with a 0.1 s timeout, Arroyo polls with a
fixed 1 s timeout, and an idle loop commits only after its poll returns. "CPU s / 100k" is this process's CPU
time (every thread: the loop, librdkafka, the pool, the offset reader) until all is committed. Rows run
interleaved, in rotated order; medians.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition

from emofleet.core.config import KafkaSettings
from emofleet.core.metrics import Metrics
from emofleet.streams.consumer import ConsumerLoop, LoopLimits, Reporter, consumer_config

from harness import create_topic, embedded_broker, log, machine_line, markdown_table, median, unique, workspace

THREADS = 4
OURS_INLINE = "emofleet ConsumerLoop, inline"
ARROYO_INLINE = "Arroyo StreamProcessor, CommitOffsets"
OURS_THREADS = f"emofleet ConsumerLoop, {THREADS} threads"
ARROYO_THREADS = f"Arroyo StreamProcessor, RunTaskInThreads({THREADS}) -> CommitOffsets"
PAIRS = (("inline", OURS_INLINE, ARROYO_INLINE), (f"{THREADS} threads", OURS_THREADS, ARROYO_THREADS))


@dataclass(frozen=True)
class Run:
    """What both loops are given."""

    bootstrap: str
    topic: str
    expected: dict[int, int]  # partition -> end offset, from the delivery reports
    max_in_flight: int
    commit_interval: float
    timeout: float

    def kafka_config(self, group: str) -> dict[str, Any]:
        kafka = KafkaSettings(bootstrap_servers=self.bootstrap, session_timeout_ms=3000, heartbeat_interval_ms=500)
        return consumer_config(kafka, group)


class Clock:
    """Wall and CPU time from the first assignment; when the last message was handed over; when all are committed."""

    def __init__(self, messages: int) -> None:
        self._left = messages
        self.started: float | None = None
        self.cpu_started = 0.0
        self.all_seen: float | None = None

    def assigned(self) -> None:
        if self.started is None:
            self.cpu_started = time.process_time()
            self.started = time.perf_counter()

    def seen(self) -> None:
        """One message handed to the strategy (called on the poll thread)."""
        self._left -= 1
        if self._left == 0:
            self.all_seen = time.perf_counter()

    def stop(self) -> Result:
        assert self.started is not None and self.all_seen is not None, "the loop never saw every message"
        return Result(self.all_seen - self.started, time.perf_counter() - self.started,
                      time.process_time() - self.cpu_started)


@dataclass
class Holds:
    """Times the loop held a message back (backpressure), counted the way each loop can tell."""

    count: int = 0


@dataclass(frozen=True)
class Result:
    seen_seconds: float  # first assignment -> last message handed to the strategy
    seconds: float  # first assignment -> every offset committed
    cpu_seconds: float  # this process, over ``seconds``
    holds: int = 0  # ours: backpressure pauses; Arroyo: submits rejected (MessageRejected), each retry counted


def fill_topic(bootstrap: str, topic: str, partitions: int, count: int, value_bytes: int) -> dict[int, int]:
    """Produce ``count`` values round-robin over the partitions; returns each partition's end offset."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4",
                         "acks": "1"})
    ends: dict[int, int] = {}
    failures: list[str] = []

    def delivered(error: Any, message: Message) -> None:
        if error is not None:
            failures.append(error.str())
        else:
            ends[message.partition()] = max(ends.get(message.partition(), 0), message.offset() + 1)

    value = b"v" * value_bytes
    for index in range(count):
        while True:
            try:
                producer.produce(topic, value=value, key=str(index).encode(), partition=index % partitions,
                                 on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(60) or failures or sum(ends.values()) != count:
        raise SystemExit(f"could not fill {topic}: {failures[:3] or 'undelivered messages'}")
    return ends


def wait_committed(run: Run, group: str, clock: Clock, loop_thread: threading.Thread) -> Result:
    """Read the group's committed offsets until they reach the produced ends; stop the clock then."""
    reader = Consumer({"bootstrap.servers": run.bootstrap, "group.id": group})
    partitions = [TopicPartition(run.topic, p) for p in sorted(run.expected)]
    deadline = time.monotonic() + run.timeout
    try:
        while True:
            committed = {tp.partition: tp.offset for tp in reader.committed(partitions, timeout=10)}
            if committed == run.expected:
                return clock.stop()
            if not loop_thread.is_alive():
                raise SystemExit(f"{group}: the loop ended before committing everything ({committed})")
            if time.monotonic() > deadline:
                raise SystemExit(f"{group}: committed {committed} of {run.expected} after {run.timeout:.0f} s")
            time.sleep(0.02)
    finally:
        reader.close()


def measure(run: Run, group: str, clock: Clock, loop_run: Callable[[], None], loop_stop: Callable[[], None],
            holds: Callable[[], int]) -> Result:
    """Run one loop on its own thread until everything is committed, then stop it (not timed)."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            loop_run()
        except BaseException as error:  # reported on the main thread
            errors.append(error)

    thread = threading.Thread(target=body, name=f"loop-{group}", daemon=True)
    thread.start()
    try:
        return replace(wait_committed(run, group, clock, thread), holds=holds())
    finally:
        loop_stop()
        thread.join(30)
        if errors:
            raise errors[0]


# ------------------------------------------------------------------ ours (the only part tied to our loop's API)

class PassThrough:
    """Finishes every message as it is submitted."""

    def __init__(self, report: Reporter, clock: Clock) -> None:
        self._report = report
        self._clock = clock

    def submit(self, message: Message) -> None:
        self._clock.seen()
        self._report((message.topic(), message.partition()), message.offset(), finished=True)

    def poll(self) -> None:
        pass

    def join(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass


class PassThroughOnThreads(PassThrough):
    """Finishes every message on a pool of threads, so completions arrive out of order."""

    def __init__(self, report: Reporter, clock: Clock) -> None:
        super().__init__(report, clock)
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="bench-work")
        self._pending: deque[Future[None]] = deque()

    def submit(self, message: Message) -> None:
        self._clock.seen()
        while self._pending and self._pending[0].done():
            self._pending.popleft()
        self._pending.append(self._pool.submit(self._report, (message.topic(), message.partition()),
                                               message.offset(), finished=True))

    def join(self, timeout: float) -> None:
        wait(self._pending, timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)  # pass-through work ends at once: nothing is left to report dropped


def run_ours(run: Run, group: str, threaded: bool) -> Result:
    clock = Clock(sum(run.expected.values()))
    strategy = PassThroughOnThreads if threaded else PassThrough

    def factory(_partitions: frozenset[tuple[str, int]], report: Reporter) -> PassThrough:
        clock.assigned()
        return strategy(report, clock)

    limits = LoopLimits(max_in_flight=run.max_in_flight, commit_interval_seconds=run.commit_interval,
                        join_timeout_seconds=10.0)
    metrics = Metrics("processor")
    loop = ConsumerLoop(run.kafka_config(group), [run.topic], factory, limits, metrics=metrics,
                        leave_group=False)  # never LeaveGroup on Tansu (tests/test_tansu_group.py)

    def pauses() -> int:
        return int(metrics.registry.get_sample_value("emofleet_backpressure_pauses_total") or 0)

    return measure(run, group, clock, loop.run, loop.stop, pauses)


# ------------------------------------------------------------------ Arroyo

def run_arroyo(run: Run, group: str, threaded: bool) -> Result:
    from arroyo.backends.kafka import KafkaConsumer
    from arroyo.backends.kafka.configuration import build_kafka_consumer_configuration
    from arroyo.commit import CommitPolicy
    from arroyo.processing import StreamProcessor
    from arroyo.processing.strategies import CommitOffsets, RunTaskInThreads
    from arroyo.processing.strategies.abstract import MessageRejected, ProcessingStrategy, ProcessingStrategyFactory
    from arroyo.types import Topic

    clock = Clock(sum(run.expected.values()))
    rejected = Holds()

    class Counted(ProcessingStrategy[Any]):
        """Tells the clock about each message it passes on (the one layer ours does not need)."""

        def __init__(self, next_step: ProcessingStrategy[Any]) -> None:
            self._next = next_step

        def submit(self, message: Any) -> None:
            try:
                self._next.submit(message)
            except MessageRejected:  # offered again later, and counted then
                rejected.count += 1
                raise
            clock.seen()

        def poll(self) -> None:
            self._next.poll()

        def join(self, timeout: float | None = None) -> None:
            self._next.join(timeout)

        def close(self) -> None:
            self._next.close()

        def terminate(self) -> None:
            self._next.terminate()

    class Factory(ProcessingStrategyFactory[Any]):
        def create_with_partitions(self, commit: Any, partitions: Any) -> Any:
            clock.assigned()
            if threaded:
                return Counted(RunTaskInThreads(lambda message: message.payload, concurrency=THREADS,
                                                max_pending_futures=run.max_in_flight,
                                                next_step=CommitOffsets(commit)))
            return Counted(CommitOffsets(commit))

    ours = run.kafka_config(group)
    arroyo_managed = {"group.id", "auto.offset.reset", "enable.auto.commit", "enable.auto.offset.store",
                      "queued.max.messages.kbytes"}
    overrides = {key: value for key, value in ours.items() if key not in arroyo_managed}
    overrides["partition.assignment.strategy"] = "range"  # see the module docstring
    config = build_kafka_consumer_configuration(
        {}, group_id=group, auto_offset_reset="earliest",
        queued_max_messages_kbytes=ours["queued.max.messages.kbytes"],
        queued_min_messages=100_000,  # librdkafka's default, which ours runs with
        # Arroyo's own commit policy with synchronous commits, as ours; the builder's default (True) stores
        # offsets for librdkafka's auto-commit instead (every auto.commit.interval.ms, 5 s) and skips the policy
        enable_auto_commit=False,
        override_params=overrides)

    processor = StreamProcessor(KafkaConsumer(config), Topic(run.topic), Factory(),
                                CommitPolicy(min_commit_frequency_sec=run.commit_interval, min_commit_messages=None))
    return measure(run, group, clock, processor.run, processor.signal_shutdown, lambda: rejected.count)


# ------------------------------------------------------------------ report

def cpu_capabilities() -> str:
    """The CPU's model and the vector extensions that matter for the other benches."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return f"{model}; {', '.join(f for f in wanted if f in flags) or 'no AVX2/AVX-512'}"


def report(results: dict[str, list[Result]], messages: int, args: argparse.Namespace) -> None:
    def consumed_rate(result: Result) -> float:
        return messages / result.seen_seconds

    def committed_rate(result: Result) -> float:
        return messages / result.seconds

    def cpu_per_100k(result: Result) -> float:
        return result.cpu_seconds * 100_000 / messages

    rows = []
    for name, runs in results.items():
        rows.append([name, messages, median([consumed_rate(r) for r in runs]), median([r.seconds for r in runs]),
                     median([committed_rate(r) for r in runs]), median([cpu_per_100k(r) for r in runs]),
                     int(median([r.holds for r in runs])), ", ".join(f"{committed_rate(r):,.0f}" for r in runs)])
    print(f"\n### Consumer loop: {messages:,} messages x {args.repeat} rounds, {args.partitions} partitions, "
          f"{args.value_bytes} B values, commit every {args.commit_interval} s, max {args.max_in_flight} in flight "
          f"(medians; {machine_line()}; {cpu_capabilities()})\n")
    print(markdown_table(["run", "messages", "msg/s to last hand-over", "s to all committed",
                          "msg/s to all committed", "CPU s / 100k", "holds", "msg/s to all committed, per round"],
                         rows))
    print("\nholds: backpressure. Ours: times the loop paused its partitions (each pause seeks back what was "
          "prefetched). Arroyo: submits its strategy rejected (MessageRejected; the loop retries the held message "
          "about every 10 ms and pauses only after 5 s of it)")

    ratio_rows = []
    for label, ours, arroyo in PAIRS:
        pairs = list(zip(results[ours], results[arroyo]))
        consumed = [consumed_rate(o) / consumed_rate(a) for o, a in pairs]
        committed = [committed_rate(o) / committed_rate(a) for o, a in pairs]
        cpu = [o.cpu_seconds / a.cpu_seconds for o, a in pairs]
        ratio_rows.append([label, f"{median(consumed):.2f}x", f"{median(committed):.2f}x", f"{median(cpu):.2f}x",
                           ", ".join(f"{r:.2f}" for r in committed)])
    print("\nours / Arroyo, per round then the median (msg/s above 1 and CPU below 1 favour ours):\n")
    print(markdown_table(["work", "msg/s to last hand-over", "msg/s to all committed", "CPU per message",
                          "msg/s to all committed, per round"], ratio_rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each runs every row once")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--max-in-flight", type=int, default=1000,
                        help="our loop's max_in_flight and Arroyo's max_pending_futures")
    parser.add_argument("--commit-interval", type=float, default=0.2, help="seconds between periodic commits")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take")
    args = parser.parse_args(argv)
    try:
        import arroyo  # noqa: F401
    except ImportError:
        raise SystemExit("sentry-arroyo is not installed: pip install -e '.[bench]'") from None

    rows: dict[str, Callable[[Run, str], Result]] = {
        OURS_INLINE: lambda run, group: run_ours(run, group, threaded=False),
        ARROYO_INLINE: lambda run, group: run_arroyo(run, group, threaded=False),
        OURS_THREADS: lambda run, group: run_ours(run, group, threaded=True),
        ARROYO_THREADS: lambda run, group: run_arroyo(run, group, threaded=True),
    }
    with workspace("emofleet-bench-consumer-loop-") as workdir, embedded_broker(workdir) as bootstrap:
        topic = unique("consumer-loop")
        create_topic(bootstrap, topic, args.partitions)
        expected = fill_topic(bootstrap, topic, args.partitions, args.messages, args.value_bytes)
        log(f"{args.messages:,} messages in {topic}: {expected}")
        run = Run(bootstrap, topic, expected, args.max_in_flight, args.commit_interval, args.timeout)
        results: dict[str, list[Result]] = {name: [] for name in rows}
        names = list(rows)
        for round_index in range(args.repeat):
            order = names[round_index % len(names):] + names[:round_index % len(names)]  # rotate: no fixed slot
            for name in order:
                result = rows[name](run, unique("group"))
                results[name].append(result)
                log(f"round {round_index + 1}/{args.repeat} {name}: {args.messages / result.seen_seconds:,.0f} msg/s "
                    f"to the last hand-over, {args.messages / result.seconds:,.0f} msg/s to all committed, "
                    f"{result.cpu_seconds:.2f} CPU s, {result.holds} holds")
    report(results, args.messages, args)


if __name__ == "__main__":
    main()
