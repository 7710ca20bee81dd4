"""`emofleet dead-letters` end to end: a reference dead-lettered for a disallowed root is listed, summarised, shown
with its payload decoded, dry-run, replayed once the root is allowed, lands exactly once, and a second replay is a
no-op. Real broker, Redis, chDB, the tiny model and a sink."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from emofleet.cli import main
from emofleet.core.config import Settings, to_env
from emofleet.sinks.query_server import owner_runner
from emofleet.streams.results import scan

from pipeline_helpers import create_topics, enqueue_uris, running_processor, sample_uris
from test_sink import chdb, running_sink, sink_settings  # noqa: F401 - fixtures
from waiting import wait_for


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_replay_after_the_root_is_allowed_lands_exactly_once(sink_settings: Settings, chdb, tiny_model,  # noqa: F811
                                                            redis_client, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    clips = tmp_path / "clips"
    (uri,) = sample_uris(clips, 1)
    refused = replace(sink_settings, audio=replace(sink_settings.audio, file_roots=(tmp_path / "elsewhere",)))
    allowed = replace(sink_settings, audio=replace(sink_settings.audio, file_roots=(clips,)))
    for name, value in to_env(allowed).items():
        monkeypatch.setenv(name, value)
    database = sink_settings.clickhouse.database
    create_topics(sink_settings)
    (reference,) = enqueue_uris(sink_settings, [uri], tenant="acme", call_id="c-1")

    with running_sink(sink_settings, chdb):
        run = owner_runner(sink_settings.data_dir)
        assert run is not None

        def rows(table: str) -> list[dict]:
            return run(f"SELECT * FROM {database}.{table} FINAL", {})

        with running_processor(refused, model=tiny_model):
            (dead,) = wait_for(lambda: rows("dead_letters"), "the dead letter in ClickHouse", timeout=90)
        assert dead["reason"] == "root_not_allowed"
        dead_id = dead["dead_letter_id"]

        code, out, _ = cli(capsys, "dead-letters", "list", "--reason", "root_not_allowed", "--format", "json")
        assert code == 0
        (listed,) = json.loads(out)
        assert listed["dead_letter_id"] == dead_id and listed["tenant"] == "acme" and listed["stage"] == "audio"

        code, out, _ = cli(capsys, "dead-letters", "summary", "--format", "json")
        summary = json.loads(out)
        assert summary["by_reason"] == [{"reason": "root_not_allowed", "dead_letters": 1}]
        assert summary["by_tenant"] == [{"tenant": "acme", "dead_letters": 1}]

        code, out, _ = cli(capsys, "dead-letters", "show", dead_id)
        assert code == 0 and "AudioReference" in out and reference["audio_id"] in out and '"call_id": "c-1"' in out

        code, out, err = cli(capsys, "dead-letters", "replay", "--reason", "root_not_allowed", "--dry-run")
        assert code == 0 and "would replay" in out and "would replay 1 of 1" in err
        audio = list(scan(sink_settings.kafka, [sink_settings.kafka.audio_topic]))
        assert len(audio) == 1, "a dry run sends nothing"

        code, out, err = cli(capsys, "dead-letters", "replay", "--id", dead_id)
        assert code == 0 and "replayed 1 of 1" in err
        code, out, err = cli(capsys, "dead-letters", "replay", "--id", dead_id)
        assert code == 0 and "skip: already replayed" in out and "replayed 0 of 1" in err

        with running_processor(allowed, model=tiny_model):
            (event,) = wait_for(lambda: rows("emotion_events"), "the replayed reference's result", timeout=90)
        code, out, err = cli(capsys, "dead-letters", "replay", "--id", dead_id, "--dry-run")
        assert "skip: already has a result" in out, "with the replay log gone the stored result still says so"

        code, out, _ = cli(capsys, "results", "--audio-id", reference["audio_id"], "--format", "jsonl")
        (found,) = [json.loads(line) for line in out.splitlines()]

    audio = list(scan(sink_settings.kafka, [sink_settings.kafka.audio_topic]))
    assert len(audio) == 2, "the original and exactly one replay"
    replayed = audio[1]
    assert replayed.key == audio[0].key and replayed.record["produced_at"] == reference["produced_at"]
    assert event["audio_id"] == reference["audio_id"] and event["call_id"] == "c-1"
    lineage = {k: v for k, v in event["attributes"].items() if k.startswith("emofleet.replay.")}
    assert lineage == {"emofleet.replay.dead_letter_id": dead_id, "emofleet.replay.count": "1",
                       "emofleet.replay.attempts": "1", "emofleet.replay.reason": "root_not_allowed",
                       "emofleet.replay.origin": f"{sink_settings.kafka.audio_topic}/{dead['source_partition']}/"
                                                 f"{dead['source_offset']}"}
    assert found["event_id"] == event["event_id"] and found["attributes"] == event["attributes"]
