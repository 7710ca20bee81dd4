"""The analyst report over ``emotion_events`` / ``dead_letters``, and rendering of query results.

Everything here talks to ClickHouse through a :data:`QueryRunner`: a function taking SQL with
ClickHouse ``{name:Type}`` parameters and a dict of parameter values, and returning the rows as dicts.
`emofleet.sinks.query_server.direct_runner` makes one from a clickhouse-connect client; the CLI can equally pass a runner that
forwards the SQL to another process (chDB allows one process per data path, and the sink may hold it).
To keep such runners simple, the queries only take and return JSON-friendly values: parameters are
str/int, timestamps come back as epoch milliseconds and are turned into datetimes here.

Sections of :func:`build_report` (all read tables with ``FINAL``, so reprocessed events count once):

* **totals** - whole-clip events ("clips", ``segment_index = -1``), all events, sources, time span.
* **distribution** - clips per label with their share, by ``reference_produced_at`` (when the audio was
  produced).
* **timeline** - per minute or hour (``bucket``) x source: clips, mean confidence, negativity (share of
  clips labelled angry, disgusted, fearful or sad).
* **negative_sources** - sources with at least ``min_clips`` clips, most negative first.
* **cache** - share of clips whose scores came from the inference cache, by ``processed_at``.
* **dead_letters** - dead letters per (reason, stage), by ``failed_at``.
* **throughput** - events and clips per minute of ``processed_at`` (bucketed like the timeline when the
  span is long; ``events_per_minute`` is normalised to one minute either way).

``since`` / ``until`` (inclusive / exclusive) filter each section on its own time column (named above);
:func:`parse_time_bound` reads them from the command line (ISO 8601 or relative: ``15m``, ``2h``, ``7d``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from emofleet.schemas.emotions import EMOTIONS, NEGATIVE_LABELS
from emofleet.sinks.rows import datetime_to_millis, millis_to_datetime
from emofleet.sinks.query_server import QueryRunner, json_value
from emofleet.sinks.migrations import DEAD_LETTERS_TABLE, EVENTS_TABLE, quote_identifier


BUCKETS: dict[str, int] = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}
AUTO_MINUTE_SPAN = timedelta(hours=3)
"""With ``bucket="auto"`` spans up to this long are shown per minute, up to 7 days per hour, else per day."""
AUTO_HOUR_SPAN = timedelta(days=7)

_NEGATIVE_SQL = "(" + ", ".join(f"'{label}'" for label in NEGATIVE_LABELS) + ")"


@dataclass(frozen=True)
class Report:
    database: str
    since: datetime | None
    until: datetime | None
    generated_at: datetime
    bucket: str  # timeline bucket: minute | hour | day
    throughput_bucket: str
    min_clips: int
    totals: dict[str, Any]
    distribution: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    negative_sources: list[dict[str, Any]] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    throughput: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (datetimes as ISO strings), e.g. for ``--format json``."""
        return json_value(asdict(self), finite=False)


def build_report(run: QueryRunner, database: str, since: datetime | None = None, *, until: datetime | None = None,
                 bucket: str = "auto", min_clips: int = 5, top_sources: int = 10,
                 now: datetime | None = None) -> Report:
    """Run the report queries through ``run`` and assemble a :class:`Report`.

    ``bucket``: ``"auto"`` (by time span), ``"minute"``, ``"hour"`` or ``"day"``; ``min_clips``: sources
    with fewer clips are left out of the most-negative ranking; ``since`` (inclusive) and ``until``
    (exclusive): aware datetimes (naive = UTC).
    """
    if bucket != "auto" and bucket not in BUCKETS:
        raise ValueError(f"bucket must be auto or one of {', '.join(BUCKETS)}, got {bucket!r}")
    db = quote_identifier(database)
    events = f"{db}.{quote_identifier(EVENTS_TABLE)} FINAL"
    dead = f"{db}.{quote_identifier(DEAD_LETTERS_TABLE)} FINAL"
    params: dict[str, Any] = {}
    if since is not None:
        params["since_ms"] = datetime_to_millis(since)
    if until is not None:
        params["until_ms"] = datetime_to_millis(until)

    def within(column: str) -> str:
        """`` AND`` conditions keeping ``column`` in [since, until)."""
        return "".join(f" AND {column} {op} fromUnixTimestamp64Milli({{{name}:Int64}}, 'UTC')"
                       for op, name in ((">=", "since_ms"), ("<", "until_ms")) if name in params)

    clip_filter = "segment_index = -1" + within("reference_produced_at")

    totals_row = run(
        f"SELECT countIf(segment_index = -1{within('reference_produced_at')}) AS clips, "
        f"countIf(1{within('processed_at')}) AS events, "
        f"uniqExactIf(source, segment_index = -1{within('reference_produced_at')}) AS sources, "
        f"toUnixTimestamp64Milli(minIf(reference_produced_at, segment_index = -1{within('reference_produced_at')})) AS first_ms, "
        f"toUnixTimestamp64Milli(maxIf(reference_produced_at, segment_index = -1{within('reference_produced_at')})) AS last_ms, "
        f"toUnixTimestamp64Milli(minIf(processed_at, 1{within('processed_at')})) AS first_processed_ms, "
        f"toUnixTimestamp64Milli(maxIf(processed_at, 1{within('processed_at')})) AS last_processed_ms "
        f"FROM {events}", params)[0]
    clips, events_count = int(totals_row["clips"]), int(totals_row["events"])
    totals = {
        "clips": clips,
        "events": events_count,
        "sources": int(totals_row["sources"]),
        "first_at": millis_to_datetime(int(totals_row["first_ms"])) if clips else None,
        "last_at": millis_to_datetime(int(totals_row["last_ms"])) if clips else None,
        "first_processed_at": millis_to_datetime(int(totals_row["first_processed_ms"])) if events_count else None,
        "last_processed_at": millis_to_datetime(int(totals_row["last_processed_ms"])) if events_count else None,
    }
    timeline_bucket = bucket if bucket != "auto" else _auto_bucket(totals["first_at"], totals["last_at"])
    throughput_bucket = bucket if bucket != "auto" else _auto_bucket(
        totals["first_processed_at"], totals["last_processed_at"])

    distribution = [
        {"label": r["label"], "clips": int(r["clips"]), "share": int(r["clips"]) / clips}
        for r in run(f"SELECT label, count() AS clips FROM {events} WHERE {clip_filter} "
                     "GROUP BY label ORDER BY clips DESC, label", params)
    ]

    timeline = [
        {"bucket": millis_to_datetime(int(r["bucket_ms"])), "source": r["source"], "clips": int(r["clips"]),
         "mean_confidence": float(r["mean_confidence"]), "negativity": int(r["negative"]) / int(r["clips"])}
        for r in run(
            f"SELECT intDiv(toUnixTimestamp64Milli(reference_produced_at), {{bucket_ms:Int64}}) * {{bucket_ms:Int64}} "
            f"AS bucket_ms, source, count() AS clips, avg(confidence) AS mean_confidence, "
            f"countIf(label IN {_NEGATIVE_SQL}) AS negative FROM {events} WHERE {clip_filter} "
            "GROUP BY bucket_ms, source ORDER BY bucket_ms, source",
            params | {"bucket_ms": BUCKETS[timeline_bucket]})
    ]

    negative_sources = [
        {"source": r["source"], "clips": int(r["clips"]), "negativity": int(r["negative"]) / int(r["clips"]),
         "mean_confidence": float(r["mean_confidence"])}
        for r in run(
            f"SELECT source, count() AS clips, countIf(label IN {_NEGATIVE_SQL}) AS negative, "
            f"avg(confidence) AS mean_confidence FROM {events} WHERE {clip_filter} GROUP BY source "
            "HAVING clips >= {min_clips:UInt64} ORDER BY negative / clips DESC, clips DESC, source "
            "LIMIT {top:UInt32}",
            params | {"min_clips": min_clips, "top": top_sources})
    ]

    cache_row = run(f"SELECT count() AS clips, countIf(cache_hit) AS hits FROM {events} "
                    f"WHERE segment_index = -1{within('processed_at')}", params)[0]
    cache_clips, hits = int(cache_row["clips"]), int(cache_row["hits"])
    cache = {"clips": cache_clips, "hits": hits, "hit_rate": hits / cache_clips if cache_clips else None}

    dead_letters = [
        {"reason": r["reason"], "stage": r["stage"], "count": int(r["count"]),
         "last_failed_at": millis_to_datetime(int(r["last_ms"]))}
        for r in run(f"SELECT reason, stage, count() AS count, toUnixTimestamp64Milli(max(failed_at)) AS last_ms "
                     f"FROM {dead} WHERE 1{within('failed_at')} GROUP BY reason, stage "
                     "ORDER BY count DESC, reason, stage", params)
    ]

    minutes_per_bucket = BUCKETS[throughput_bucket] / 60_000
    throughput = [
        {"bucket": millis_to_datetime(int(r["bucket_ms"])), "events": int(r["events"]), "clips": int(r["clips"]),
         "events_per_minute": int(r["events"]) / minutes_per_bucket,
         "mean_latency_ms": float(r["mean_latency_ms"])}
        for r in run(
            f"SELECT intDiv(toUnixTimestamp64Milli(processed_at), {{bucket_ms:Int64}}) * {{bucket_ms:Int64}} "
            f"AS bucket_ms, count() AS events, countIf(segment_index = -1) AS clips, "
            f"avg(processing_latency_ms) AS mean_latency_ms FROM {events} WHERE 1{within('processed_at')} "
            "GROUP BY bucket_ms ORDER BY bucket_ms",
            params | {"bucket_ms": BUCKETS[throughput_bucket]})
    ]

    return Report(
        database=database, since=since, until=until, generated_at=now or datetime.now(UTC), bucket=timeline_bucket,
        throughput_bucket=throughput_bucket, min_clips=min_clips, totals=totals, distribution=distribution,
        timeline=timeline, negative_sources=negative_sources, cache=cache, dead_letters=dead_letters,
        throughput=throughput)


def _auto_bucket(first: datetime | None, last: datetime | None) -> str:
    if first is None or last is None:
        return "minute"
    span = last - first
    return "minute" if span <= AUTO_MINUTE_SPAN else "hour" if span <= AUTO_HOUR_SPAN else "day"


_RELATIVE = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time_bound(text: str, now: datetime) -> datetime:
    """``15m`` / ``2h`` / ``7d`` (that long before ``now``) or an ISO 8601 date/time (naive = UTC)."""
    text = text.strip()
    if match := _RELATIVE.fullmatch(text):
        return now - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a relative time (30s, 15m, 2h, 7d, 1w) nor an ISO 8601 time "
                         "(2026-11-25 or 2026-11-25T14:00:00Z)") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _fmt_window(since: datetime | None, until: datetime | None) -> str:
    parts = ([f"since {_fmt_time(since)}"] if since else []) + ([f"until {_fmt_time(until)}"] if until else [])
    return " ".join(parts) or "all time"


# ------------------------------------------------------------------------------------ text


def format_report(report: Report, *, max_rows: int = 40) -> str:
    """The report as plain-text tables (long tables keep their latest ``max_rows`` rows)."""
    t = report.totals
    lines = [f"emofleet report - database {report.database}, {_fmt_window(report.since, report.until)}, "
             f"generated {_fmt_time(report.generated_at)}"]
    if t["clips"]:
        lines.append(f"{t['clips']} clips ({t['events']} events incl. windows) from {t['sources']} source(s), "
                     f"audio produced {_fmt_time(t['first_at'])} .. {_fmt_time(t['last_at'])}")
    else:
        lines.append(f"no clips ({t['events']} events)")

    def section(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, Callable]]) -> None:
        lines.extend(["", title])
        if not rows:
            lines.append("  (none)")
            return
        shown = rows[-max_rows:] if len(rows) > max_rows else rows
        if len(shown) < len(rows):
            lines.append(f"  ({len(rows) - len(shown)} earlier rows not shown)")
        table = [[fmt(row[key]) for key, _, fmt in columns] for row in shown]
        lines.extend("  " + line for line in _text_table([header for _, header, _ in columns], table))

    pct = _fmt_pct
    src = _fmt_source
    section("Emotion distribution (clips)", report.distribution,
            [("label", "label", str), ("clips", "clips", str), ("share", "share", pct)])
    section(f"Timeline per {report.bucket} and source", report.timeline,
            [("bucket", report.bucket, _fmt_time), ("source", "source", src), ("clips", "clips", str),
             ("mean_confidence", "confidence", _fmt_float), ("negativity", "negativity", pct)])
    section(f"Most negative sources (>= {report.min_clips} clips; negative = {'/'.join(NEGATIVE_LABELS)})",
            report.negative_sources,
            [("source", "source", src), ("clips", "clips", str), ("negativity", "negativity", pct),
             ("mean_confidence", "confidence", _fmt_float)])
    c = report.cache
    lines.extend(["", "Cache hit rate", f"  {pct(c['hit_rate'])} ({c['hits']} of {c['clips']} clips)"
                  if c.get("clips") else "  (no clips)"])
    section("Dead letters", report.dead_letters,
            [("reason", "reason", str), ("stage", "stage", str), ("count", "count", str),
             ("last_failed_at", "last failed", _fmt_time)])
    section(f"Throughput per {report.throughput_bucket} (processed_at)", report.throughput,
            [("bucket", report.throughput_bucket, _fmt_time), ("events", "events", str), ("clips", "clips", str),
             ("events_per_minute", "events/min", _fmt_float),
             ("mean_latency_ms", "latency ms", lambda v: f"{v:.0f}")])
    return "\n".join(lines) + "\n"


def _fmt_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%d %H:%M:%S")
    return text + "Z"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _fmt_float(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_source(value: str) -> str:
    return value or "(none)"


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_looks_numeric(r[i]) for r in rows) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _looks_numeric(text: str) -> bool:
    text = text.rstrip("%")
    if text in ("-", ""):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------ plot


def plot_report(report: Report, path: Path) -> Path:
    """Write a PNG with four panels: emotion distribution, timeline per source, throughput, dead letters.

    matplotlib is imported here (and only its Agg canvas is used, no pyplot global state), so importing
    this module stays cheap and works headless.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_dist, ax_time, ax_tp, ax_dead = fig.subplots(2, 2).flat
    fig.suptitle(plot_title(report))

    counts = {r["label"]: r["clips"] for r in report.distribution}
    labels = list(EMOTIONS) + sorted(set(counts) - set(EMOTIONS))
    colors = ["#c0392b" if label in NEGATIVE_LABELS else "#2e86c1" for label in labels]
    ax_dist.bar(labels, [counts.get(label, 0) for label in labels], color=colors)
    ax_dist.set_title("Emotion distribution (clips; red = negative)")
    ax_dist.tick_params(axis="x", rotation=45)

    ax_time.set_title(f"Clips per {report.bucket} by source (top 6)")
    volume: dict[str, int] = {}
    for r in report.timeline:
        volume[r["source"]] = volume.get(r["source"], 0) + r["clips"]
    for source in sorted(volume, key=lambda s: (-volume[s], s))[:6]:
        points = [(r["bucket"], r["clips"]) for r in report.timeline if r["source"] == source]
        ax_time.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=_fmt_source(source))
    if volume:
        ax_time.legend(fontsize="small")
    else:
        _no_data(ax_time)

    ax_tp.set_title(f"Throughput (events per minute, by {report.throughput_bucket} of processed_at)")
    if report.throughput:
        ax_tp.plot([r["bucket"] for r in report.throughput], [r["events_per_minute"] for r in report.throughput],
                   marker=".", color="#27ae60")
    else:
        _no_data(ax_tp)
    for ax, rows, bucket in ((ax_time, report.timeline, report.bucket),
                             (ax_tp, report.throughput, report.throughput_bucket)):
        if rows:  # else matplotlib spans years around a lone point
            ax.set_xlim(*time_axis_limits([r["bucket"] for r in rows], bucket))
            ax.set_ylim(bottom=0)
            locator = AutoDateLocator()
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.set_xlabel("UTC")
    for ax in (ax_dist, ax_time, ax_dead):  # counts; throughput per minute may be fractional
        (ax.xaxis if ax is ax_dead else ax.yaxis).set_major_locator(MaxNLocator(integer=True))

    ax_dead.set_title("Dead letters by reason / stage")
    if report.dead_letters:
        names = [f"{r['reason']} / {r['stage']}" for r in report.dead_letters][::-1]
        ax_dead.barh(names, [r["count"] for r in report.dead_letters][::-1], color="#7f8c8d")
    else:
        _no_data(ax_dead)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_title(report: Report) -> str:
    t = report.totals
    window = "" if report.since is None and report.until is None else f" ({_fmt_window(report.since, report.until)})"
    if not t["clips"]:
        return f"emofleet report: no clips{window}"
    return (f"emofleet report: {t['clips']} clips from {t['sources']} source(s), audio produced "
            f"{_fmt_time(t['first_at'])} .. {_fmt_time(t['last_at'])}{window}")


def time_axis_limits(buckets: Sequence[datetime], bucket: str) -> tuple[datetime, datetime]:
    """The data's span, half a bucket of margin on each side (points sit at bucket starts)."""
    margin = timedelta(milliseconds=BUCKETS[bucket] / 2)
    return min(buckets) - margin, max(buckets) + margin


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------ query output

FORMATS = ("table", "csv", "json")


def render_rows(rows: Sequence[Mapping[str, Any]], fmt: str = "table") -> str:
    """Rows (dicts) as an aligned text ``table``, ``csv`` (header + rows) or ``json`` (one array), without a
    trailing newline (``print()`` it).

    Datetimes are ISO 8601, bytes are decoded as UTF-8 (invalid bytes escaped), NaN/inf become null in
    JSON. Columns are the keys of the rows in first-seen order.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    columns: list[str] = list(dict.fromkeys(key for row in rows for key in row))
    if fmt == "json":
        return json.dumps([{k: json_value(row.get(k), finite=True) for k in columns} for row in rows],
                          ensure_ascii=False, indent=None)
    if fmt == "csv":
        if not columns:
            return ""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row.get(k)) for k in columns])
        return buffer.getvalue().removesuffix("\n")
    if not columns:
        return "(0 rows)"
    table = [[_table_value(row.get(k)) for k in columns] for row in rows]
    lines = _text_table(columns, table)
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def _table_value(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (datetime, date, bytes, bytearray)):
        return json_value(value, finite=True)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(json_value(value, finite=True), ensure_ascii=False)
    return " ".join(str(value).split()) if "\n" in str(value) else str(value)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (datetime, date, bytes, bytearray)):
        return json_value(value, finite=True)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(json_value(value, finite=True), ensure_ascii=False)
    return value
