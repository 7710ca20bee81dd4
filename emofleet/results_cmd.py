"""`emofleet results`: emotion events from the results topic (a range, or following it) or from ClickHouse
(one reference or one call), filtered, as a table or JSON lines.

Where they come from (``--from auto``): ClickHouse when ``--audio-id`` or ``--call-id`` is given without
``--follow`` (a lookup: the sink stored every result, and the table's bloom-filter indexes find one reference or
call without reading the topic); the results topic otherwise. ``--from topic`` / ``--from clickhouse`` force one.
The filters and the output are the same either way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from emofleet.core.errors import UserFacingError

TABLE_COLUMNS = ("processed_at", "tenant", "source", "call_id", "audio_id", "segment", "label", "confidence")


@dataclass(frozen=True)
class ResultFilter:
    """What `emofleet results` keeps; one definition for the topic (:meth:`matches`) and ClickHouse (:meth:`sql`)."""

    tenant: str | None = None
    source: str | None = None
    call_id: str | None = None
    audio_id: str | None = None
    label: str | None = None
    min_confidence: float | None = None
    since_ms: int | None = None  # processed_at >= since
    until_ms: int | None = None  # processed_at < until
    segments: bool = False  # per-window events too, not only whole-clip summaries

    def matches(self, event: Mapping[str, Any]) -> bool:
        return ((self.segments or event["segment_index"] == -1)
                and all(self._equal(name, event.get(name)) for name in ("tenant", "source", "call_id", "audio_id",
                                                                          "label"))
                and (self.min_confidence is None or event["confidence"] >= self.min_confidence)
                and (self.since_ms is None or event["processed_at"] >= self.since_ms)
                and (self.until_ms is None or event["processed_at"] < self.until_ms))

    def _equal(self, name: str, value: Any) -> bool:
        wanted = getattr(self, name)
        return wanted is None or value == wanted

    def sql(self) -> tuple[str, dict[str, Any]]:
        """A WHERE clause over ``emotion_events`` and its parameters."""
        clauses, parameters = [] if self.segments else ["segment_index = -1"], {}
        for name in ("tenant", "source", "call_id", "audio_id", "label"):
            if (value := getattr(self, name)) is not None:
                clauses.append(f"{name} = {{{name}:String}}")
                parameters[name] = value
        if self.min_confidence is not None:
            clauses.append("confidence >= {min_confidence:Float64}")
            parameters["min_confidence"] = self.min_confidence
        if self.since_ms is not None:
            clauses.append("processed_at >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')")
            parameters["since_ms"] = self.since_ms
        if self.until_ms is not None:
            clauses.append("processed_at < fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC')")
            parameters["until_ms"] = self.until_ms
        return " AND ".join(clauses) or "1", parameters


def filter_from(args: argparse.Namespace, now: datetime) -> ResultFilter:
    """The filter the flags ask for; a bad value is a :class:`UserFacingError`."""
    from emofleet.schemas.emotions import EMOTIONS

    if args.label is not None and args.label not in EMOTIONS:
        raise UserFacingError(f"--label {args.label!r} is not an emotion", f"one of: {', '.join(EMOTIONS)}")
    if args.min_confidence is not None and not 0.0 <= args.min_confidence <= 1.0:
        raise UserFacingError(f"--min-confidence {args.min_confidence} is outside [0, 1]", "e.g. --min-confidence 0.8")
    since_ms, until_ms = time_range_ms(args.since, args.until, now)
    return ResultFilter(tenant=args.tenant, source=args.source, call_id=args.call_id, audio_id=args.audio_id,
                        label=args.label, min_confidence=args.min_confidence, since_ms=since_ms, until_ms=until_ms,
                        segments=args.segments)


def time_range_ms(since: str | None, until: str | None, now: datetime) -> tuple[int | None, int | None]:
    """--since / --until (relative or ISO 8601, as `emofleet report` takes them) as epoch milliseconds."""
    from emofleet.sinks.analytics import parse_time_bound

    try:
        bounds = [int(parse_time_bound(text, now).timestamp() * 1000) if text else None for text in (since, until)]
    except ValueError as error:
        raise UserFacingError(str(error), "e.g. --since 2h, or --since 2026-11-25 --until 2026-11-26T12:00Z") from None
    if bounds[0] is not None and bounds[1] is not None and bounds[0] >= bounds[1]:
        raise UserFacingError("--since is not before --until", "swap them, or leave one out")
    return bounds[0], bounds[1]


def source_for(args: argparse.Namespace) -> str:
    """``topic`` or ``clickhouse``, per the module docstring."""
    if args.source_of_results != "auto":
        if args.source_of_results == "clickhouse" and args.follow:
            raise UserFacingError("--follow reads the topic, not ClickHouse", "drop --from clickhouse or --follow")
        return args.source_of_results
    return "clickhouse" if (args.audio_id or args.call_id) and not args.follow else "topic"


# ------------------------------------------------------------------------------------ ClickHouse rows -> events


def event_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """An ``emotion_events`` row in the shape of the EmotionEvent record (scores nested, times epoch ms)."""
    from emofleet.schemas.emotions import EMOTIONS

    event = {k: v for k, v in row.items() if not k.startswith("score_")}
    event["scores"] = {name: row[f"score_{name}"] for name in EMOTIONS}
    for name in ("processed_at", "reference_produced_at"):
        event[name] = _millis(row[name])
    return event


def _millis(value: Any) -> int:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


EVENT_SELECT = ("event_id, audio_id, uri, content_sha256, model_id, model_revision, granularity, label, confidence, "
                "{scores}, duration_seconds, segment_index, segment_count, segment_start_seconds, segment_end_seconds, "
                "processed_at, processing_latency_ms, cache_hit, tenant, source, channel, call_id, attributes, "
                "reference_produced_at, source_topic, source_partition, source_offset")


def clickhouse_events(run: Callable[[str, dict[str, Any]], list[dict[str, Any]]], database: str,
                      wanted: ResultFilter, limit: int) -> list[dict[str, Any]]:
    from emofleet.schemas.emotions import EMOTIONS
    from emofleet.sinks.migrations import quote_identifier

    where, parameters = wanted.sql()
    columns = EVENT_SELECT.format(scores=", ".join(f"score_{name}" for name in EMOTIONS))
    sql = (f"SELECT {columns} FROM {quote_identifier(database)}.emotion_events FINAL WHERE {where} "
           f"ORDER BY processed_at, segment_index LIMIT {int(limit)}")
    return [event_from_row(row) for row in run(sql, parameters)]


# ------------------------------------------------------------------------------------ output


def table_row(event: Mapping[str, Any]) -> dict[str, Any]:
    segment = "clip" if event["segment_index"] == -1 else f"{event['segment_index'] + 1}/{event['segment_count']}"
    when = datetime.fromtimestamp(event["processed_at"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return {"processed_at": when, "tenant": event.get("tenant") or "", "source": event.get("source") or "",
            "call_id": event.get("call_id") or "", "audio_id": event["audio_id"], "segment": segment,
            "label": event["label"], "confidence": f"{event['confidence']:.3f}"}


def json_line(event: Mapping[str, Any]) -> str:
    from emofleet.sinks.query_server import json_value

    return json.dumps(json_value(dict(event), finite=True), ensure_ascii=False, separators=(",", ":"))


class Printer:
    """Prints events as they come: JSON lines, or table rows under one header (widths from the first rows)."""

    def __init__(self, fmt: str, out: Any = None) -> None:
        self._fmt = fmt
        self._out = out or sys.stdout
        self._widths: list[int] | None = None
        self.printed = 0

    def __call__(self, event: Mapping[str, Any]) -> None:
        if self._fmt == "jsonl":
            print(json_line(event), file=self._out, flush=True)
        else:
            cells = list(table_row(event).values())
            if self._widths is None:
                self._widths = [max(len(c), len(h), 8) for c, h in zip(cells, TABLE_COLUMNS, strict=True)]
                self._line(list(TABLE_COLUMNS))
            self._line(cells)
        self.printed += 1

    def _line(self, cells: list[str]) -> None:
        assert self._widths is not None
        print("  ".join(c.ljust(w) for c, w in zip(cells, self._widths, strict=True)).rstrip(), file=self._out,
              flush=True)


# ------------------------------------------------------------------------------------ the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new results (Ctrl-C stops)")
    parser.add_argument("--since", metavar="TIME", help="results processed from this time on: 15m, 2h, 7d (ago) or "
                                                        "ISO 8601 (no zone = UTC); default: from the beginning")
    parser.add_argument("--until", metavar="TIME", help="results processed before this time (same forms)")
    parser.add_argument("--tenant")
    parser.add_argument("--source")
    parser.add_argument("--call-id", help="one call's results (from ClickHouse unless --follow or --from topic)")
    parser.add_argument("--audio-id", help="one reference's results (from ClickHouse unless --follow or --from topic)")
    parser.add_argument("--label", help="only this top emotion (angry, happy, ...)")
    parser.add_argument("--min-confidence", type=float, metavar="P", help="only results at least this confident (0..1)")
    parser.add_argument("--segments", action="store_true", help="per-window events too (default: whole clips only)")
    parser.add_argument("--format", choices=("table", "jsonl"), default="table",
                        help="an aligned table (default) or one JSON EmotionEvent per line, for pipes")
    parser.add_argument("--from", dest="source_of_results", choices=("auto", "topic", "clickhouse"), default="auto",
                        help="auto (default): ClickHouse for --audio-id / --call-id lookups, else the results topic")
    parser.add_argument("--limit", type=int, default=10_000, help="most rows from ClickHouse (default 10000)")
    parser.add_argument("--dsn", dest="clickhouse__dsn", help="ClickHouse DSN (default: chDB under the data dir)")


def run(args: argparse.Namespace, settings: Any, query_runner: Callable[[Any], tuple[Any, Callable[[], None]]],
        progress: Callable[..., Any]) -> int:
    wanted = filter_from(args, datetime.now(UTC))
    printer = Printer(args.format)
    try:
        _print_results(args, settings, wanted, printer, query_runner, progress)
    except BrokenPipeError:  # the reader of a pipe went away (`| head`): done, quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter flushes it at exit
        return 0
    if printer.printed == 0 and args.format == "table":
        print("no results match", file=sys.stderr)
    return 0


def _print_results(args: argparse.Namespace, settings: Any, wanted: ResultFilter, printer: Printer,
                   query_runner: Callable[[Any], tuple[Any, Callable[[], None]]], progress: Callable[..., Any]) -> None:
    if source_for(args) == "clickhouse":
        run_query, close = query_runner(settings)
        try:
            events = clickhouse_events(run_query, settings.clickhouse.database, wanted, args.limit)
        finally:
            close()
        for event in events:
            printer(event)
    else:
        _from_topic(settings, wanted, follow=args.follow, printer=printer, progress=progress)


def _from_topic(settings: Any, wanted: ResultFilter, *, follow: bool, printer: Printer,
                progress: Callable[..., Any]) -> None:
    from emofleet.streams.results import scan

    bar = None

    def planned(plan: Any) -> None:
        nonlocal bar
        if not follow:
            bar = progress(plan.estimated, "read", unit="msg").__enter__()

    try:
        for delivery in scan(settings.kafka, [settings.kafka.results_topic], since_ms=wanted.since_ms, follow=follow,
                             on_plan=planned, on_message=lambda: bar and bar.update(1)):
            if wanted.matches(delivery.record):
                printer(delivery.record)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)

