"""`emofleet bench --attach` against a pipeline running in this process: the report adds up."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from emofleet.cli import main
from emofleet.loadtest import ProcessSampler, find_pipeline_processes, percentile, read_proc
from emofleet.sinks.clickhouse import connect
from emofleet.sinks.migrations import migrate
from emofleet.core.config import Settings, to_env

from pipeline_helpers import create_topics, running_processor
from test_sink import running_sink


def test_percentiles_and_proc_readings() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50.0, 95.0, 99.0)
    assert percentile([3.0], 99) == 3.0
    import os

    cpu, rss = read_proc(os.getpid())
    assert cpu > 0 and rss > 10
    assert read_proc(2**22 + 1) is None
    sampler = ProcessSampler()
    sampler.sample({"me": os.getpid()}, 0.0)
    sum(i * i for i in range(200_000))
    import time

    time.sleep(0.25)  # an interval for the CPU reading
    sampler.sample({"me": os.getpid()}, 0.3)
    assert sampler.summary()["me"]["rss_mb_max"] > 10
    assert isinstance(find_pipeline_processes(), dict)


def test_bench_attached_to_a_running_pipeline(settings: Settings, tiny_model, redis_client, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    settings = replace(settings, clickhouse=replace(settings.clickhouse, batch_rows=500, batch_seconds=0.2))
    create_topics(settings)
    for name, value in to_env(settings).items():
        monkeypatch.setenv(name, value)
    client = connect(settings.clickhouse, settings.clickhouse_dsn)
    migrate(client, settings.clickhouse.database)
    out = tmp_path / "report"
    try:
        with running_sink(settings, client), running_processor(settings, model=tiny_model):
            code = main(["bench", "--attach", "--rate", "40", "--refs", "60", "--min-seconds", "0.3",
                         "--max-seconds", "0.8", "--poison-fraction", "0.1", "--repeat-fraction", "0.25",
                         "--warmup", "2", "--interval", "0.3", "--timeout", "120", "--out", str(out)])
    finally:
        client.close()

    report = json.loads((out / "bench.json").read_text())
    assert code == 0 and report["complete"]
    assert report["references"] == 60 and report["stored"] + report["dead_lettered"] == 60
    assert report["dead_lettered"] == 6 and report["dead_letter_rate"] == 0.1
    assert report["cache_hit_rate"] > 0, "repeated clips are answered by the cache"
    latency = report["latency_seconds"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"] < 120
    assert report["sustained_refs_per_s"] > 0 and report["offered_refs_per_s"] > 0
    assert "bench" in report["processes"] and report["processes"]["bench"]["rss_mb_max"] > 10
    assert sum(row["sent"] for row in report["timeline"]) == 60
    assert (out / "bench.png").stat().st_size > 10_000
    assert "P50 / P95 / P99" in (out / "bench.md").read_text()
