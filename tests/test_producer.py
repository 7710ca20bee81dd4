from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

from confluent_kafka.admin import AdminClient

from emofleet.schemas.codec import make_codec
from emofleet.core.config import Settings
from emofleet.streams.producer import AudioReferenceProducer
from emofleet.streams.references import make_reference
from emofleet.streams.topics import ensure_topics, pipeline_topics

from kafka_helpers import read_topic


def _topics(settings: Settings) -> None:
    ensure_topics(AdminClient(settings.kafka.client_config()), pipeline_topics(settings.kafka))


def test_ten_thousand_references_round_trip_with_stable_partitions(settings: Settings) -> None:
    _topics(settings)
    codec = make_codec()
    references = [make_reference({"uri": f"s3://calls/{i}.wav", "call_id": f"call-{i % 97}", "tenant": "acme",
                                  "attributes": {"n": str(i)}}, now_ms=1_700_000_000_000 + i)
                  for i in range(10_000)]

    with AudioReferenceProducer(settings.kafka, codec) as producer:
        for reference in references:
            producer.send(reference)
    messages = read_topic(settings.kafka.bootstrap_servers, settings.kafka.audio_topic, len(references))

    assert producer.report.sent == 10_000 and producer.report.failed == []
    decoded = {}
    partitions_per_key = collections.defaultdict(set)
    for message in messages:
        record = codec.decode("audio_reference", message.value(), topic=message.topic())
        decoded[record["audio_id"]] = record
        partitions_per_key[message.key()].add(message.partition())
    assert len(messages) == 10_000
    assert decoded == {r["audio_id"]: r for r in references}, "every reference arrives intact, once"
    assert all(len(p) == 1 for p in partitions_per_key.values()), "one call's clips share one partition"
    assert len({p for ps in partitions_per_key.values() for p in ps}) > 1, "calls spread over partitions"


def test_one_calls_clips_keep_their_order(settings: Settings) -> None:
    _topics(settings)
    codec = make_codec()
    with AudioReferenceProducer(settings.kafka, codec) as producer:
        for i in range(200):
            producer.send(make_reference({"uri": f"s3://calls/{i}.wav", "call_id": "one-call"}))
    messages = read_topic(settings.kafka.bootstrap_servers, settings.kafka.audio_topic, 200)

    uris = [codec.decode("audio_reference", m.value(), topic=m.topic())["uri"] for m in messages]
    assert uris == [f"s3://calls/{i}.wav" for i in range(200)]


def test_cli_produce_reports_bad_items_and_still_sends_the_rest(settings: Settings, tmp_path: Path) -> None:
    _topics(settings)
    good = tmp_path / "good.wav"
    good.write_bytes(b"RIFF")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"uri": "s3://b/x.wav"}) + "\n{broken\n"
                        + json.dumps({"uri": "gopher://h/x"}) + "\n")

    result = subprocess.run(
        [sys.executable, "-m", "emofleet.cli", "produce", str(good), str(tmp_path / "missing.wav"),
         "--manifest", str(manifest), "--bootstrap-servers", settings.kafka.bootstrap_servers,
         "--topic", settings.kafka.audio_topic, "--data-dir", str(settings.data_dir)],
        capture_output=True, text=True, timeout=60)
    messages = read_topic(settings.kafka.bootstrap_servers, settings.kafka.audio_topic, 2)

    assert result.returncode == 1, "a failed item makes the command fail"
    assert "sent 2, failed 3" in result.stdout
    assert "missing.wav: no such file" in result.stderr
    assert "m.jsonl:2: not valid JSON" in result.stderr
    assert "m.jsonl:3" in result.stderr and "gopher" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(messages) == 2


def test_cli_user_mistake_is_one_line_with_a_hint(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "emofleet.cli", "produce", "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=30)

    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "emofleet: error: nothing to produce"
    assert "hint:" in result.stderr and "Traceback" not in result.stderr
