from __future__ import annotations

from pathlib import Path

from emofleet.streams.config import Settings

from pipeline_helpers import create_topics, enqueue_uris, outcomes, running_processor, sample_uris


def test_processor_turns_references_into_events(settings: Settings, tmp_path: Path, redis_client) -> None:
    create_topics(settings)
    uris = sample_uris(tmp_path / "clips", 30, min_seconds=0.5, max_seconds=4)
    references = enqueue_uris(settings, uris, tenant="acme", source="calls")

    with running_processor(settings):
        events, dead = outcomes(settings, len(references))

    assert dead == []
    assert sorted(e["audio_id"] for e in events) == sorted(r["audio_id"] for r in references)
    event = events[0]
    assert event["tenant"] == "acme" and event["model_id"] and event["label"] in event["scores"]
    assert abs(sum(event["scores"].values()) - 1) < 1e-4
