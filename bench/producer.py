"""Producer throughput: AudioReferenceProducer vs a raw confluent-kafka loop of the same messages.

    python bench/producer.py [--references 50000] [--rounds 3] [--partitions 8]

Rows (each round runs every row once, on a fresh topic, in rotated order; medians over rounds):

* ``emofleet AudioReferenceProducer`` -- ``send(dict)`` per reference: Avro validation + encode,
  partition key, per-message delivery callback, ``poll(0)``; then ``flush()``. acks=all, idempotent.
* ``raw confluent-kafka acks=all+idempotent`` -- the SAME pre-encoded bytes and keys, ``produce`` +
  ``poll(0)`` per message, one counting delivery callback, ``flush()``; the very producer config
  emofleet uses (``idempotent_producer_config``: linger.ms 20, lz4).
* ``raw confluent-kafka acks=1`` -- same loop, acks=1 without idempotence (context only).
* ``Avro encode only (no Kafka)`` -- ``codec.encode`` of every reference, to show where the gap goes.
* two what-if rows (``--no-what-if`` skips them): the same AudioReferenceProducer given (a) the
  compiled encoder prototype of bench/avro_fastpath.py, (b) a codec returning pre-encoded bytes
  (the wrapper's own cost: key, closure, delivery report bookkeeping), and (c) a lean send() sketch
  (one bound delivery callback, per-partition offset ranges instead of a list of tuples) with (a).

Producers are built (and their connection and producer id set up by one warm-up message) before the
clock starts; the clock stops when every delivery report is in. Target: emofleet >= 0.5x raw acks=all.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

from confluent_kafka import Producer

from emofleet.schemas.codec import make_codec
from emofleet.core.config import KafkaSettings
from emofleet.streams.producer import AudioReferenceProducer, idempotent_producer_config
from emofleet.streams.references import make_reference, message_key

from avro_fastpath import FastPathCodec
from harness import create_topic, embedded_broker, log, machine_line, markdown_table, median, unique, workspace

TARGET = 0.5
EMOFLEET = "emofleet AudioReferenceProducer (acks=all, idempotent)"
RAW_ALL = "raw confluent-kafka (acks=all, idempotent)"
RAW_ONE = "raw confluent-kafka (acks=1)"
ENCODE = "Avro encode only (no Kafka)"
FASTPATH = "what-if: AudioReferenceProducer + compiled encoder (bench/avro_fastpath.py)"
FLOOR = "what-if: AudioReferenceProducer, encode cost 0 (pre-encoded)"


class PreEncodedCodec:
    """Returns each reference's bytes encoded beforehand: the producer wrapper's cost without Avro."""

    def __init__(self, refs: list[dict], values: list[bytes]) -> None:
        self._values = {id(r): v for r, v in zip(refs, values)}

    def encode(self, name: str, record: dict, *, topic: str) -> bytes:
        return self._values[id(record)]


def references(count: int) -> list[dict]:
    """Realistic references: tenant/source/call metadata (keys by call), one attribute."""
    return [make_reference({"uri": f"s3://acme-calls/2026/11/{i // 4:07d}/{i % 4}.wav",
                            "tenant": "acme", "source": "contact-center", "channel": ("agent", "customer")[i % 2],
                            "call_id": f"call-{i // 4:07d}", "attributes": {"queue": f"q{i % 13}"}},
                           now_ms=1_790_000_000_000 + i)
            for i in range(count)]


def run_emofleet(kafka: KafkaSettings, refs: list[dict], codec=None) -> float:  # type: ignore[no-untyped-def]
    producer = AudioReferenceProducer(kafka, codec or make_codec())
    producer.send(refs[0])  # warm-up: metadata, InitProducerId, connection
    producer.flush()
    producer.report = type(producer.report)()  # count only the timed references
    started = time.perf_counter()
    for reference in refs:
        producer.send(reference)
    report = producer.flush()
    elapsed = time.perf_counter() - started
    if report.failed or report.sent != len(refs):
        raise RuntimeError(f"emofleet producer: sent {report.sent}, failed {report.failed[:3]}")
    return elapsed


def run_raw(config: dict, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    producer = Producer(config)
    delivered = 0
    failed: list[str] = []

    def on_delivery(error, _message) -> None:  # type: ignore[no-untyped-def]
        nonlocal delivered
        if error is None:
            delivered += 1
        else:
            failed.append(error.str())

    producer.produce(topic, value=messages[0][1], key=messages[0][0])  # warm-up, as above
    producer.flush()
    produce, poll = producer.produce, producer.poll
    started = time.perf_counter()
    for key, value in messages:
        while True:
            try:
                produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                poll(0.1)
        poll(0)
    remaining = producer.flush(60)
    elapsed = time.perf_counter() - started
    if remaining or failed or delivered != len(messages):
        raise RuntimeError(f"raw producer: delivered {delivered}, remaining {remaining}, failed {failed[:3]}")
    return elapsed


def run_encode(topic: str, refs: list[dict]) -> float:
    codec = make_codec()
    started = time.perf_counter()
    for reference in refs:
        codec.encode("audio_reference", reference, topic=topic)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--references", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--no-what-if", action="store_true", help="skip the two what-if rows")
    args = parser.parse_args()

    refs = references(args.references)
    codec = make_codec()
    messages = [(message_key(r), codec.encode("audio_reference", r, topic="x")) for r in refs]
    avg_bytes = sum(len(v) for _, v in messages) / len(messages)
    log(f"{len(refs)} references, {avg_bytes:.0f} B Avro value on average")

    with workspace("emofleet-bench-producer-") as workdir, embedded_broker(workdir) as bootstrap:
        base = KafkaSettings(bootstrap_servers=bootstrap, partitions=args.partitions)

        def fresh_topic(label: str) -> str:
            topic = unique(f"producer-{label}")
            create_topic(bootstrap, topic, args.partitions)
            return topic

        def emofleet_row() -> float:
            return run_emofleet(replace(base, audio_topic=fresh_topic("emofleet")), refs)

        def raw_all_row() -> float:
            return run_raw(idempotent_producer_config(base), fresh_topic("raw-all"), messages)

        def raw_one_row() -> float:
            config = idempotent_producer_config(base, **{"enable.idempotence": False, "acks": "1"})
            return run_raw(config, fresh_topic("raw-one"), messages)

        def encode_row() -> float:
            return run_encode("x", refs)

        fastpath, pre_encoded = FastPathCodec(), PreEncodedCodec(refs, [v for _, v in messages])

        def fastpath_row() -> float:
            return run_emofleet(replace(base, audio_topic=fresh_topic("fastpath")), refs, fastpath)

        def floor_row() -> float:
            return run_emofleet(replace(base, audio_topic=fresh_topic("floor")), refs, pre_encoded)

        rows: dict[str, Callable[[], float]] = {EMOFLEET: emofleet_row, RAW_ALL: raw_all_row,
                                                RAW_ONE: raw_one_row, ENCODE: encode_row}
        if not args.no_what_if:
            rows |= {FASTPATH: fastpath_row, FLOOR: floor_row}
        seconds: dict[str, list[float]] = {name: [] for name in rows}
        names = list(rows)
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]  # rotate: no fixed slot
            for name in order:
                elapsed = rows[name]()
                seconds[name].append(elapsed)
                log(f"round {round_index + 1}/{args.rounds} {name}: {len(refs) / elapsed:,.0f} refs/s")

    raw_rate = len(refs) / median(seconds[RAW_ALL])
    table_rows = []
    for name in names:
        rates = [len(refs) / s for s in seconds[name]]
        table_rows.append([name, len(refs), median(seconds[name]), median(rates),
                           f"{median(rates) / raw_rate:.2f}x",
                           ", ".join(f"{r:,.0f}" for r in rates)])
    per_round = [s_raw / s_emo for s_emo, s_raw in zip(seconds[EMOFLEET], seconds[RAW_ALL])]
    ratio = median([len(refs) / s for s in seconds[EMOFLEET]]) / raw_rate
    print(f"\n### Producer: {len(refs):,} references x {args.rounds} rounds, {args.partitions} partitions, "
          f"{avg_bytes:.0f} B values (medians; {machine_line()})\n")
    print(markdown_table(["run", "refs", "seconds", "refs/s", "ratio vs raw acks=all", "refs/s per round"],
                         table_rows))
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"\nemofleet / raw (acks=all, idempotent) = **{ratio:.2f}x** (per round: "
          f"{', '.join(f'{r:.2f}' for r in per_round)}); target >= {TARGET}x: **{verdict}**")


if __name__ == "__main__":
    main()
