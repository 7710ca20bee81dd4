"""Metrics and health endpoints over real HTTP, against a running processor and sink (real broker,
Redis, chDB): what /metrics reports must match what the pipeline really did."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from emofleet.infra.local_stack import free_port, start_broker, stop_process
from emofleet.schemas.codec import make_codec
from emofleet.sinks.clickhouse import connect
from emofleet.sinks.migrations import migrate
from emofleet.sinks.service import ClickHouseSink
from emofleet.core.config import ObservabilitySettings, Settings, to_env
from emofleet.core.metrics import (GpuCollector, Health, Metrics, MetricsServer, processor_health, serve,
                                      sink_health)

from kafka_helpers import read_topic
from pipeline_helpers import FlakyClient, create_topics, enqueue_uris, outcomes, running_processor, sample_uris
from waiting import wait_for

Samples = dict[tuple[str, frozenset], float]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> Samples:
    status, text = get(port, "/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def health_of(processor: Any, settings: Settings) -> Health:
    return processor_health(processor.metrics, settings.kafka.client_config(), settings.observability)


class GatedModel:
    """The tiny model, but predict() waits until the gate opens (work stays in flight, uncommitted)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.gate = threading.Event()

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        self.gate.wait(60)
        return self._model.predict(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def test_processor_and_sink_metrics_match_the_real_counts(settings: Settings, tmp_path: Path, tiny_model,
                                                          redis_client) -> None:
    settings = replace(settings, observability=replace(settings.observability, lag_interval_seconds=0.1))
    create_topics(settings)
    good = sample_uris(tmp_path / "clips", 6, min_seconds=0.5, max_seconds=1.5)
    (tmp_path / "text.wav").write_bytes(b"this is not audio at all " * 40)
    bad = {"not_found": [(tmp_path / "missing-1.wav").as_uri(), (tmp_path / "missing-2.wav").as_uri()],
           "not_audio": [(tmp_path / "text.wav").as_uri()]}
    audio, results, dead = settings.kafka.audio_topic, settings.kafka.results_topic, settings.kafka.dead_letter_topic
    model = GatedModel(tiny_model)
    enqueue_uris(settings, good)

    with running_processor(settings, model=model) as processor, \
            MetricsServer(processor.metrics, health_of(processor, settings), host="127.0.0.1") as server:
        # Model held back: every message is consumed and in flight, nothing is committed, so the lag
        # (high-water mark - committed offset) summed over the partitions is exactly what was sent.
        held = wait_for(lambda: (s := scrape(server.port)) and total(s, "emofleet_consumer_lag_messages") == len(good)
                        and value(s, "emofleet_in_flight_messages") == len(good) and s, "lag of every message")
        assert value(held, "emofleet_messages_in_total", topic=audio) == len(good)
        assert value(held, "emofleet_assigned_partitions") == settings.kafka.partitions
        assert get(server.port, "/readyz")[0] == 200 and get(server.port, "/healthz")[0] == 200

        references = enqueue_uris(settings, [*bad["not_found"], *bad["not_audio"]])
        raw = Producer(settings.kafka.client_config())
        raw.produce(settings.kafka.audio_topic, value=b"\x00\x01garbage", key=b"malformed")
        raw.flush(10)
        sent = len(good) + len(references) + 1
        model.gate.set()

        events, dead_letters = outcomes(settings, sent)
        produced = len(read_topic(settings.kafka.bootstrap_servers, results, len(events)))
        final = wait_for(lambda: (s := scrape(server.port)) and total(s, "emofleet_consumer_lag_messages") == 0
                         and value(s, "emofleet_in_flight_messages") == 0
                         and value(s, "emofleet_messages_out_total", topic=dead) == len(dead_letters)
                         and value(s, "emofleet_commit_seconds_count", mode="async") >= 1 and s,
                         "lag drained, outputs delivered, commits answered")

    assert len(events) == len(good) and len(dead_letters) == 4
    assert value(final, "emofleet_messages_in_total", topic=audio) == sent
    assert value(final, "emofleet_messages_out_total", topic=results) == produced == len(good)
    assert value(final, "emofleet_messages_out_total", topic=dead) == 4
    assert value(final, "emofleet_dead_letters_total", reason="not_found", stage="audio") == 2
    assert value(final, "emofleet_dead_letters_total", reason="not_audio", stage="audio") == 1
    assert value(final, "emofleet_dead_letters_total", reason="malformed", stage="decode") == 1
    assert total(final, "emofleet_dead_letters_total") == 4
    for stage in ("fetch", "decode"):
        assert value(final, "emofleet_stage_seconds_count", stage=stage) == len(good), stage
    for stage in ("cache", "model", "produce"):
        assert value(final, "emofleet_stage_seconds_count", stage=stage) >= 1, stage
    assert value(final, "emofleet_model_batch_windows_sum") == len(good), "the model ran once per clip"
    assert value(final, "emofleet_batch_clips_sum") == len(good)
    assert value(final, "emofleet_cache_misses_total") == len(good) and value(final, "emofleet_cache_hits_total") == 0
    assert value(final, "emofleet_end_to_end_seconds_count") == len(good)
    assert value(final, "emofleet_audio_seconds_total") == pytest.approx(
        sum(e["duration_seconds"] for e in events), rel=0.01)
    assert value(final, "emofleet_rebalances_total", event="assign") >= 1
    assert value(final, "emofleet_commit_seconds_count", mode="async") >= 1, "async commits were answered and timed"
    assert value(final, "emofleet_commit_failures_total") == 0
    assert value(final, "emofleet_model_info", model=tiny_model.model_id, revision=tiny_model.revision,
                 device=tiny_model.device, precision=tiny_model.precision) == 1

    # The sink reads those results and dead letters into ClickHouse; one insert fails first.
    client = connect(settings.clickhouse, settings.clickhouse_dsn)
    migrate(client, settings.clickhouse.database)
    flaky = FlakyClient(client)
    flaky.failing.set()
    sink_settings = replace(settings, clickhouse=replace(settings.clickhouse, batch_rows=200, batch_seconds=0.2))
    metrics = Metrics("sink")
    sink = ClickHouseSink(sink_settings, flaky, make_codec(), metrics=metrics)
    thread = threading.Thread(target=sink.run, daemon=True)
    try:
        health = sink_health(metrics, settings.kafka.client_config(), settings.observability)
        with MetricsServer(metrics, health, host="127.0.0.1") as server:
            thread.start()
            wait_for(lambda: value(scrape(server.port), "emofleet_sink_insert_failures_total") >= 1, "a failed insert")
            status, body = get(server.port, "/readyz")
            assert status == 503 and json.loads(body)["checks"]["clickhouse_inserting"] is False
            flaky.failing.clear()
            stored = wait_for(lambda: (s := scrape(server.port))
                              and value(s, "emofleet_sink_inserted_rows_total", table="emotion_events") == produced
                              and value(s, "emofleet_sink_inserted_rows_total", table="dead_letters") == 4
                              and total(s, "emofleet_consumer_lag_messages") == 0 and s, "rows stored, lag drained")
            assert get(server.port, "/readyz")[0] == 200
    finally:
        sink.stop()
        thread.join(30)
        client.close()
    assert value(stored, "emofleet_messages_in_total", topic=results) == produced
    assert value(stored, "emofleet_messages_in_total", topic=dead) == 4
    assert value(stored, "emofleet_stage_seconds_count", stage="insert") >= 2
    assert value(stored, "emofleet_sink_batch_rows_sum") == produced + 4
    # lag 0 means the broker holds the commits: the sink's loop commits asynchronously while it runs
    assert value(stored, "emofleet_commit_seconds_count", mode="async") >= 1
    assert (name := "emofleet_model_info") not in {n for n, _ in stored}, f"{name} is the processor's alone"
    assert value(stored, "emofleet_sink_insert_failures_total") == flaky.failed


def test_readiness_follows_the_broker_going_away_and_coming_back(settings: Settings, tmp_path: Path,
                                                                 tiny_model, redis_client) -> None:
    port = free_port()
    broker, bootstrap = start_broker(tmp_path / "broker.log", port)
    try:
        settings = replace(settings, kafka=replace(settings.kafka, bootstrap_servers=bootstrap))
        create_topics(settings)
        with running_processor(settings, model=tiny_model) as processor, \
                MetricsServer(processor.metrics, health_of(processor, settings), host="127.0.0.1") as server:
            def readiness() -> tuple[int, dict]:
                status, body = get(server.port, "/readyz")
                return status, json.loads(body)["checks"]

            wait_for(lambda: readiness()[0] == 200, "ready with the broker up")

            broker.kill()  # the broker goes away
            broker.wait()
            _, checks = wait_for(lambda: (r := readiness())[0] == 503 and r, "not ready with the broker gone")
            assert checks["broker_reachable"] is False and checks["model_loaded"] is True
            assert get(server.port, "/healthz")[0] == 200, "the loop still turns: alive, just not ready"

            broker, _ = start_broker(tmp_path / "broker.log", port)
            create_topics(settings)  # this broker keeps topics in memory only; a real one still has them
            _, checks = wait_for(lambda: (r := readiness())[0] == 200 and r, "ready again", timeout=45)
            assert all(checks.values())
    finally:
        stop_process(broker.pid)


def test_healthz_reports_a_stalled_loop_and_readyz_names_failing_checks() -> None:
    metrics = Metrics("processor")
    health = Health(metrics, stall_seconds=5).require("model_loaded", lambda: metrics.model_loaded)
    with MetricsServer(metrics, health, host="127.0.0.1") as server:
        status, body = get(server.port, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "starting", "alive while the model loads"
        assert get(server.port, "/readyz")[0] == 503
        metrics.heartbeat()
        metrics.model_loaded = True
        assert get(server.port, "/healthz")[0] == 200 and get(server.port, "/readyz")[0] == 200
        metrics._last_beat = time.monotonic() - 60  # the loop has not turned for a minute
        status, body = get(server.port, "/healthz")
        assert status == 503 and json.loads(body)["status"] == "stalled"
        status, body = get(server.port, "/readyz")
        assert status == 503 and json.loads(body)["checks"] == {"loop_running": False, "model_loaded": True}
        assert get(server.port, "/nope")[0] == 404
    never = Health(Metrics("sink"), stall_seconds=5, startup_seconds=0)
    with MetricsServer(never.metrics, never, host="127.0.0.1") as server:
        status, body = get(server.port, "/healthz")
        assert status == 503 and json.loads(body)["status"] == "never_started", "a start that hangs is not alive"
        status, text = get(server.port, "/metrics")
        assert "emofleet_last_poll_timestamp_seconds" in text and "process_resident_memory_bytes" in text


def test_each_metrics_object_has_its_own_registry_and_the_port_setting_is_honoured() -> None:
    first, second = Metrics("processor"), Metrics("processor")
    first.messages_in.labels("t").inc(3)
    assert first.registry is not second.registry
    assert b'emofleet_messages_in_total{topic="t"} 3.0' in first.render()[0]
    assert b"emofleet_messages_in_total{" not in second.render()[0]
    assert b"emofleet_sink_inserted_rows_total" not in first.render()[0], "sink metrics only in the sink"
    assert serve(ObservabilitySettings(metrics_port=0), first, Health(first, 1)) is None, "0 = off"
    port = free_port()
    server = serve(ObservabilitySettings(metrics_port=port, metrics_host="127.0.0.1"), first, Health(first, 1))
    try:
        assert server is not None and get(port, "/metrics")[0] == 200
        with pytest.raises(Exception, match="cannot serve metrics"):
            serve(ObservabilitySettings(metrics_port=port, metrics_host="127.0.0.1"), second, Health(second, 1))
    finally:
        server.stop()


class FakeCuda:
    def __init__(self, initialized: bool = True, nvml: bool = True) -> None:
        self.initialized, self.nvml = initialized, nvml

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return self.initialized

    def current_device(self) -> int:
        return 0

    def mem_get_info(self, index: int) -> tuple[int, int]:
        return 30 * 2**30, 80 * 2**30

    def memory_allocated(self, index: int) -> int:
        return 2 * 2**30

    def memory_reserved(self, index: int) -> int:
        return 3 * 2**30

    def utilization(self, index: int) -> int:
        if not self.nvml:
            raise ModuleNotFoundError("pynvml")
        return 87


def test_gpu_metrics_come_from_the_models_device_and_only_once_cuda_is_in_use() -> None:
    families = {f.name: f for f in GpuCollector("cuda:1", FakeCuda()).collect()}
    assert families["emofleet_gpu_memory_used_bytes"].samples[0].value == 50 * 2**30
    assert families["emofleet_gpu_memory_total_bytes"].samples[0].labels == {"device": "1"}
    assert families["emofleet_gpu_memory_allocated_bytes"].samples[0].value == 2 * 2**30
    assert families["emofleet_gpu_utilization_ratio"].samples[0].value == pytest.approx(0.87)
    assert list(GpuCollector("cuda", FakeCuda(initialized=False)).collect()) == []
    without_nvml = {f.name for f in GpuCollector("cuda", FakeCuda(nvml=False)).collect()}
    assert "emofleet_gpu_utilization_ratio" not in without_nvml and "emofleet_gpu_memory_used_bytes" in without_nvml
    assert list(GpuCollector("cuda").collect()) == [], "CPU-only torch here: nothing, and no error"


SECRET = "hunter2-Zq9x-never-log-me"


def test_secrets_never_appear_in_config_output_or_processor_logs(settings: Settings, tmp_path: Path) -> None:
    settings = replace(settings, data_dir=tmp_path / "data")
    env = os.environ | to_env(settings) | {
        "EMOFLEET_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "EMOFLEET_KAFKA_SASL_MECHANISM": "PLAIN",
        "EMOFLEET_KAFKA_SASL_USERNAME": "svc", "EMOFLEET_KAFKA_SASL_PASSWORD": SECRET,
        "EMOFLEET_CLICKHOUSE_PASSWORD": SECRET, "EMOFLEET_CACHE_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:1/0",
        "EMOFLEET_OBSERVABILITY_LOG_FORMAT": "json"}
    cli = [sys.executable, "-m", "emofleet.cli"]
    config = subprocess.run([*cli, "config"], env=env, capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stderr
    shown = json.loads(config.stdout)
    assert SECRET not in config.stdout + config.stderr
    assert shown["kafka"]["sasl_password"] == "***" and shown["cache"]["redis_url"] == "redis://:***@127.0.0.1:1/0"

    log_path = tmp_path / "process.log"
    with open(log_path, "wb") as log:
        member = subprocess.Popen([*cli, "process", "--model", "tiny"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: b" consuming " in log_path.read_bytes() or member.poll() is not None,
                 "the processor's startup", timeout=120)
        member.send_signal(signal.SIGTERM)
        member.wait(60)
    finally:
        if member.poll() is None:
            member.kill()
            member.wait()
    text = log_path.read_text()
    assert SECRET not in text
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    startup = next(r for r in records if r["msg"].startswith("starting processor"))
    assert '"sasl_password": "***"' in startup["msg"] and startup["level"] == "info" and startup["logger"]
    assert any(r["msg"].startswith("processor ") and " consuming " in r["msg"] for r in records)
    assert {r["logger"] for r in records} >= {"emofleet.processors.service"}
    stray = [line for line in text.splitlines() if line.strip() and not line.startswith("{")]
    assert stray == [], f"every log line is JSON: {stray[:5]}"
