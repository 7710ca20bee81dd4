"""The README's main job, end to end: `emofleet up --model tiny` on generated clips."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from emofleet.sinks.clickhouse import connect
from emofleet.core.config import ClickHouseSettings

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
    key_file = (data_dir / "gateway-api-keys").resolve()
    assert re.search(rf"gateway http://127\.0\.0\.1:\d+ \(page .*API key in {re.escape(str(key_file))}\)", up.stdout)
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().splitlines()[-1].split(":", 1)[1]
    gateway_log = (data_dir / "logs" / "gateway.log").read_text()
    assert "Application startup complete" in gateway_log and "gateway exited" not in up.stderr
    assert key not in gateway_log + up.stdout + up.stderr
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


# ------------------------------------------------------------------------------------ supervisor and tracker


def test_supervisor_restarts_with_backoff_and_reports_a_crash_loop(tmp_path: Path) -> None:
    from emofleet.up import CrashLoopError, Supervisor

    said: list[str] = []
    crash = [sys.executable, "-c", "import sys; print('boom: bad setting'); sys.exit(3)"]
    supervisor = Supervisor({"worker": crash}, dict(os.environ), tmp_path, notify=said.append,
                            crash_loop_exits=3, max_backoff_seconds=0.0)
    supervisor.start()
    with pytest.raises(CrashLoopError) as caught:
        while True:
            supervisor.check()
            supervisor.children["worker"].wait(10)
    assert "worker exited 3 times in a row" in str(caught.value) and "last exit code 3" in str(caught.value)
    assert "boom: bad setting" in caught.value.tail
    assert said == [f"worker exited with code 3; restarting in 0s (log: {tmp_path / 'worker.log'})"] * 2
    assert supervisor.restarts == 2


def test_run_tracker_counts_each_reference_once_and_tells_earlier_runs_apart() -> None:
    from emofleet.up import RunTracker

    tracker = RunTracker({("a", 1), ("b", 1), ("c", 1), ("d", 1)}, started_ms=1_000)
    event = {"audio_id": "a", "reference_produced_at": 1, "segment_index": -1, "event_id": "ea"}
    assert tracker.observe_event(event)
    assert not tracker.observe_event(event)  # a processor replay of the same result
    assert not tracker.observe_event(event | {"segment_index": 0})  # a window, not the whole clip
    assert not tracker.observe_event(event | {"reference_produced_at": 2})  # another run's reference
    assert tracker.observe_event({"audio_id": "b", "reference_produced_at": 1, "segment_index": -1,
                                  "event_id": "eb"})
    assert tracker.observe_dead_letter({"dead_letter_id": "dc", "reason": "not_audio"},
                                       {"audio_id": "c", "produced_at": 1})
    assert tracker.unconfirmed() == ({"ea": ("a", 1), "eb": ("b", 1)}, {"dc": ("c", 1)})

    tracker.confirm(("a", 1), first_inserted_ms=1_500)
    tracker.confirm(("b", 1), first_inserted_ms=500)  # stored before this run started
    tracker.confirm(("c", 1), first_inserted_ms=1_600)
    assert not tracker.done and tracker.seen == 3
    assert tracker.summary() == ("3/4 references stored in ClickHouse: 1 new results, 1 already stored by an "
                                 "earlier run, 1 dead letters (not_audio: 1), 1 not stored (1 without any result)")
