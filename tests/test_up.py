"""The README's main job, end to end: `emofleet up --model tiny` on generated clips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from emofleet.sinks.clickhouse import connect
from emofleet.streams.config import ClickHouseSettings

pytestmark = [pytest.mark.slow, pytest.mark.backend("embedded", reason="reads the chDB directory `up` creates")]


def test_up_puts_every_clip_in_clickhouse_exactly_once(tmp_path: Path, unique: str, redis_url: str) -> None:
    data_dir = tmp_path / "data"
    env = os.environ | {"EMOFLEET_CACHE_KEY_PREFIX": f"test:{unique}", "EMOFLEET_CACHE_REDIS_URL": redis_url,
                        "EMOFLEET_KAFKA_SESSION_TIMEOUT_MS": "3000", "EMOFLEET_KAFKA_HEARTBEAT_INTERVAL_MS": "500"}
    cli = [sys.executable, "-m", "emofleet.cli"]
    try:
        up = subprocess.run([*cli, "up", "--model", "tiny", "--samples", "500", "--data-dir", str(data_dir),
                             "--timeout", "400"], env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run([*cli, "stack", "stop", "--data-dir", str(data_dir)], env=env, timeout=60)

    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    assert "500/500 references stored in ClickHouse" in up.stdout
    assert "Emotion distribution" in up.stdout
    client = connect(ClickHouseSettings(), f"chdb://{data_dir.resolve() / 'chdb'}")
    try:
        ((clips, ids),) = client.query(
            "SELECT uniqExact(audio_id), uniqExact(event_id) FROM emofleet.emotion_events "
            "WHERE segment_index = -1").result_rows
        ((dead,),) = client.query("SELECT count() FROM emofleet.dead_letters").result_rows
    finally:
        client.close()
    assert (clips, ids, dead) == (500, 500, 0)
