"""`emofleet serve` in-process against the real broker, Redis and a processor with the tiny model."""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from emofleet.core.config import Settings
from emofleet.schemas.emotions import EMOTIONS

from audio_fixtures import wav
from gateway_helpers import KEY_A, KEY_B, auth, gateway_client, gateway_settings, wait_for
from kafka_helpers import read_topic
from pipeline_helpers import create_topics, running_processor


@pytest.fixture
def gw_settings(settings: Settings, redis_client) -> Settings:
    create_topics(settings)
    return gateway_settings(settings)


def test_a_clip_is_analyzed_synchronously_in_each_body_shape(gw_settings: Settings, tiny_model) -> None:
    clips = [wav(1.0 + i / 10) for i in range(3)]  # distinct bytes: no cache hits
    with running_processor(gw_settings, model=tiny_model), gateway_client(gw_settings) as client:
        multipart = client.post("/v1/analyze", headers={**auth(), "X-Request-ID": "req-1"},
                                files={"audio": ("a.wav", clips[0], "audio/wav")},
                                data={"call_id": "call-7", "source": "app", "attributes": '{"k": "v"}'})
        raw = client.post("/v1/analyze?channel=agent", headers={**auth(), "Content-Type": "audio/wav"},
                          content=clips[1])
        as_json = client.post("/v1/analyze", headers=auth(),
                              json={"audio": base64.b64encode(clips[2]).decode(), "granularity": "utterance"})
    for response in (multipart, raw, as_json):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer["scores"]) == set(EMOTIONS)
        assert answer["scores"][answer["label"]] == pytest.approx(answer["confidence"])
        assert sum(answer["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        assert answer["tenant"] == "acme" and answer["model"]["id"] == "tiny" and answer["cache_hit"] is False
        assert answer["timings"]["total_ms"] > 0 and "embedding" not in answer and answer["segments"] == []
    first = multipart.json()
    assert (first["call_id"], first["source"]) == ("call-7", "app")
    assert first["attributes"] == {"k": "v", "request_id": "req-1"} and multipart.headers["x-request-id"] == "req-1"
    assert raw.json()["channel"] == "agent"


def test_identical_audio_is_answered_from_the_cache_without_kafka(gw_settings: Settings, tiny_model) -> None:
    clip = wav(1.3)
    with running_processor(gw_settings, model=tiny_model), gateway_client(gw_settings) as client:
        first = client.post("/v1/analyze", headers={**auth(), "Content-Type": "audio/wav"}, content=clip)
        assert first.status_code == 200 and first.json()["cache_hit"] is False
        second = client.post("/v1/analyze", headers={**auth(KEY_B), "Content-Type": "audio/wav"}, content=clip)
        got = client.get(f"/v1/results/{second.json()['id']}", headers=auth(KEY_B))
    assert second.status_code == 200, second.text
    answer = second.json()
    assert answer["cache_hit"] is True and answer["tenant"] == "globex"
    assert answer["scores"] == first.json()["scores"] and answer["model"] == first.json()["model"]
    assert got.status_code == 200 and got.json()["scores"] == answer["scores"]
    assert len(read_topic(gw_settings.kafka.bootstrap_servers, gw_settings.kafka.audio_topic, 2, timeout=2)) == 1


def test_api_keys_decide_the_tenant(gw_settings: Settings) -> None:
    with gateway_client(gw_settings) as client:
        missing = client.post("/v1/analyze", content=wav(1.0), headers={"Content-Type": "audio/wav"})
        wrong = client.post("/v1/analyze", content=wav(1.0), headers={**auth("x" * 24), "Content-Type": "audio/wav"})
        tenant_in_body = client.post("/v1/analyze", headers=auth(),
                                     json={"audio": base64.b64encode(wav(1.0)).decode(), "tenant": "globex"})
    assert missing.status_code == 401 and missing.json()["reason"] == "no_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 403 and wrong.json()["reason"] == "unknown_api_key"
    assert tenant_in_body.status_code == 400 and "API key" in tenant_in_body.json()["detail"]


def test_malformed_oversized_and_non_audio_bodies_are_refused_at_once(gw_settings: Settings) -> None:
    settings = gateway_settings(gw_settings, max_body_bytes=50_000)
    big = wav(2.0)  # 64 kB
    with gateway_client(settings) as client:
        declared = client.post("/v1/analyze", headers={**auth(), "Content-Type": "audio/wav"}, content=big)
        streamed = client.post("/v1/analyze", headers={**auth(), "Content-Type": "audio/wav"},
                               content=iter([big[:30_000], big[30_000:]]))  # chunked: no Content-Length
        multipart = client.post("/v1/analyze", headers=auth(), files={"audio": ("a.wav", big, "audio/wav")})
        text = client.post("/v1/analyze", headers={**auth(), "Content-Type": "text/plain"}, content=b"hello")
        image = client.post("/v1/analyze", headers=auth(), files={"audio": ("a.png", b"\x89PNG....", "image/png")})
        bad_json = client.post("/v1/analyze", headers={**auth(), "Content-Type": "application/json"}, content=b"{no")
        bad_b64 = client.post("/v1/analyze", headers=auth(), json={"audio": "***"})
        bad_option = client.post("/v1/analyze", headers=auth(), json={"audio": "AAAA", "granularity": "word"})
        no_audio = client.post("/v1/analyze", headers=auth(), files={"call_id": (None, "c")})
        file_uri = client.post("/v1/analyze", headers=auth(), json={"uri": f"file://{Path.cwd()}/a.wav"})
        frames = client.post("/v1/analyze", headers=auth(), json={"audio": "AAAA", "granularity": "frame"})
    assert [r.status_code for r in (declared, streamed, multipart)] == [413, 413, 413]
    assert {r.json()["reason"] for r in (declared, streamed, multipart)} == {"too_large"}
    assert [r.status_code for r in (text, image)] == [415, 415]
    assert [r.status_code for r in (bad_json, bad_b64, bad_option, no_audio)] == [400, 400, 400, 400]
    assert file_uri.status_code == 400 and file_uri.json()["reason"] == "uri_not_allowed"
    assert frames.status_code == 422 and frames.json()["reason"] == "option_unavailable"
    assert list((settings.data_dir / "uploads").iterdir()) == []  # nothing half-written is left behind


def test_audio_the_pipeline_rejects_is_a_422_with_the_dead_letter_reason(gw_settings: Settings, tiny_model) -> None:
    with running_processor(gw_settings, model=tiny_model), gateway_client(gw_settings) as client:
        too_short = client.post("/v1/analyze", headers={**auth(), "Content-Type": "audio/wav"}, content=wav(0.01))
        not_audio = client.post("/v1/analyze", headers={**auth(), "Content-Type": "audio/wav"}, content=b"RIFF" * 100)
        fine = client.post("/v1/analyze", headers={**auth(), "Content-Type": "audio/wav"}, content=wav(1.0))
    assert too_short.status_code == 422 and too_short.json()["reason"] == "too_short", too_short.text
    assert not_audio.status_code == 422 and not_audio.json()["reason"] in ("not_audio", "malformed", "truncated")
    assert fine.status_code == 200  # nothing of another request is affected


def test_the_rate_limit_is_per_key_with_retry_after(gw_settings: Settings) -> None:
    settings = gateway_settings(gw_settings, rate_per_second=0.5, rate_burst=2)
    with gateway_client(settings) as client:
        statuses = [client.post("/v1/analyze", headers=auth(), json={}).status_code for _ in range(3)]
        limited = client.post("/v1/analyze", headers=auth(), json={})
        other_key = client.post("/v1/analyze", headers=auth(KEY_B), json={})
    assert statuses == [400, 400, 429]
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert other_key.status_code == 400  # another key's bucket is full


def test_a_saturated_pipeline_answers_503_with_retry_after(gw_settings: Settings) -> None:
    settings = gateway_settings(gw_settings, max_lag_messages=1, sync_wait_seconds=0.5)
    with gateway_client(settings) as client:  # no processor runs: every accepted reference is lag
        accepted = [client.post("/v1/analyze", headers={**auth(), "Prefer": "respond-async", "Content-Type": "audio/wav"},
                                content=wav(1.0 + i / 10)) for i in range(2)]
        assert [r.status_code for r in accepted] == [202, 202]
        wait_for(lambda: (client.app.state.parts.lag.lag or 0) >= 2, "lag measured")
        refused = client.post("/v1/analyze", headers={**auth(), "Content-Type": "audio/wav"}, content=wav(1.5))
        metrics = client.get("/metrics").text
    assert refused.status_code == 503 and refused.json()["reason"] == "saturated"
    assert int(refused.headers["retry-after"]) == settings.gateway.retry_after_seconds
    assert 'emofleet_gateway_rejections_total{reason="saturated"} 1.0' in metrics


def test_a_late_result_answers_504_with_a_location_that_later_serves_it(gw_settings: Settings, tiny_model) -> None:
    with gateway_client(gw_settings) as client:
        late = client.post("/v1/analyze", headers={**auth(), "Prefer": "wait=1", "Content-Type": "audio/wav"},
                           content=wav(1.2))
        assert late.status_code == 504, late.text
        location = late.headers["location"]
        assert client.get(location, headers=auth()).status_code == 202
        assert client.get(location, headers=auth(KEY_B)).status_code == 404  # another tenant's result
        with running_processor(gw_settings, model=tiny_model):
            done = wait_for(lambda: (r := client.get(location, headers=auth())).status_code == 200 and r,
                            "the late result", timeout=60)
    assert done.json()["id"] == late.json()["id"] and done.json()["label"] in EMOTIONS


def test_metrics_count_requests_by_route_and_status(gw_settings: Settings) -> None:
    with gateway_client(gw_settings) as client:
        client.post("/v1/analyze", json={})
        client.post("/v1/analyze", headers=auth(), json={})
        text = client.get("/metrics").text
        docs = client.get("/openapi.json").json()
    assert 'emofleet_http_requests_total{route="/v1/analyze",status="401"} 1.0' in text
    assert 'emofleet_http_requests_total{route="/v1/analyze",status="400"} 1.0' in text
    assert "emofleet_http_request_seconds_bucket" in text and "emofleet_gateway_waiting_requests 0.0" in text
    assert set(docs["paths"]["/v1/analyze"]["post"]["requestBody"]["content"]) >= {"multipart/form-data",
                                                                                  "application/json", "audio/*"}
    assert json.dumps(docs).count(KEY_A) == 0


def test_a_full_waiting_room_answers_503_and_spares_accepted_requests(gw_settings: Settings, tiny_model) -> None:
    settings = gateway_settings(gw_settings, max_waiting=1)
    async_audio = {**auth(), "Prefer": "respond-async", "Content-Type": "audio/wav"}
    with gateway_client(settings) as client:  # no processor yet: the accepted request keeps its seat
        accepted = client.post("/v1/analyze", headers=async_audio, content=wav(1.1))
        refused = client.post("/v1/analyze", headers=async_audio, content=wav(1.2))
        with running_processor(settings, model=tiny_model):
            done = wait_for(lambda: (r := client.get(accepted.headers["location"], headers=auth())).status_code == 200
                            and r, "the accepted request's result", timeout=60)
            wait_for(lambda: len(client.app.state.parts.waiters) == 0, "the seat freed")
            again = client.post("/v1/analyze", headers={**auth(), "Content-Type": "audio/wav"}, content=wav(1.2))
    assert accepted.status_code == 202 and done.json()["id"] == accepted.json()["id"]
    assert refused.status_code == 503 and refused.json()["reason"] == "busy"
    assert int(refused.headers["retry-after"]) == settings.gateway.retry_after_seconds
    assert again.status_code == 200, again.text


def test_uploads_go_to_object_storage_when_configured(gw_settings: Settings, tiny_model, monkeypatch) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="clips")
        settings = gateway_settings(gw_settings, uploads="s3://clips/uploads")
        settings = replace(settings, audio=replace(settings.audio, s3_endpoint=endpoint))
        with running_processor(settings, model=tiny_model), gateway_client(settings) as client:
            first = client.post("/v1/analyze", headers={**auth(), "Content-Type": "audio/wav"}, content=wav(1.3))
            again = client.post("/v1/analyze", headers={**auth(), "Content-Type": "audio/wav"}, content=wav(1.3))
        keys = [item["Key"] for item in s3.list_objects_v2(Bucket="clips").get("Contents", [])]
    finally:
        server.stop()
    assert first.status_code == 200 and first.json()["cache_hit"] is False, first.text
    assert again.status_code == 200 and again.json()["cache_hit"] is True
    assert keys == [f"uploads/{first.json()['id']}"]  # the cache hit never uploaded
    assert [p.name for p in settings.data_dir.joinpath("spool").iterdir()] == []  # spools are gone


def test_local_uploads_are_swept_after_the_retention(gw_settings: Settings) -> None:
    settings = gateway_settings(gw_settings, upload_retention_seconds=20)  # swept every 2 s
    uploads = settings.data_dir / "uploads"
    uploads.mkdir(parents=True)
    old, new = uploads / ("a" * 32), uploads / ("b" * 32)
    for path in (old, new):
        path.write_bytes(wav(0.5))
    os.utime(old, (time.time() - 21, time.time() - 21))
    with gateway_client(settings):
        wait_for(lambda: not old.exists(), "the old upload swept", timeout=15)
        assert new.exists()
