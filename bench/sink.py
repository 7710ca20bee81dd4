"""Sink throughput: `ClickHouseSink` into chDB vs a raw clickhouse-connect bulk insert of the same rows.

    python bench/sink.py [--events N] [--batch-rows R] [--rounds K] [--no-what-if]

One process, one embedded Tansu broker, ONE chDB data path for the whole run (chDB allows one path per
process); every run gets a fresh database, migrated with ``sinks.migrations.migrate`` (so the events table
has its materialized view and deduplication window, as in production), dropped afterwards.

The same N EmotionEvents (made by the processors' own ``emotion_events`` via ``tests/sink_samples.py``, a mix of
one-window clips and 3-window clips with their whole-clip summary, tenants, sources, call ids,
attributes) are Avro-encoded like the processors do and produced once to a results topic (not timed).
The bench reads them back once (not timed) to know each message's exact bytes and Kafka position.
Rows, interleaved round by round with the order rotated; the tables show medians:

* ``emofleet ClickHouseSink`` -- ``ClickHouseSink(settings, client, codec)`` run in a thread with a fresh
  consumer group and database; ``batch_rows`` = R. Clock: from the first message the sink accepts
  (group join and the first fetch are not timed) until a ``count()`` query polled every 20 ms through
  the same client (under the sink's client lock) sees all N rows. Includes what the sink does per
  batch: consume, Avro decode, ``event_row``, insert with its deduplication token, and the consumer
  loop's offset commits (asynchronous, about once a second).
* ``emofleet ClickHouseSink (instrumented)`` -- the same with timers around decode, ``event_row``,
  ``client.insert`` and the offset commit (the time split below); its rate shows the timers' cost.
* ``raw insert (rows prebuilt)`` -- ``client.insert(table, rows, column_names=EVENT_COLUMNS,
  database=db)`` in chunks of R rows, same chDB client, same column order; the rows were made by
  ``event_row`` from the decoded events before the clock (not timed).
* ``raw decode + event_row + insert`` -- the same starting from the Avro bytes: per chunk, decode every
  message, build the rows, insert (all timed, split shown).
* ``what-if: sink, gc.set_threshold(100000, 50, 1000)`` -- the plain sink row with Python's cyclic GC
  run less often during the run (process-wide; restored afterwards): what a sink could gain by tuning
  the GC at startup (each 20k-row batch allocates a few hundred thousand container objects).

The bench's own data (the prebuilt rows, the messages: millions of objects) is moved out of the GC's
reach with ``gc.freeze()`` after it is built, so it slows none of the rows; each row still pays for the
GC of its own allocations. "CPU s" is this process's CPU time (all threads: sink, librdkafka, chDB)
over the timed window; the broker runs in another process.

Target: sink rows/s >= 0.5x the raw insert (rows prebuilt).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from emofleet.schemas.codec import make_codec
from emofleet.schemas.emotions import EMOTIONS
from emofleet.sinks import service as sink_service
from emofleet.sinks.clickhouse import connect
from emofleet.sinks.rows import EVENT_COLUMNS, event_row
from emofleet.sinks.migrations import EVENTS_TABLE, migrate, quote_identifier
from emofleet.core.config import Settings

from harness import (
    DEFAULT_REDIS_URL, bench_settings, create_pipeline_topics, embedded_broker, log, machine_line, markdown_table,
    median, unique, workspace,
)

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # the sink tests' record builders
from sink_samples import sample_events  # noqa: E402

TARGET_RATIO = 0.5
SINK = "emofleet ClickHouseSink"
SINK_TIMED = "emofleet ClickHouseSink (instrumented)"
RAW = "raw insert (rows prebuilt)"
RAW_FULL = "raw decode + event_row + insert"
WHAT_IF_GC = "what-if: sink, gc.set_threshold(100000, 50, 1000)"
GC_THRESHOLD = (100_000, 50, 1000)
POLL_SECONDS = 0.02


# ------------------------------------------------------------------------------------------ data


def make_events(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """``count`` realistic EmotionEvents (roughly; stops at exactly ``count``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base_ms = int(time.time() * 1000) - 3_600_000
    labels = [e for e in EMOTIONS if e != "unknown"]
    events: list[dict[str, Any]] = []
    clip = 0
    while len(events) < count:
        long_clip = clip % 10 == 9  # one clip in ten is 70 s: 3 windows + the whole-clip summary
        windows = ((0.0, 30.0), (30.0, 60.0), (60.0, 70.0)) if long_clip else ((0.0, float(rng.uniform(1, 12))),)
        produced = base_ms + clip * 37
        events += sample_events(
            audio_id=f"clip-{seed}-{clip:07d}", label=labels[clip % len(labels)], confidence=0.5,
            window_labels=[labels[(clip + i) % len(labels)] for i in range(len(windows))],
            produced_at_ms=produced, processed_at_ms=produced + int(rng.integers(200, 3000)),
            tenant=f"tenant-{clip % 7}", source=f"line-{clip % 23}", channel="agent" if clip % 2 else None,
            call_id=f"call-{clip // 4:06d}" if clip % 3 else None,
            attributes={"campaign": f"c{clip % 5}", "lang": "en"} if clip % 4 == 0 else None,
            windows=windows, cache_hit=clip % 11 == 0, latency_ms=int(rng.integers(20, 900)),
            model_id="iic/emotion2vec_plus_large", revision="v2.0.4",
            lineage=("emofleet.audio", clip % 4, clip // 4))
        clip += 1
    return events[:count]


@dataclass
class Message:
    partition: int
    offset: int
    value: bytes


def produce_events(settings: Settings, events: list[dict[str, Any]]) -> None:
    """Avro-encode like the processors (codec.encode on the results topic, key = the reference's key)."""
    codec = make_codec()
    topic = settings.kafka.results_topic
    producer = Producer(settings.kafka.client_config() | {"enable.idempotence": True, "acks": "all",
                                                          "linger.ms": 20, "compression.type": "lz4"})
    for event in events:
        value = codec.encode("emotion_event", event, topic=topic)
        while True:
            try:
                producer.produce(topic, key=event["audio_id"].encode(), value=value)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("producing the events failed")


def read_back(settings: Settings, expected: int) -> list[Message]:
    """Every message of the results topic with its position (the raw rows use the same positions)."""
    from confluent_kafka.admin import AdminClient

    topic = settings.kafka.results_topic
    metadata = AdminClient(settings.kafka.client_config()).list_topics(topic, timeout=10)
    consumer = Consumer(settings.kafka.client_config() | {
        "group.id": unique("readback"), "enable.auto.commit": False, "fetch.wait.max.ms": 10, "log_level": 0})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.topics[topic].partitions])
    messages: list[Message] = []
    deadline = time.monotonic() + 60
    while len(messages) < expected and time.monotonic() < deadline:
        for m in consumer.consume(num_messages=10_000, timeout=0.2):
            if m.error() is None:
                messages.append(Message(m.partition(), m.offset(), m.value()))
    consumer.close()
    if len(messages) != expected:
        raise RuntimeError(f"read back {len(messages)} of {expected} events")
    messages.sort(key=lambda m: (m.partition, m.offset))
    return messages


# ------------------------------------------------------------------------------------------ runs


@dataclass
class RunResult:
    name: str
    rows: int
    seconds: float
    split: dict[str, float] = field(default_factory=dict)  # seconds per stage
    inserts: int = 0
    cpu: float = float("nan")  # this process's CPU seconds over the timed window

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def process_cpu() -> float:
    times = os.times()
    return times.user + times.system


class Databases:
    """A fresh migrated database per run on the one chDB client; dropped after the run."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def fresh(self, name: str) -> str:
        database = unique(name).replace("-", "_")
        migrate(self.client, database)
        return database

    def count(self, database: str) -> int:
        table = f"{quote_identifier(database)}.{EVENTS_TABLE}"
        return int(self.client.query(f"SELECT count() FROM {table}").result_rows[0][0])

    def drop(self, database: str) -> None:
        self.client.command(f"DROP DATABASE IF EXISTS {quote_identifier(database)} SYNC")


def run_raw(name: str, dbs: Databases, batch_rows: int, *, rows: list[list] | None = None,
            messages: list[Message] | None = None, topic: str = "") -> RunResult:
    database = dbs.fresh(name.split()[0])
    client = dbs.client
    columns = list(EVENT_COLUMNS)
    split = {"decode": 0.0, "row build": 0.0, "insert": 0.0}
    inserts = 0
    try:
        gc.collect()
        cpu_started = process_cpu()
        if rows is not None:
            started = time.perf_counter()
            for i in range(0, len(rows), batch_rows):
                client.insert(EVENTS_TABLE, rows[i:i + batch_rows], column_names=columns, database=database)
                inserts += 1
            seconds = time.perf_counter() - started
            split["insert"] = seconds
            total = len(rows)
        else:
            assert messages is not None
            codec = make_codec()
            decode = codec.decode
            started = time.perf_counter()
            for i in range(0, len(messages), batch_rows):
                chunk = messages[i:i + batch_rows]
                t0 = time.perf_counter()
                events = [decode("emotion_event", m.value, topic=topic) for m in chunk]
                t1 = time.perf_counter()
                now = datetime.now(UTC)
                batch = [event_row(e, topic, m.partition, m.offset, now) for e, m in zip(events, chunk)]
                t2 = time.perf_counter()
                client.insert(EVENTS_TABLE, batch, column_names=columns, database=database)
                t3 = time.perf_counter()
                split["decode"] += t1 - t0
                split["row build"] += t2 - t1
                split["insert"] += t3 - t2
                inserts += 1
            seconds = time.perf_counter() - started
            total = len(messages)
        cpu = process_cpu() - cpu_started
        stored = dbs.count(database)
        if stored != total:
            raise RuntimeError(f"{name}: {stored} rows stored, expected {total}")
    finally:
        dbs.drop(database)
    return RunResult(name, total, seconds, split, inserts, cpu)


class TimedClient:
    """The real client with ``insert`` timed (everything else passed through)."""

    def __init__(self, client: Any, split: dict[str, float]) -> None:
        self._client = client
        self._split = split

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._client.insert(*args, **kwargs)
        finally:
            self._split["insert"] += time.perf_counter() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class TimedCodec:
    def __init__(self, codec: Any, split: dict[str, float]) -> None:
        self._codec = codec
        self._split = split

    def decode(self, name: str, data: bytes, *, topic: str) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return self._codec.decode(name, data, topic=topic)
        finally:
            self._split["decode"] += time.perf_counter() - started

    def encode(self, name: str, record: Any, *, topic: str) -> bytes:
        return self._codec.encode(name, record, topic=topic)


def run_sink(name: str, dbs: Databases, base: Settings, expected: int, batch_rows: int, *,
             instrumented: bool, gc_threshold: tuple[int, int, int] | None = None,
             timeout: float = 120.0) -> RunResult:
    from emofleet.sinks.service import ClickHouseSink

    database = dbs.fresh("sink")
    settings = replace(base, kafka=replace(base.kafka, sink_group=unique("sink-group")),
                       clickhouse=replace(base.clickhouse, database=database, batch_rows=batch_rows))
    split = {"decode": 0.0, "row build": 0.0, "insert": 0.0, "commit": 0.0}
    lock = threading.Lock()
    client: Any = dbs.client
    codec: Any = make_codec()
    original_event_row = sink_service.event_row
    if instrumented:
        client = TimedClient(client, split)
        codec = TimedCodec(codec, split)

        def timed_event_row(*args: Any) -> list:
            started = time.perf_counter()
            row = original_event_row(*args)
            split["row build"] += time.perf_counter() - started
            return row

        sink_service.event_row = timed_event_row  # the sink module's global, restored below
    sink = ClickHouseSink(settings, client, codec, client_lock=lock)
    loop = sink.loop  # instrumentation reaches into the consumer loop the sink runs on
    if instrumented:
        commit = loop._commit

        def timed_commit(**kwargs: Any) -> None:
            started = time.perf_counter()
            commit(**kwargs)
            split["commit"] += time.perf_counter() - started

        loop._commit = timed_commit  # type: ignore[method-assign]

    first: list[float] = []
    cpu_started: list[float] = []
    accept = loop._accept

    def first_accept(message: Any) -> None:
        first.append(time.perf_counter())
        cpu_started.append(process_cpu())
        loop._accept = accept  # type: ignore[method-assign]  # back to the plain method: no per-row cost
        accept(message)

    loop._accept = first_accept  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sink.run()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    gc.collect()
    previous_threshold = gc.get_threshold()
    if gc_threshold:
        gc.set_threshold(*gc_threshold)
    thread = threading.Thread(target=run, name="sink", daemon=True)
    thread.start()
    done_at = None
    cpu = float("nan")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not errors:
            if first:
                with lock:
                    stored = dbs.count(database)
                if stored >= expected:
                    done_at = time.perf_counter()
                    cpu = process_cpu() - cpu_started[0]
                    break
            time.sleep(POLL_SECONDS)  # polling ClickHouse for the sink's progress, bounded by timeout
    finally:
        sink.stop()
        thread.join(30)
        gc.set_threshold(*previous_threshold)
        sink_service.event_row = original_event_row
        dbs.drop(database)
    if errors:
        raise RuntimeError(f"the sink failed: {errors[0]!r}")
    if done_at is None or not first:
        raise RuntimeError(f"the sink stored fewer than {expected} rows within {timeout:.0f} s")
    if stored != expected:
        raise RuntimeError(f"the sink stored {stored} rows, expected {expected}")
    seconds = done_at - first[0]
    del sink
    gc.collect()
    return RunResult(name, expected, seconds, split if instrumented else {}, 0, cpu)


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--batch-rows", type=int, default=20_000, help="rows per insert (sink batch_rows too)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-what-if", action="store_true", help="skip the GC-threshold what-if row")
    args = parser.parse_args()
    logging.getLogger("emofleet").setLevel(logging.WARNING)

    with workspace("emofleet-bench-sink-") as workdir, embedded_broker(workdir) as bootstrap:
        settings = bench_settings(bootstrap, DEFAULT_REDIS_URL, "sink", workdir / "data")
        create_pipeline_topics(settings)
        started = time.monotonic()
        events = make_events(args.events)
        log(f"{len(events)} events made in {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        produce_events(settings, events)
        messages = read_back(settings, len(events))
        topic = settings.kafka.results_topic
        payload = sum(len(m.value) for m in messages)
        log(f"produced and read back in {time.monotonic() - started:.1f} s ({payload / len(messages):.0f} B/event)")
        codec = make_codec()
        now = datetime.now(UTC)
        rows = [event_row(codec.decode("emotion_event", m.value, topic=topic), topic, m.partition, m.offset, now)
                for m in messages]
        del events
        gc.collect()
        gc.freeze()  # the bench's own data: out of the GC's reach, so it slows none of the rows

        client = connect(settings.clickhouse, settings.clickhouse_dsn)  # the one chDB path of this process
        dbs = Databases(client)
        try:
            # chDB's first insert in a process costs 0.3-0.8 s: pay it here, not in a timed row.
            warm = dbs.fresh("warm")
            client.insert(EVENTS_TABLE, rows[:1000], column_names=list(EVENT_COLUMNS), database=warm)
            dbs.drop(warm)
            results: dict[str, list[RunResult]] = {SINK: [], SINK_TIMED: [], RAW: [], RAW_FULL: []}
            if not args.no_what_if:
                results[WHAT_IF_GC] = []
            runs: list[tuple[str, Callable[[], RunResult]]] = [
                (SINK, lambda: run_sink(SINK, dbs, settings, len(messages), args.batch_rows, instrumented=False)),
                (RAW, lambda: run_raw(RAW, dbs, args.batch_rows, rows=rows)),
                (RAW_FULL, lambda: run_raw(RAW_FULL, dbs, args.batch_rows, messages=messages, topic=topic)),
                (SINK_TIMED, lambda: run_sink(SINK_TIMED, dbs, settings, len(messages), args.batch_rows,
                                              instrumented=True)),
            ]
            if not args.no_what_if:
                runs.append((WHAT_IF_GC, lambda: run_sink(WHAT_IF_GC, dbs, settings, len(messages), args.batch_rows,
                                                          instrumented=False, gc_threshold=GC_THRESHOLD)))
            for round_index in range(args.rounds):
                order = runs[round_index % len(runs):] + runs[:round_index % len(runs)]
                for name, run in order:
                    result = run()
                    results[name].append(result)
                    log(f"round {round_index + 1}/{args.rounds} {name}: {result.rate:,.0f} rows/s "
                        f"({result.seconds:.2f} s)")
        finally:
            client.close()
    report(len(messages), payload, args.batch_rows, args.rounds, results)


def report(count: int, payload: int, batch_rows: int, rounds: int, results: dict[str, list[RunResult]]) -> None:
    raw_rate = median([r.rate for r in results[RAW]])
    rows = []
    for name, runs in results.items():
        rate = median([r.rate for r in runs])
        cpu = median([r.cpu for r in runs])
        rows.append([name, count, median([r.seconds for r in runs]), rate, f"{rate / raw_rate:.2f}x",
                     f"{1e6 / rate:.1f}", cpu, f"{cpu / count * 1e6:.1f}", ", ".join(f"{r.rate:,.0f}" for r in runs)])
    print(f"\n### Sink into chDB: {count} events ({payload / count:.0f} B Avro each), {batch_rows} rows per insert, "
          f"{rounds} rounds interleaved, medians ({machine_line()})\n")
    print(markdown_table(["run", "rows", "seconds", "rows/s", "ratio vs raw insert", "wall us/row", "CPU s",
                          "CPU us/row", "rows/s per round"], rows))
    print("\nTime split (median seconds over rounds; per row in us). Sink: timers around codec.decode, "
          "event_row, client.insert and the offset commit; \"other\" is the rest of the wall time (Kafka "
          "consume, batching, per-message metrics, polling the count).\n")
    split_rows = []
    for name in (SINK_TIMED, RAW_FULL, RAW):
        runs = results[name]
        stages = list(runs[0].split)
        values = {s: median([r.split[s] for r in runs]) for s in stages}
        values["other"] = median([r.seconds - sum(r.split.values()) for r in runs])
        wall = median([r.seconds for r in runs])
        split_rows.append([name, wall, *(f"{values.get(s, 0.0):.3f} s ({values.get(s, 0.0) / count * 1e6:.1f} us)"
                                         if s in values else "-"
                                         for s in ("decode", "row build", "insert", "commit", "other"))])
    print(markdown_table(["run", "wall s", "decode", "row build", "insert", "commit", "other"], split_rows))
    ratio = median([r.rate for r in results[SINK]]) / raw_rate
    cpu_ratio = median([r.cpu for r in results[RAW]]) / median([r.cpu for r in results[SINK]])
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    print(f"\nsink / raw insert = **{ratio:.2f}x** rows/s (by CPU time per row: {cpu_ratio:.2f}x); "
          f"target >= {TARGET_RATIO:g}x: **{verdict}**")


if __name__ == "__main__":
    main()
