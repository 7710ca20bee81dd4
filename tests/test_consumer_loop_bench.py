"""bench/consumer_loop.py end to end on a small topic: both loops commit every message and the table comes out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "consumer_loop.py"


def test_consumer_loop_bench_commits_everything_with_both_loops() -> None:
    # The bench itself fails (exit status != 0) unless each run's committed offsets reach the produced ends.
    done = subprocess.run([sys.executable, str(BENCH), "--messages", "2000", "--repeat", "1", "--partitions", "2",
                           "--timeout", "60"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    for name in ("emofleet ConsumerLoop, inline", "Arroyo StreamProcessor, CommitOffsets",
                 "emofleet ConsumerLoop, 4 threads", "Arroyo StreamProcessor, RunTaskInThreads(4) -> CommitOffsets"):
        assert rows[name].split("|")[2].strip() == "2000"
    assert rows["inline"].split("|")[2].strip().endswith("x") and rows["4 threads"].split("|")[3].strip().endswith("x")
    assert "CPUs" in done.stdout
