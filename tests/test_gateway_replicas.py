"""`emofleet serve` as processes: any replica answers any request; restarting every replica loses nothing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from emofleet.core.config import Settings
from emofleet.schemas.emotions import EMOTIONS

from audio_fixtures import wav
from gateway_helpers import KEY_A, KEY_B, auth, gateway_process, gateway_settings, sink_process, wait_for
from pipeline_helpers import create_topics, running_processor


@pytest.mark.slow
def test_any_replica_answers_any_request(settings: Settings, redis_client, tiny_model, tmp_path: Path) -> None:
    create_topics(settings)
    settings = gateway_settings(settings)
    settings = replace(settings, observability=replace(settings.observability, log_format="json"))
    with running_processor(settings, model=tiny_model), \
            gateway_process(settings, tmp_path / "a.log") as a, gateway_process(settings, tmp_path / "b.log") as b:
        accepted = httpx.post(f"{a}/v1/analyze", content=wav(1.1), timeout=30,
                              headers={**auth(), "Content-Type": "audio/wav", "Prefer": "respond-async",
                                       "X-Request-ID": "trace-42"})
        assert accepted.status_code == 202, accepted.text
        location = accepted.headers["location"]
        from_b = wait_for(lambda: (r := httpx.get(f"{b}{location}", headers=auth())).status_code == 200 and r,
                          "B serving A's result", timeout=60)
        sync_on_b = httpx.post(f"{b}/v1/analyze", content=wav(1.2), timeout=60,
                               headers={**auth(), "Content-Type": "audio/wav"})
        same_on_a = httpx.get(f"{a}/v1/results/{sync_on_b.json()['id']}", headers=auth(), timeout=10)
    assert from_b.json()["id"] == accepted.json()["id"] and from_b.json()["tenant"] == "acme"
    assert from_b.json()["attributes"]["request_id"] == "trace-42" == accepted.headers["x-request-id"]
    lines = [json.loads(line) for line in (tmp_path / "a.log").read_text().splitlines() if line.startswith("{")]
    assert any(line.get("request_id") == "trace-42" and line.get("audio_id") == accepted.json()["id"]
               for line in lines if line["logger"] == "emofleet.gateway.app")  # the access line ties both ids
    assert KEY_A not in (tmp_path / "a.log").read_text()
    assert sync_on_b.status_code == 200 and sync_on_b.json()["cache_hit"] is False
    assert same_on_a.status_code == 200 and same_on_a.json()["scores"] == sync_on_b.json()["scores"]


@pytest.mark.slow
def test_accepted_requests_survive_restarting_every_gateway(settings: Settings, redis_client, tiny_model,
                                                            tmp_path: Path) -> None:
    """Accepted, then both replicas gone before any result exists: new replicas answer from ClickHouse."""
    create_topics(settings)
    settings = gateway_settings(settings)
    async_audio = {**auth(), "Content-Type": "audio/wav", "Prefer": "respond-async"}
    with sink_process(settings, tmp_path / "sink.log"):
        with gateway_process(settings, tmp_path / "a.log") as a, gateway_process(settings, tmp_path / "b.log"):
            scored = httpx.post(f"{a}/v1/analyze?call_id=call-9&source=app", content=wav(1.4), headers=async_audio)
            rejected = httpx.post(f"{a}/v1/analyze?call_id=call-9", content=wav(0.01), headers=async_audio)
        assert (scored.status_code, rejected.status_code) == (202, 202), scored.text + rejected.text
        with running_processor(settings, model=tiny_model), \
                gateway_process(settings, tmp_path / "a2.log") as a2, gateway_process(settings, tmp_path / "b2.log") as b2:
            done = wait_for(lambda: (r := httpx.get(f"{b2}{scored.headers['location']}", headers=auth())).status_code
                            == 200 and r, "the stored result", timeout=90)
            failed = wait_for(lambda: (r := httpx.get(f"{a2}{rejected.headers['location']}", headers=auth())).status_code
                              == 422 and r, "the stored dead letter", timeout=90)
            foreign = [httpx.get(f"{url}{response.headers['location']}", headers=auth(KEY_B))
                       for url in (a2, b2) for response in (scored, rejected)]
            by_call = httpx.get(f"{a2}/v1/calls/call-9/results", headers=auth())
            by_call_foreign = httpx.get(f"{b2}/v1/calls/call-9/results", headers=auth(KEY_B))
    answer = done.json()
    assert answer["id"] == scored.json()["id"] and answer["tenant"] == "acme" and answer["call_id"] == "call-9"
    assert set(answer["scores"]) == set(EMOTIONS) and answer["label"] in EMOTIONS and answer["model"]["id"] == "tiny"
    assert failed.json()["reason"] == "too_short"
    assert [r.status_code for r in foreign] == [404, 404, 404, 404]  # results and dead letters: the tenant's own
    assert by_call.status_code == 200, by_call.text
    assert [r["id"] for r in by_call.json()["results"]] == [answer["id"]]  # the rejected clip has no result
    assert by_call.json()["results"][0]["scores"] == pytest.approx(answer["scores"])
    assert by_call_foreign.status_code == 200 and by_call_foreign.json()["results"] == []
