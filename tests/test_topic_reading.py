"""Reading the topics: a plain fastavro reader written from the README's paragraph alone, the consumer API
(ResultStream: decode, iterate with a group, at-least-once commits, older writer schemas) and scans."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path

import pytest
from confluent_kafka import Producer
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from emofleet.core.config import Settings
from emofleet.schemas.codec import make_codec, schema_versions
from emofleet.streams.results import Delivery, ResultStream, scan

from kafka_helpers import read_topic
from pipeline_helpers import create_topics
from sink_samples import sample_events


# ------------------------------------------------------------------ the README's reader, no emofleet imports


def avro_fingerprints(schema_dir: Path) -> dict[bytes, dict]:
    """Every .avsc under ``schema_dir`` (history included) by its CRC-64-AVRO fingerprint (8 bytes, little-endian)."""
    known = {}
    for path in sorted(schema_dir.rglob("*.avsc")):
        schema = parse_schema(json.loads(path.read_text()))
        known[bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))] = schema
    return known


def read_single_object(data: bytes, known: dict[bytes, dict]) -> dict:
    """C3 01, the writer schema's 8-byte fingerprint, then the Avro binary body."""
    if data[:2] != b"\xc3\x01":
        raise ValueError("not Avro single-object encoding")
    writer = known[data[2:10]]
    return schemaless_reader(io.BytesIO(data[10:]), writer, None)


# ------------------------------------------------------------------ helpers


def publish(settings: Settings, values: Iterable[tuple[bytes, bytes]]) -> None:
    producer = Producer(settings.kafka.client_config())
    for key, value in values:
        producer.produce(settings.kafka.results_topic, key=key, value=value)
    assert producer.flush(30) == 0


def encoded_events(settings: Settings, count: int, *, start: int = 0) -> list[tuple[dict, bytes]]:
    codec = make_codec()
    events = [e for i in range(start, start + count)
              for e in sample_events(audio_id=f"clip-{i}", produced_at_ms=1_764_000_000_000 + i)]
    return [(e, codec.encode("emotion_event", e, topic=settings.kafka.results_topic)) for e in events]


def v1_event_bytes(event: dict) -> bytes:
    """An EmotionEvent as the first version of the contract wrote it (before frame_scores and embedding)."""
    raw = json.loads(schema_versions("emotion_event")[1].read_text())
    schema = parse_schema(raw)
    body = io.BytesIO()
    schemaless_writer(body, schema, {k: v for k, v in event.items() if k not in {"frame_scores", "embedding"}})
    header = b"\xc3\x01" + bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
    return header + body.getvalue()


def take(stream: ResultStream, count: int, *, timeout: float = 60.0) -> list[Delivery]:
    """The first ``count`` deliveries (the loop is left while handling the last: it stays uncommitted)."""
    got: list[Delivery] = []
    watchdog = threading.Timer(timeout, stream.close)  # a stuck stream ends the iteration; the assert then fails
    watchdog.start()
    try:
        for delivery in stream:
            got.append(delivery)
            if len(got) == count:
                break
    finally:
        watchdog.cancel()
    return got


# ------------------------------------------------------------------ tests


def test_a_plain_fastavro_reader_reads_the_results_topic(settings: Settings) -> None:
    create_topics(settings)
    events = encoded_events(settings, 3)
    old = events[0][0] | {"audio_id": "written-by-v1"}
    publish(settings, [(e["audio_id"].encode(), data) for e, data in events] + [(b"v1", v1_event_bytes(old))])

    known = avro_fingerprints(Path(str(files("emofleet.schemas"))))
    messages = read_topic(settings.kafka.bootstrap_servers, settings.kafka.results_topic, len(events) + 1)
    decoded = {r["event_id"] + r["audio_id"]: r for r in (read_single_object(m.value(), known) for m in messages)}

    assert len(decoded) == len(events) + 1
    for event, _ in events:
        record = decoded[event["event_id"] + event["audio_id"]]
        assert record["label"] == event["label"] and record["scores"] == pytest.approx(event["scores"])
        assert record["attributes"] == event["attributes"] and record["call_id"] == event["call_id"]
    assert "frame_scores" not in decoded[old["event_id"] + "written-by-v1"], "read with its own (v1) writer schema"


def test_stream_decodes_commits_what_was_handled_and_reads_older_writers(settings: Settings) -> None:
    create_topics(settings)
    first = encoded_events(settings, 4)
    old = first[0][0] | {"audio_id": "written-by-v1", "event_id": "v1-event"}
    publish(settings, [(e["audio_id"].encode(), data) for e, data in first] + [(b"v1", v1_event_bytes(old))])

    with ResultStream(settings.kafka, group=f"{settings.kafka.sink_group}-svc") as stream:
        got = take(stream, len(first) + 1)
    by_id = {d.record["event_id"]: d.record for d in got}
    assert set(by_id) == {e["event_id"] for e, _ in first} | {"v1-event"}
    assert by_id["v1-event"]["frame_scores"] is None and by_id["v1-event"]["embedding"] is None
    assert all(d.topic == settings.kafka.results_topic and d.schema == "emotion_event" for d in got)

    # Everything handled before the clean exit was committed, except the last: `take` broke out of the loop
    # while handling it, so it was never reported handled and comes again.
    later = encoded_events(settings, 2, start=100)
    publish(settings, [(e["audio_id"].encode(), data) for e, data in later])
    with ResultStream(settings.kafka, group=f"{settings.kafka.sink_group}-svc") as stream:
        again = take(stream, len(later) + 1)
    assert {d.record["event_id"] for d in again} == {e["event_id"] for e, _ in later} | {got[-1].record["event_id"]}


def test_a_failing_handler_gets_its_event_again_and_nothing_past_it_is_committed(settings: Settings) -> None:
    create_topics(settings)
    events = encoded_events(settings, 12)
    publish(settings, [(e["audio_id"].encode(), data) for e, data in events])
    group = f"{settings.kafka.sink_group}-svc"
    poison = events[5][0]["event_id"]

    handled: list[Delivery] = []
    with ResultStream(settings.kafka, group=group) as stream, pytest.raises(RuntimeError, match="handler failed"):
        for delivery in stream:
            if delivery.record["event_id"] == poison:
                raise RuntimeError("handler failed")
            handled.append(delivery)

    everything = {e["event_id"] for e, _ in events}
    done = {d.record["event_id"] for d in handled}
    with ResultStream(settings.kafka, group=group) as stream:
        redelivered = take(stream, len(everything - done))
    assert poison in {d.record["event_id"] for d in redelivered}
    assert {d.record["event_id"] for d in redelivered} == everything - done, \
        "exactly what was not handled comes again: handled events were committed, nothing past the failure was"


def test_scan_reads_to_the_end_and_reports_progress(settings: Settings) -> None:
    create_topics(settings)
    events = encoded_events(settings, 5)
    publish(settings, [(e["audio_id"].encode(), data) for e, data in events] + [(b"junk", b"not avro")])
    seen: list[int] = []
    skipped: list[str] = []
    records = list(scan(settings.kafka, [settings.kafka.results_topic], on_message=lambda: seen.append(1),
                        on_undecodable=lambda message, error: skipped.append(error.reason)))
    assert sorted(d.record["event_id"] for d in records) == sorted(e["event_id"] for e, _ in events)
    assert len(seen) == len(events) + 1 and skipped == ["malformed"]
