"""The `emofleet` command line: parsing, --version, help text, `migrate` and `report` against chDB."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import pytest

from emofleet.cli import build_parser, main
from emofleet.sinks.clickhouse import connect, insert_rows
from emofleet.sinks.rows import EVENT_COLUMNS, event_row
from emofleet.sinks.migrations import MIGRATIONS, migrate
from emofleet.core.config import ClickHouseSettings

from sink_samples import sample_events

# the CLI as users run it, with no EMOFLEET_* settings leaking in from the test environment
ENV = {k: v for k, v in os.environ.items() if not k.startswith("EMOFLEET_")}


def emofleet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emofleet.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=120)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"emofleet {version('emofleet')}\n"


def test_help_names_options_not_settings_fields() -> None:
    for name, parser in subcommands().items():
        text = parser.format_help()
        assert "__" not in text, f"`emofleet {name} --help` shows a settings dest as metavar"
    produce = subcommands()["produce"].format_help()
    assert "--bootstrap-servers BOOTSTRAP_SERVERS" in produce and "--topic TOPIC" in produce
    top = build_parser().format_help()
    assert "emotion2vec+" in top and "import" not in top, "says what the tool does, not how it starts"
    assert {"migrate", "report", "query", "sink"} <= set(subcommands())


def test_user_mistakes_are_one_error_line_and_one_hint(tmp_path: Path) -> None:
    result = emofleet("report", "--since", "yesterday", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("emofleet: error: 'yesterday' is neither a relative time")
    result = emofleet("produce", "--path-map", "./audio", "x.wav", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "must be SOURCE:TARGET" in result.stderr and "hint:" in result.stderr
    result = emofleet("migrate", "--dsn", "chdb://host/path", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["emofleet: error: unsupported chDB DSN 'chdb://host/path'",
                                          "  hint: write chdb:///absolute/path (three slashes, no host, no options)"]


def test_migrate_applies_once_and_refuses_a_held_chdb_directory(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'chdb'}"
    first = emofleet("migrate", "--dsn", dsn, "--data-dir", str(tmp_path), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert [line.removeprefix("applied ") for line in first.stdout.splitlines()[:-1]] == [m.name for m in MIGRATIONS]
    assert first.stdout.splitlines()[-1] == (f"database emofleet at {dsn}: {len(MIGRATIONS)} migration(s) applied, "
                                             "schema up to date")
    again = emofleet("migrate", "--dsn", dsn, "--data-dir", str(tmp_path), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.startswith(f"database emofleet at {dsn}: 0 migration(s)")

    holder = subprocess.Popen(  # what a running sink does to the directory
        [sys.executable, "-c", "import sys, clickhouse_connect\n"
         f"client = clickhouse_connect.get_client(dsn={dsn!r})\nprint('open', flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        held = emofleet("migrate", "--dsn", dsn, "--data-dir", str(tmp_path), cwd=tmp_path)
    finally:
        holder.communicate(timeout=60)
    assert held.returncode == 2
    error, hint = held.stderr.splitlines()
    assert error == (f"emofleet: error: the chDB directory {tmp_path / 'chdb'} is open in another process "
                     f"(PID {holder.pid}); chDB allows one process per directory")
    assert hint.startswith("  hint: a running sink applies the migrations itself")


def test_report_time_window_and_json(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'chdb'}"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    events = [e for hours in (0, 1, 2) for e in sample_events(
        audio_id=f"clip-{hours}", source="line-1", tenant="acme", label="angry" if hours else "happy",
        confidence=0.5, produced_at_ms=int((start + timedelta(hours=hours)).timestamp() * 1000))]
    client = connect(ClickHouseSettings(), dsn)
    try:
        migrate(client, "emofleet")
        rows = [event_row(e, "results", 0, i, start) for i, e in enumerate(events)]
        insert_rows(client, "emofleet", "emotion_events", EVENT_COLUMNS, rows, dedup_token="cli")
    finally:
        client.close()

    until = (start + timedelta(hours=2)).isoformat()
    result = emofleet("report", "--dsn", dsn, "--data-dir", str(tmp_path), "--since", "150m", "--until", until,
                      "--format", "json", "--plot", str(tmp_path / "report.png"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is JSON alone; the plot's line went to stderr
    assert report["totals"]["clips"] == 1 and report["distribution"] == [{"label": "angry", "clips": 1, "share": 1.0}]
    assert report["until"] == until and datetime.fromisoformat(report["since"]) > start
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"

    text = emofleet("report", "--dsn", dsn, "--data-dir", str(tmp_path), cwd=tmp_path)
    assert text.returncode == 0 and "3 clips" in text.stdout and "all time" in text.stdout
