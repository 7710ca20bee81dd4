"""The RELIABILITY.md table from the fault suite's result file (tests/test_faults.py writes ``faults.json``).

    .venv/bin/python bench/reliability_table.py [faults.json] [--write RELIABILITY.md]

Without a path it takes the newest ``faults.json`` under pytest's temporary directories (the suite
prints where it wrote it; ``EMOFLEET_FAULTS_REPORT=path`` makes it write there instead). Prints the
markdown table; with ``--write FILE`` it also replaces what lies between ``<!-- faults:begin -->`` and
``<!-- faults:end -->`` in FILE.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


def newest_report() -> Path:
    pattern = os.path.join(tempfile.gettempdir(), "pytest-of-*", "pytest-*", "faults*", "faults.json")
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"no faults.json under {pattern}: run `pytest -m faults` first, or pass the file")
    return Path(found[-1])


def what_happened(row: dict[str, Any]) -> str:
    parts = list(row.get("notes") or [])
    sink = row.get("sink") or {}
    if sink.get("skipped_duplicates"):
        parts.append(f"the sink dropped {sink['skipped_duplicates']} replayed events it had already stored")
    if sink.get("skipped_replays") and "skipped the" not in " ".join(parts):
        parts.append(f"the sink skipped {sink['skipped_replays']} re-read messages ClickHouse already had")
    if row.get("dead_lettered"):
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(row.get("dead_letter_reasons", {}).items()))
        parts.append(f"{row['dead_lettered']} dead letters, each with the reason expected for its input ({reasons})")
    if "S3" not in row["fault"] and row.get("broker_storage", "").startswith("s3"):
        parts.append("broker on S3 storage")
    return "; ".join(parts) or "-"


def table(report: dict[str, Any]) -> str:
    lines = ["| fault | what happened | references | stored / dead-lettered | lost | duplicated | recovery time |",
             "|---|---|---|---|---|---|---|"]
    for row in report["faults"]:
        recovery = f"{row['recovery_seconds']:.1f} s" if row.get("faults_injected") else "-"
        lost = f"{row['lost']}" + (f" (+{row['lost_by_broker']} by the broker)" if row.get("lost_by_broker") else "")
        lines.append(f"| {row['fault']} | {what_happened(row)} | {row['references']:,} | "
                     f"{row['stored']:,} / {row['dead_lettered']:,} | {lost} | {row['duplicated']} | {recovery} |")
    meta = report.get("meta", {})
    total = sum(r["references"] for r in report["faults"])
    lost = sum(r["lost"] for r in report["faults"])
    duplicated = sum(r["duplicated"] for r in report["faults"])
    lines.append(f"| **all** | {len(report['faults'])} phases in {meta.get('seconds', '?')} s "
                 f"({meta.get('cpus', '?')} CPUs, load {', '.join(map(str, meta.get('load_average', [])))}) | "
                 f"{total:,} | | **{lost}** | **{duplicated}** | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", nargs="?", type=Path, help="faults.json (default: the newest one)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace the table between the markers in FILE")
    args = parser.parse_args(argv)
    path = args.report or newest_report()
    text = table(json.loads(path.read_text()))
    print(text)
    if args.write:
        document = args.write.read_text()
        if BEGIN not in document or END not in document:
            raise SystemExit(f"{args.write} has no {BEGIN} ... {END} markers")
        head, rest = document.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        args.write.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
        print(f"written into {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
