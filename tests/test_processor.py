from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from confluent_kafka import Producer

from emofleet.infra.local_stack import free_port
from emofleet.samples import synth_clip
from emofleet.schemas.codec import make_codec
from emofleet.core.config import Settings
from emofleet.streams.references import make_reference

from metrics_helpers import metric, metric_total
from pipeline_helpers import create_topics, enqueue_uris, outcomes, running_processor, sample_uris


def test_processor_turns_references_into_events(settings: Settings, tmp_path: Path, tiny_model, redis_client) -> None:
    create_topics(settings)
    uris = sample_uris(tmp_path / "clips", 30, min_seconds=0.5, max_seconds=4)
    references = enqueue_uris(settings, uris, tenant="acme", source="calls", call_id="c1")

    with running_processor(settings, model=tiny_model) as processor:
        events, dead = outcomes(settings, len(references))

    assert dead == []
    assert sorted(e["audio_id"] for e in events) == sorted(r["audio_id"] for r in references)
    assert len({e["event_id"] for e in events}) == len(events)
    event = events[0]
    assert (event["tenant"], event["source"], event["call_id"]) == ("acme", "calls", "c1")
    assert event["model_id"] and event["label"] in event["scores"] and not event["cache_hit"]
    assert abs(sum(event["scores"].values()) - 1) < 1e-4
    assert event["source_topic"] == settings.kafka.audio_topic
    assert metric(processor.metrics, "emofleet_batch_clips_count") < len(references), "clips were batched"


def test_long_audio_gets_an_event_per_window_and_one_for_the_clip(settings: Settings, tmp_path: Path,
                                                                    tiny_model, redis_client) -> None:
    create_topics(settings)
    path = tmp_path / "long.wav"
    sf.write(path, synth_clip(70.0, seed=3), 16_000)
    enqueue_uris(settings, [path.as_uri()])

    with running_processor(settings, model=tiny_model):
        whole, dead = outcomes(settings, 1)
        from kafka_helpers import read_topic
        messages = read_topic(settings.kafka.bootstrap_servers, settings.kafka.results_topic, 4)

    codec = make_codec()
    events = sorted((codec.decode("emotion_event", m.value(), topic=m.topic()) for m in messages),
                    key=lambda e: e["segment_index"])
    assert dead == [] and len(whole) == 1
    assert [(e["segment_index"], e["segment_start_seconds"], e["segment_end_seconds"]) for e in events] == [
        (-1, 0.0, 70.0), (0, 0.0, 30.0), (1, 30.0, 60.0), (2, 60.0, 70.0)]
    assert {e["segment_count"] for e in events} == {3}
    weights = np.array([30, 30, 10]) / 70
    expected = sum(w * np.array(list(e["scores"].values())) for w, e in zip(weights, events[1:]))
    assert np.allclose(list(events[0]["scores"].values()), expected, atol=1e-5)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return path.as_uri()


def _wav_bytes(samples: np.ndarray, subtype: str = "PCM_16") -> bytes:
    import io

    buffer = io.BytesIO()
    sf.write(buffer, samples, 16_000, format="WAV", subtype=subtype)
    return buffer.getvalue()


def test_each_bad_input_is_dead_lettered_with_its_reason_while_good_ones_flow(
        settings: Settings, tmp_path: Path, tiny_model, redis_client) -> None:
    settings = replace(settings, audio=replace(settings.audio, max_seconds=20.0, http_hosts=("allowed.test",)))
    create_topics(settings)
    clips = tmp_path / "in"
    clips.mkdir()
    good = sample_uris(tmp_path / "good", 5, min_seconds=1, max_seconds=2)
    nan = synth_clip(1.0, 1)
    nan[100] = np.nan
    outside = tmp_path.parent / f"outside-{tmp_path.name}.wav"
    outside.write_bytes(_wav_bytes(synth_clip(1.0, 2)))
    bad = {
        "not_found": (clips / "missing.wav").as_uri(),
        "empty": _write(clips / "empty.wav", b""),
        "not_audio": _write(clips / "text.wav", b"hello, this is not audio at all" * 20),
        "corrupt": _write(clips / "truncated.wav", _wav_bytes(synth_clip(2.0, 4))[:20_000]),
        "non_finite": _write(clips / "nan.wav", _wav_bytes(nan, subtype="FLOAT")),
        "too_short": _write(clips / "short.wav", _wav_bytes(synth_clip(0.01, 5))),
        "too_long": _write(clips / "long.wav", _wav_bytes(synth_clip(25.0, 6))),
        "root_not_allowed": outside.as_uri(),
        "host_not_allowed": "https://evil.test/a.wav",
        "scheme_not_allowed": "s3://bucket/a.wav",
    }
    settings = replace(settings, audio=replace(settings.audio, allowed_schemes=("file", "https")))
    references = enqueue_uris(settings, [*good, *bad.values()])
    raw = Producer(settings.kafka.client_config())
    raw.produce(settings.kafka.audio_topic, value=b"\x00\x01garbage", key=b"malformed")
    unknown = b"\xc3\x01" + struct.pack("<q", 1234567) + b"\x02"
    raw.produce(settings.kafka.audio_topic, value=unknown, key=b"unknown")
    raw.flush(10)

    with running_processor(settings, model=tiny_model):
        events, dead = outcomes(settings, len(references) + 2)

    reasons = {d["uri"]: d["reason"] for d in dead if d["uri"]}
    assert reasons == {uri: reason for reason, uri in bad.items()}
    by_key = {d["key"]: d for d in dead if d["uri"] is None}
    assert by_key[b"malformed"]["reason"] == "malformed" and by_key[b"malformed"]["payload"] == b"\x00\x01garbage"
    assert by_key[b"unknown"]["reason"] == "unknown_schema" and by_key[b"unknown"]["stage"] == "decode"
    assert all(d["error_message"] and d["error_class"] and d["processor"] for d in dead)
    assert sorted(e["uri"] for e in events) == sorted(good), "valid messages keep flowing"


def test_same_content_is_computed_once_and_served_from_cache(settings: Settings, tmp_path: Path,
                                                             tiny_model, redis_client) -> None:
    create_topics(settings)
    uris = sample_uris(tmp_path / "clips", 6, min_seconds=1, max_seconds=2)
    first = enqueue_uris(settings, uris)

    with running_processor(settings, model=tiny_model) as processor:
        events_first, _ = outcomes(settings, len(first))
        second = enqueue_uris(settings, uris)  # same audio ids again: a replay
        copies = tmp_path / "copies"
        copies.mkdir()
        for i, uri in enumerate(uris):  # same bytes under other names and ids
            (copies / f"copy-{i}.wav").write_bytes(Path(uri.removeprefix("file://")).read_bytes())
        third = enqueue_uris(settings, [p.as_uri() for p in sorted(copies.iterdir())])
        events, dead = outcomes(settings, len(first) + len(second) + len(third))

    assert dead == []
    hits = [e for e in events if e["cache_hit"]]
    assert len(hits) == len(second) + len(third)
    computed = {e["audio_id"]: e for e in events if not e["cache_hit"]}
    replayed = [e for e in hits if e["audio_id"] in computed]
    assert len(replayed) == len(second)
    assert all(e["event_id"] == computed[e["audio_id"]]["event_id"] for e in replayed), "replays keep their ids"
    assert all(e["scores"] == computed[e["audio_id"]]["scores"] for e in replayed)
    assert metric(processor.metrics, "emofleet_cache_hits_total") == len(hits)
    assert metric(processor.metrics, "emofleet_model_batch_windows_sum") == len(uris), \
        "the model ran once per distinct clip"


def test_redis_down_processing_goes_on_without_the_cache(settings: Settings, tmp_path: Path, tiny_model) -> None:
    settings = replace(settings, cache=replace(settings.cache, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    create_topics(settings)
    references = enqueue_uris(settings, sample_uris(tmp_path / "clips", 8, min_seconds=1, max_seconds=2))

    with running_processor(settings, model=tiny_model) as processor:
        events, dead = outcomes(settings, len(references))

    assert dead == [] and len(events) == len(references)
    assert metric_total(processor.metrics, "emofleet_cache_errors_total") >= 1
    assert not any(e["cache_hit"] for e in events)


def test_full_in_flight_work_pauses_fetching_and_resumes(settings: Settings, tmp_path: Path, tiny_model,
                                                        redis_client) -> None:
    settings = replace(settings, batch=replace(settings.batch, max_in_flight=6, max_clips=2),
                       cache=replace(settings.cache, enabled=False))
    create_topics(settings)
    references = enqueue_uris(settings, sample_uris(tmp_path / "clips", 60, min_seconds=0.5, max_seconds=1))

    with running_processor(settings, model=tiny_model) as processor:
        events, dead = outcomes(settings, len(references))

    assert dead == [] and len(events) == len(references)
    assert metric(processor.metrics, "emofleet_backpressure_pauses_total") >= 1, \
        "the loop paused its partitions when work piled up"
    assert metric(processor.metrics, "emofleet_in_flight_messages_peak") <= 6 + settings.kafka.partitions, \
        "memory stays bounded"
    assert not processor.loop.paused or processor.loop.in_flight() == 0
