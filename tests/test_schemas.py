"""Avro contracts and codec: round trips in both wire formats, evolution, docs, and every error path."""

from __future__ import annotations

import io
import json
import pickle
import struct
from collections.abc import Callable
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from emofleet.schemas import codec as codec_module
from emofleet.schemas.codec import (
    HISTORY_DIR,
    SCHEMA_DIR,
    SCHEMA_NAMES,
    SchemaError,
    load_schema,
    make_codec,
    schema_versions,
)
from emofleet.schemas.emotions import EMOTIONS, NEGATIVE_LABELS

TOPICS = {"audio_reference": "emofleet.audio", "emotion_event": "emofleet.emotions",
          "dead_letter": "emofleet.dead-letters", "emotion_aggregate": "emofleet.aggregates",
          "emotion_alert": "emofleet.alerts"}

# Values that float32 represents exactly, so round trips compare with ==.
SCORES = {"angry": 0.0, "disgusted": 0.0, "fearful": 0.0, "happy": 0.125, "neutral": 0.75, "other": 0.0,
          "sad": 0.0625, "surprised": 0.0625, "unknown": 0.0}

RECORDS: dict[str, dict[str, Any]] = {
    "audio_reference": {
        "audio_id": "clip-1", "uri": "s3://bucket/a/clip-1.wav", "tenant": "acme", "source": "contact-center",
        "channel": "customer", "call_id": "call-9", "produced_at": 1_767_225_600_123,
        "content_type": "audio/wav", "attributes": {"lang": "en", "queue": "billing"},
    },
    "emotion_event": {
        "event_id": "9f" * 32, "audio_id": "clip-1", "uri": "s3://bucket/a/clip-1.wav", "content_sha256": "ab" * 32,
        "model_id": "iic/emotion2vec_plus_large", "model_revision": "v2.0.4", "granularity": "frame",
        "label": "neutral", "confidence": 0.75, "scores": SCORES, "frame_scores": [SCORES, dict(SCORES, sad=0.5)],
        "embedding": [0.5, -0.25, 1.0], "duration_seconds": 42.5, "segment_index": 1, "segment_count": 2,
        "segment_start_seconds": 30.0, "segment_end_seconds": 42.5, "processed_at": 1_767_225_601_999,
        "processing_latency_ms": 1876, "cache_hit": True, "tenant": "acme", "source": None, "channel": "customer",
        "call_id": None, "attributes": {"lang": "en"}, "reference_produced_at": 1_767_225_600_123,
        "source_topic": "emofleet.audio", "source_partition": 7, "source_offset": 2**40 + 3,
    },
    "dead_letter": {
        "dead_letter_id": "emofleet.audio-7-123", "source_topic": "emofleet.audio", "source_partition": 7,
        "source_offset": 123, "key": b"clip-1", "payload": b"\xc3\x01\xff not avro",
        "headers": [{"key": "trace", "value": b"\x00\x01"}, {"key": "trace", "value": None}],
        "error_class": "FileNotFoundError", "error_message": "no such file: /x.wav", "reason": "file_not_found",
        "stage": "fetch", "attempts": 3, "audio_id": "clip-1", "uri": "file:///x.wav",
        "failed_at": 1_767_225_602_000, "processor": "emofleet-processors-1-abc",
    },
    "emotion_aggregate": {
        "aggregate_id": "0f" * 16, "scope": "source", "tenant": "acme", "scope_value": "contact-center",
        "window_type": "hopping", "window_size_seconds": 300, "window_hop_seconds": 60,
        "window_start": 1_767_225_600_000, "window_end": 1_767_225_900_000, "clips": 3,
        "label_counts": {"angry": 2, "disgusted": 0, "fearful": 0, "happy": 0, "neutral": 1, "other": 0, "sad": 0,
                         "surprised": 0, "unknown": 0},
        "mean_confidence": 0.625, "negativity": 2 / 3, "first_event_at": 1_767_225_600_123,
        "last_event_at": 1_767_225_899_999,
    },
    "emotion_alert": {
        "alert_id": "1e" * 16, "rule": "angry_streak", "scope": "call", "tenant": "acme", "scope_value": "call-9",
        "window_start": 1_767_225_600_123, "window_end": 1_767_225_610_123, "clips": 3, "value": 3.0,
        "threshold": 3.0, "min_clips": 3, "event_ids": ["a" * 64, "b" * 64, "c" * 64],
        "message": "3 angry clips in a row in call acme/call-9",
    },
}

# Only the fields without a default: what a minimal producer sends.
REQUIRED_ONLY = {
    "audio_reference": {"audio_id": "clip-2", "uri": "file:///data/clip-2.wav", "produced_at": 0},
    "dead_letter": {k: v for k, v in RECORDS["dead_letter"].items() if k not in {"key", "headers", "audio_id", "uri"}},
    "emotion_event": {k: v for k, v in RECORDS["emotion_event"].items()
                      if k not in {"frame_scores", "embedding", "tenant", "source", "channel", "call_id", "attributes"}},
    "emotion_aggregate": RECORDS["emotion_aggregate"],
    "emotion_alert": {k: v for k, v in RECORDS["emotion_alert"].items() if k != "event_ids"},
}

EXPECTED_FIELDS = {
    "audio_reference": ["audio_id", "uri", "tenant", "source", "channel", "call_id", "produced_at", "content_type",
                        "attributes"],
    "emotion_event": ["event_id", "audio_id", "uri", "content_sha256", "model_id", "model_revision", "granularity",
                      "label", "confidence", "scores", "frame_scores", "embedding", "duration_seconds",
                      "segment_index", "segment_count", "segment_start_seconds", "segment_end_seconds",
                      "processed_at", "processing_latency_ms", "cache_hit", "tenant", "source", "channel", "call_id",
                      "attributes", "reference_produced_at", "source_topic", "source_partition", "source_offset"],
    "dead_letter": ["dead_letter_id", "source_topic", "source_partition", "source_offset", "key", "payload", "headers",
                    "error_class", "error_message", "reason", "stage", "attempts", "audio_id", "uri", "failed_at",
                    "processor"],
    "emotion_aggregate": ["aggregate_id", "scope", "tenant", "scope_value", "window_type", "window_size_seconds",
                          "window_hop_seconds", "window_start", "window_end", "clips", "label_counts",
                          "mean_confidence", "negativity", "first_event_at", "last_event_at"],
    "emotion_alert": ["alert_id", "rule", "scope", "tenant", "scope_value", "window_start", "window_end", "clips",
                      "value", "threshold", "min_clips", "event_ids", "message"],
}
TIMESTAMP_FIELDS = {"audio_reference": ["produced_at"], "emotion_event": ["processed_at", "reference_produced_at"],
                    "dead_letter": ["failed_at"],
                    "emotion_aggregate": ["window_start", "window_end", "first_event_at", "last_event_at"],
                    "emotion_alert": ["window_start", "window_end"]}

ALL_SCHEMA_FILES = sorted(SCHEMA_DIR.glob("*.avsc")) + sorted(HISTORY_DIR.glob("*.avsc"))


def _registry_client() -> Any:
    sr = pytest.importorskip(
        "confluent_kafka.schema_registry",
        reason="registry mode needs confluent-kafka's schemaregistry extras (authlib, cachetools, httpx2)",
    )
    return sr.SchemaRegistryClient.new_client({"url": "mock://test-schemas"})


@pytest.fixture(params=["single-object", "confluent"])
def codec(request: pytest.FixtureRequest) -> Any:
    if request.param == "single-object":
        return make_codec()
    return make_codec(registry_client=_registry_client())


@pytest.fixture
def registry() -> Any:
    return _registry_client()


def _single_object(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    """Frame a record the way any other single-object producer would, with the given writer schema."""
    parsed = parse_schema(schema)
    buf = io.BytesIO()
    buf.write(b"\xc3\x01" + bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")))
    schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def _confluent(schema_id: int, schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    buf.write(b"\x00" + struct.pack(">I", schema_id))
    schemaless_writer(buf, parse_schema(schema), record)
    return buf.getvalue()


def _register(registry: Any, subject: str, schema: dict[str, Any]) -> int:
    from confluent_kafka.schema_registry import Schema

    return int(registry.register_schema(subject, Schema(json.dumps(schema), "AVRO")))


def _sample(schema: Any, named: dict[str, Any], fill_optional: bool) -> Any:
    """A valid datum for any (fastavro-parsed) schema: unions take their non-null branch when
    ``fill_optional``, else their first branch."""
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"] if fill_optional else schema
        return _sample(branches[0], named, fill_optional)
    if isinstance(schema, str):
        if schema in named:
            return _sample(named[schema], named, fill_optional)
        return {"null": None, "boolean": True, "int": -7, "long": 2**40, "float": 0.5, "double": 0.25,
                "bytes": b"\x00\xff", "string": "s"}[schema]
    kind = schema["type"]
    if kind == "record":
        return {f["name"]: _sample(f["type"], named, fill_optional) for f in schema["fields"]}
    if kind == "enum":
        return schema["symbols"][0]
    if kind == "array":
        return [_sample(schema["items"], named, fill_optional)] * 2
    if kind == "map":
        return {"k": _sample(schema["values"], named, fill_optional)}
    if kind == "fixed":
        return b"\x00" * schema["size"]
    return _sample(kind, named, fill_optional)


# ------------------------------------------------------------------------------------ the contracts


@pytest.mark.parametrize("path", ALL_SCHEMA_FILES, ids=lambda p: p.name)
def test_every_record_enum_and_field_has_a_doc(path) -> None:
    missing: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, list):
            for branch in node:
                walk(branch, where)
        elif isinstance(node, dict):
            if node.get("type") in {"record", "enum", "fixed"} and not node.get("doc"):
                missing.append(f"{where}:{node['name']}")
            for field in node.get("fields", []):
                if not str(field.get("doc", "")).strip():
                    missing.append(f"{where}.{field['name']}")
                walk(field["type"], f"{where}.{field['name']}")
            for key in ("items", "values"):
                if key in node:
                    walk(node[key], where)

    schema = json.loads(path.read_text())
    assert schema["namespace"] == "io.emofleet"
    walk(schema, schema["name"])
    assert not missing, f"no doc on: {missing}"


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_fields_match_the_contract(name: str) -> None:
    schema = load_schema(name)
    assert [f["name"] for f in schema["fields"]] == EXPECTED_FIELDS[name]
    types = {f["name"]: f["type"] for f in schema["fields"]}
    for field in TIMESTAMP_FIELDS[name]:
        assert types[field] == {"type": "long", "logicalType": "timestamp-millis"}


def test_emotion_enum_and_scores_agree() -> None:
    fields = {f["name"]: f["type"] for f in load_schema("emotion_event")["fields"]}
    emotion = fields["label"]
    assert emotion["symbols"] == ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised",
                                  "unknown"]
    assert emotion["default"] == "unknown"
    assert [f["name"] for f in fields["scores"]["fields"]] == emotion["symbols"]
    assert all(f["type"] == "float" for f in fields["scores"]["fields"])


def test_emotions_are_the_enum_symbols_in_the_models_output_order() -> None:
    # emotion2vec+'s tokens.txt in order (../shared/FACTS.md): 生气/angry, 厌恶/disgusted, 恐惧/fearful, 开心/happy,
    # 中立/neutral, 其他/other, 难过/sad, 吃惊/surprised, <unk>
    assert EMOTIONS == ("angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown")
    label = next(f["type"] for f in load_schema("emotion_event")["fields"] if f["name"] == "label")
    assert tuple(label["symbols"]) == EMOTIONS
    counts = next(f["type"] for f in load_schema("emotion_aggregate")["fields"] if f["name"] == "label_counts")
    assert tuple(f["name"] for f in counts["fields"]) == EMOTIONS
    assert NEGATIVE_LABELS == tuple(e for e in EMOTIONS if e in {"angry", "disgusted", "fearful", "sad"})


def test_schema_versions_and_load_schema() -> None:
    versions = schema_versions("emotion_event")
    assert list(versions) == list(range(1, len(versions) + 1)) and len(versions) >= 2
    assert versions[max(versions)] == SCHEMA_DIR / "emotion_event.avsc"
    assert load_schema("emotion_event", max(versions)) == load_schema("emotion_event")
    old = {f["name"] for f in load_schema("emotion_event", 1)["fields"]}
    assert {"frame_scores", "embedding"}.isdisjoint(old)
    load_schema("emotion_event")["fields"].clear()  # callers get copies
    assert load_schema("emotion_event")["fields"]
    with pytest.raises(SchemaError) as info:
        load_schema("no_such_schema")
    assert info.value.reason == "unknown_schema"
    with pytest.raises(SchemaError):
        load_schema("emotion_event", 99)


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_round_trip(codec: Any, name: str) -> None:
    data = codec.encode(name, RECORDS[name], topic=TOPICS[name])
    decoded = codec.decode(name, data, topic=TOPICS[name])
    assert decoded == RECORDS[name]
    for field in TIMESTAMP_FIELDS[name]:
        assert type(decoded[field]) is int  # never datetime


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_defaults_fill_omitted_fields(codec: Any, name: str) -> None:
    decoded = codec.decode(name, codec.encode(name, REQUIRED_ONLY[name], topic=TOPICS[name]), topic=TOPICS[name])
    defaults = {f["name"]: f["default"] for f in load_schema(name)["fields"] if "default" in f}
    assert decoded == {**REQUIRED_ONLY[name], **defaults}


def test_single_object_framing() -> None:
    # Spec test vector (Avro's schema-tests): CRC-64-AVRO of "null" is 7195948357588979594, written little-endian.
    assert bytes.fromhex(fingerprint(to_parsing_canonical_form("null"), "CRC-64-AVRO")) == struct.pack(
        "<Q", 7195948357588979594)
    data = make_codec().encode("audio_reference", RECORDS["audio_reference"], topic="any")
    canonical = to_parsing_canonical_form(load_schema("audio_reference"))
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    assert data == _single_object(json.loads((SCHEMA_DIR / "audio_reference.avsc").read_text()),
                                  RECORDS["audio_reference"])


def test_confluent_framing_uses_topic_subject(registry: Any) -> None:
    codec = make_codec(registry_client=registry)
    data = codec.encode("emotion_event", RECORDS["emotion_event"], topic="tenant-a.emotions")
    registered = registry.get_latest_version("tenant-a.emotions-value")
    assert data[:1] == b"\x00" and struct.unpack(">I", data[1:5])[0] == registered.schema_id
    assert json.loads(registered.schema.schema_str)["name"] == "EmotionEvent"
    # another codec on the same registry (another process) reads it
    assert make_codec(registry_client=registry).decode("emotion_event", data, topic="x") == RECORDS["emotion_event"]


def test_registry_url_selects_registry_mode() -> None:
    _registry_client()  # skip without the extras
    codec = make_codec("mock://from-url")
    assert codec.encode("audio_reference", RECORDS["audio_reference"], topic="t")[:1] == b"\x00"


def test_encode_does_not_parse_schemas_again(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = make_codec()
    data = codec.encode("emotion_event", RECORDS["emotion_event"], topic="t")

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("schema parsed per message")

    monkeypatch.setattr(codec_module, "parse_schema", fail)
    monkeypatch.setattr(codec_module, "to_parsing_canonical_form", fail)
    assert codec.decode("emotion_event", codec.encode("emotion_event", RECORDS["emotion_event"], topic="t"),
                        topic="t") == codec.decode("emotion_event", data, topic="t")


# ------------------------------------------------------------------------------------ evolution


def _history_cases() -> list[tuple[str, int]]:
    return [(name, v) for name in SCHEMA_NAMES for v in schema_versions(name) if v != max(schema_versions(name))]


def test_there_is_history() -> None:
    assert ("emotion_event", 1) in _history_cases()


@pytest.mark.parametrize(("name", "version"), _history_cases())
@pytest.mark.parametrize("fill_optional", [True, False])
def test_history_versions_are_backward_compatible(name: str, version: int, fill_optional: bool) -> None:
    """Whatever an old producer wrote, the current schema reads, and the codec decodes."""
    old_raw = json.loads(schema_versions(name)[version].read_text())
    old: dict[str, Any] = parse_schema(old_raw)  # type: ignore[assignment]
    current = load_schema(name)
    record = _sample(old, old["__named_schemas"], fill_optional)
    buf = io.BytesIO()
    schemaless_writer(buf, old, record)
    buf.seek(0)
    schemaless_reader(buf, old, current)  # fastavro's own resolution: raises if incompatible
    added = [f for f in current["fields"] if f["name"] not in record]
    assert all("default" in f for f in added), "fields added since an old version need defaults"

    decoded = make_codec().decode(name, _single_object(old_raw, record), topic=TOPICS[name])
    kept = {k: v for k, v in record.items() if k in {f["name"] for f in current["fields"]}}  # removed: dropped
    assert decoded == {**kept, **{f["name"]: f["default"] for f in added}}


def test_v1_emotion_event_decodes_in_both_modes(registry: Any) -> None:
    v1_raw = json.loads(schema_versions("emotion_event")[1].read_text())
    v1_record = {k: v for k, v in RECORDS["emotion_event"].items() if k not in {"frame_scores", "embedding"}}
    expected = {**v1_record, "frame_scores": None, "embedding": None}
    assert make_codec().decode("emotion_event", _single_object(v1_raw, v1_record), topic="t") == expected
    schema_id = _register(registry, "emofleet.emotions-value", v1_raw)
    data = _confluent(schema_id, v1_raw, v1_record)
    assert make_codec(registry_client=registry).decode("emotion_event", data, topic="emofleet.emotions") == expected


def test_defaults_filled_by_the_reader_are_not_shared(registry: Any) -> None:
    """fastavro hands out the reader schema's own default object for fields the writer lacks;
    the codec must copy it, or one consumer mutating `attributes` changes every later record."""
    old = json.loads((SCHEMA_DIR / "audio_reference.avsc").read_text())
    old["fields"] = [f for f in old["fields"] if f["name"] != "attributes"]
    record = {k: v for k, v in RECORDS["audio_reference"].items() if k != "attributes"}
    data = _confluent(_register(registry, "emofleet.audio-value", old), old, record)
    codec = make_codec(registry_client=registry)
    first = codec.decode("audio_reference", data, topic="emofleet.audio")
    assert first["attributes"] == {}
    first["attributes"]["polluted"] = "yes"
    assert codec.decode("audio_reference", data, topic="emofleet.audio")["attributes"] == {}
    assert load_schema("audio_reference")["fields"][-1]["default"] == {}


def test_new_enum_symbol_reads_as_default(registry: Any) -> None:
    """A producer on a future schema with an extra emotion: today's reader maps it to "unknown"."""
    future = json.loads((SCHEMA_DIR / "emotion_event.avsc").read_text())
    label = next(f for f in future["fields"] if f["name"] == "label")
    label["type"]["symbols"].append("calm")
    schema_id = _register(registry, "emofleet.emotions-value", future)
    data = _confluent(schema_id, future, dict(RECORDS["emotion_event"], label="calm"))
    decoded = make_codec(registry_client=registry).decode("emotion_event", data, topic="emofleet.emotions")
    assert decoded == dict(RECORDS["emotion_event"], label="unknown")


# ------------------------------------------------------------------------------------ errors


def _error(call: Callable[[], Any], reason: str) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        call()
    assert info.value.reason == reason, str(info.value)
    return info.value


@pytest.mark.parametrize("case", ["empty", "garbage", "truncated", "trailing", "header_only", "not_bytes"])
def test_malformed_bytes(codec: Any, case: str) -> None:
    good = codec.encode("emotion_event", RECORDS["emotion_event"], topic="emofleet.emotions")
    data = {"empty": b"", "garbage": b"\x17not avro at all", "truncated": good[:-5], "trailing": good + b"\x00",
            "header_only": good[:10] if good[:1] == b"\xc3" else good[:5], "not_bytes": None}[case]
    err = _error(lambda: codec.decode("emotion_event", data, topic="emofleet.emotions"), "malformed")
    assert "emotion_event" in str(err) and err.schema == "emotion_event"


def test_unknown_fingerprint() -> None:
    codec = make_codec()
    data = codec.encode("audio_reference", RECORDS["audio_reference"], topic="t")
    forged = data[:2] + b"\x01" * 8 + data[10:]
    err = _error(lambda: codec.decode("audio_reference", forged, topic="t"), "unknown_schema")
    assert "0101010101010101" in str(err)
    # a known fingerprint of another schema: names it
    other = codec.encode("dead_letter", RECORDS["dead_letter"], topic="t")
    assert "dead_letter" in str(_error(lambda: codec.decode("audio_reference", other, topic="t"), "unknown_schema"))


def test_unknown_registry_schema(registry: Any) -> None:
    codec = make_codec(registry_client=registry)
    data = codec.encode("audio_reference", RECORDS["audio_reference"], topic="t")
    forged = b"\x00" + struct.pack(">I", 4242) + data[5:]
    assert "4242" in str(_error(lambda: codec.decode("audio_reference", forged, topic="t"), "unknown_schema"))
    other = codec.encode("dead_letter", RECORDS["dead_letter"], topic="dl")
    err = _error(lambda: codec.decode("audio_reference", other, topic="dl"), "unknown_schema")
    assert "DeadLetter" in str(err)


def test_registry_outage_is_not_a_schema_error(registry: Any) -> None:
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    data = make_codec(registry_client=registry).encode("audio_reference", RECORDS["audio_reference"], topic="t")

    class Down:
        def get_schema(self, schema_id: int) -> Any:
            raise SchemaRegistryError(503, -1, "unavailable")

    with pytest.raises(SchemaRegistryError):
        make_codec(registry_client=Down()).decode("audio_reference", data, topic="t")

    class Unreachable(type(registry)):  # type: ignore[misc]
        def register_schema_full_response(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionRefusedError("registry down")

    with pytest.raises(ConnectionRefusedError):
        make_codec(registry_client=Unreachable({"url": "mock://down"})).encode(
            "audio_reference", RECORDS["audio_reference"], topic="t")


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        ({"audio_id": None}, "audio_id"),
        ({"confidence": "high"}, "confidence"),
        ({"cache_hit": 1}, "cache_hit"),
        ({"segment_index": 1.5}, "segment_index"),
        ({"source_partition": 2**31}, "source_partition"),
        ({"label": "calm"}, "label"),
        ({"scores": {**SCORES, "happy": "x"}}, "happy"),
        ({"attributes": {"k": 1}}, "attributes"),
        ({"embedding": [0.5, None]}, "embedding"),
        ({"tenant_id": "acme"}, "tenant_id"),  # misspelt optional field must not vanish silently
    ],
)
def test_invalid_record(codec: Any, change: dict[str, Any], mentions: str) -> None:
    record = {**RECORDS["emotion_event"], **change}
    err = _error(lambda: codec.encode("emotion_event", record, topic="emofleet.emotions"), "invalid_record")
    assert mentions in str(err)


def test_missing_required_field_and_non_mapping(codec: Any) -> None:
    record = dict(RECORDS["audio_reference"])
    del record["uri"]
    assert "uri" in str(_error(lambda: codec.encode("audio_reference", record, topic="t"), "invalid_record"))
    _error(lambda: codec.encode("audio_reference", ["not", "a", "dict"], topic="t"), "invalid_record")


def test_unknown_schema_name(codec: Any) -> None:
    _error(lambda: codec.encode("alerts", {}, topic="t"), "unknown_schema")


def test_each_mode_rejects_the_other(registry: Any) -> None:
    plain, confluent = make_codec(), make_codec(registry_client=registry)
    record = RECORDS["audio_reference"]
    err = _error(lambda: plain.decode("audio_reference", confluent.encode("audio_reference", record, topic="t"),
                                      topic="t"), "malformed")
    assert "Confluent" in str(err) and "registry" in str(err)
    err = _error(lambda: confluent.decode("audio_reference", plain.encode("audio_reference", record, topic="t"),
                                          topic="t"), "malformed")
    assert "single-object" in str(err)


def test_schema_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(SchemaError("bad", reason="malformed", schema="dead_letter")))
    assert (str(err), err.reason, err.schema) == ("bad", "malformed", "dead_letter")
    assert isinstance(err, ValueError)
