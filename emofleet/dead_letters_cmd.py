"""`emofleet dead-letters list|summary|show|replay`: the dead letters ClickHouse stores (table ``dead_letters``,
written by the sink from the dead-letter topic), and replaying a selection onto the audio topic.

The payload of a dead letter from the audio topic is the original AudioReference: it is decoded (with the
deployment's codec, any schema version) for the tenant, for ``show`` and for the replay. Replays follow
:mod:`emofleet.streams.replay`: same ``audio_id`` and ``produced_at`` (so the same ``event_id`` and one row per
event), lineage in the attributes, and at most one replay per dead letter: a Redis replay log (``SET NX`` under the
cache's key prefix, kept as long as the dead letters) plus a check that ClickHouse has no result for it yet.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from emofleet.core.errors import UserFacingError

QueryRunner = Callable[[str, dict[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class DeadLetterFilter:
    reasons: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    tenant: str | None = None  # read from the decoded payload, so applied after the query
    since_ms: int | None = None  # failed_at >= since
    until_ms: int | None = None

    @property
    def selects(self) -> bool:
        return bool(self.reasons or self.stages or self.ids or self.tenant or self.since_ms or self.until_ms)

    def sql(self) -> tuple[str, dict[str, Any]]:
        clauses, parameters = [], {}
        for column, values in (("reason", self.reasons), ("stage", self.stages), ("dead_letter_id", self.ids)):
            if values:
                clauses.append(f"{column} IN {{{column}s:Array(String)}}")
                parameters[f"{column}s"] = list(values)
        if self.since_ms is not None:
            clauses.append("failed_at >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')")
            parameters["since_ms"] = self.since_ms
        if self.until_ms is not None:
            clauses.append("failed_at < fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC')")
            parameters["until_ms"] = self.until_ms
        return " AND ".join(clauses) or "1", parameters


@dataclass
class DeadLetter:
    """A ``dead_letters`` row with its bytes restored and its payload decoded where possible."""

    record: dict[str, Any]  # the DeadLetter fields (key/payload/header values as bytes, failed_at epoch ms)
    reference: dict[str, Any] | None = None
    decode_error: str | None = None
    tenant: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.tenant = (self.reference or {}).get("tenant") or ""


_SELECT = ("SELECT dead_letter_id, source_topic, source_partition, source_offset, isNull(key) AS key_null, "
           "base64Encode(ifNull(key, '')) AS key_b64, base64Encode(payload) AS payload_b64, "
           "arrayMap(h -> tuple(h.1, isNull(h.2), base64Encode(ifNull(h.2, ''))), headers) AS headers_b64, "
           "error_class, error_message, reason, stage, attempts, audio_id, uri, "
           "toUnixTimestamp64Milli(failed_at) AS failed_at_ms, processor")


def fetch(run: QueryRunner, database: str, wanted: DeadLetterFilter, limit: int, codec: Any,
          audio_topic: str) -> list[DeadLetter]:
    """Dead letters matching ``wanted``, oldest first, payloads decoded."""
    from emofleet.sinks.migrations import quote_identifier

    where, parameters = wanted.sql()
    rows = run(f"{_SELECT} FROM {quote_identifier(database)}.dead_letters FINAL WHERE {where} "
               f"ORDER BY failed_at, dead_letter_id LIMIT {int(limit)}", parameters)
    letters = [_decoded(record_from_row(row), codec, audio_topic) for row in rows]
    return [d for d in letters if wanted.tenant is None or d.tenant == wanted.tenant]


def record_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    record = {k: row[k] for k in ("dead_letter_id", "source_topic", "source_partition", "source_offset",
                                  "error_class", "error_message", "reason", "stage", "attempts", "audio_id", "uri",
                                  "processor")}
    record["key"] = None if row["key_null"] else base64.b64decode(row["key_b64"])
    record["payload"] = base64.b64decode(row["payload_b64"])
    record["headers"] = [(h[0], None if h[1] else base64.b64decode(h[2])) for h in row["headers_b64"]]
    record["failed_at"] = int(row["failed_at_ms"])
    return record


def _decoded(record: dict[str, Any], codec: Any, audio_topic: str) -> DeadLetter:
    from emofleet.schemas.codec import SchemaError

    if record["source_topic"] != audio_topic:
        return DeadLetter(record, None, f"not from the audio topic ({record['source_topic']})")
    if not record["payload"]:
        return DeadLetter(record, None, "payload emptied by retention (EMOFLEET_CLICKHOUSE_DEAD_LETTER_PAYLOAD_TTL_DAYS)")
    try:
        return DeadLetter(record, codec.decode("audio_reference", record["payload"], topic=audio_topic))
    except SchemaError as error:
        return DeadLetter(record, None, str(error))


# ------------------------------------------------------------------------------------ views (pure)


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def list_rows(letters: Sequence[DeadLetter]) -> list[dict[str, Any]]:
    return [{"dead_letter_id": d.record["dead_letter_id"], "failed_at": _time(d.record["failed_at"]),
             "reason": d.record["reason"], "stage": d.record["stage"], "attempts": d.record["attempts"],
             "tenant": d.tenant, "audio_id": d.record["audio_id"], "uri": d.record["uri"]} for d in letters]


def summary(letters: Sequence[DeadLetter]) -> dict[str, list[dict[str, Any]]]:
    """Counts by reason, stage, tenant and hour of failure."""
    def counted(key: Callable[[DeadLetter], str], name: str) -> list[dict[str, Any]]:
        counts = Counter(key(d) for d in letters)
        return [{name: value, "dead_letters": n} for value, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]

    hours = Counter(_time(d.record["failed_at"] // 3_600_000 * 3_600_000)[:13] + ":00" for d in letters)
    return {"by_reason": counted(lambda d: d.record["reason"], "reason"),
            "by_stage": counted(lambda d: d.record["stage"], "stage"),
            "by_tenant": counted(lambda d: d.tenant or "(none)", "tenant"),
            "by_hour": [{"hour": h, "dead_letters": n} for h, n in sorted(hours.items())]}


def show_text(letter: DeadLetter) -> str:
    from emofleet.sinks.query_server import json_value

    record = letter.record
    lines = [f"{name:<15} {json.dumps(json_value(record[name], finite=True), ensure_ascii=False)}"
             for name in ("dead_letter_id", "failed_at", "reason", "stage", "attempts", "error_class", "error_message",
                          "source_topic", "source_partition", "source_offset", "key", "audio_id", "uri", "processor")]
    lines.append(f"{'failed_at_utc':<15} {_time(record['failed_at'])}")
    for key, value in record["headers"]:
        lines.append(f"{'header':<15} {key}={json.dumps(json_value(value, finite=True))}")
    if letter.reference is not None:
        lines.append("payload         AudioReference " + json.dumps(letter.reference, indent=2, ensure_ascii=False))
    else:
        lines.append(f"payload         not decoded: {letter.decode_error}")
        lines.append(f"payload bytes   {len(record['payload'])}, first 64: {record['payload'][:64].hex()}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ replay


@dataclass
class ReplayOutcome:
    planned: list[tuple[DeadLetter, Any]]  # (dead letter, Verdict)
    sent: int = 0
    failed: list[str] = field(default_factory=list)


def stored_references(run: QueryRunner, database: str, letters: Sequence[DeadLetter]) -> set[tuple[str, int]]:
    """(audio_id, produced_at ms) of the letters' references that already have a result in ClickHouse."""
    from emofleet.sinks.migrations import quote_identifier

    ids = sorted({d.reference["audio_id"] for d in letters if d.reference is not None})
    if not ids:
        return set()
    rows = run(f"SELECT DISTINCT audio_id, toUnixTimestamp64Milli(reference_produced_at) AS produced_ms "
               f"FROM {quote_identifier(database)}.emotion_events WHERE audio_id IN {{ids:Array(String)}}", {"ids": ids})
    return {(row["audio_id"], int(row["produced_ms"])) for row in rows}


def plan_replay(letters: Sequence[DeadLetter], stored: set[tuple[str, int]], replayed: set[str],
                audio_topic: str) -> list[tuple[DeadLetter, Any]]:
    from emofleet.streams.replay import verdict

    return [(d, verdict(d.record, d.reference, d.decode_error, audio_topic=audio_topic,
                        stored=d.reference is not None
                        and (d.reference["audio_id"], d.reference["produced_at"]) in stored,
                        replayed_before=d.record["dead_letter_id"] in replayed)) for d in letters]


class ReplayLog:
    """Which dead letters were replayed: Redis keys set with NX, kept as long as dead letters are."""

    def __init__(self, settings: Any) -> None:
        import redis

        self._client = redis.Redis.from_url(settings.cache.redis_url, socket_connect_timeout=5, socket_timeout=10)
        self._prefix = settings.cache.key_prefix
        days = settings.clickhouse.dead_letters_ttl_days
        self._ttl = days * 86_400 if days else None
        try:
            self._client.ping()
        except redis.RedisError as error:
            raise UserFacingError(f"cannot reach Redis at {settings.cache.redis_url} for the replay log: {error}",
                                  "set EMOFLEET_CACHE_REDIS_URL (the processors' Redis) or start the stack") from None

    def _key(self, dead_letter_id: str) -> str:
        from emofleet.streams.replay import replay_log_key

        return replay_log_key(self._prefix, dead_letter_id)

    def replayed(self, ids: Sequence[str]) -> set[str]:
        values = self._client.mget([self._key(i) for i in ids]) if ids else []
        return {i for i, value in zip(ids, values, strict=True) if value is not None}

    def claim(self, dead_letter_id: str) -> bool:
        when = datetime.now(UTC).isoformat(timespec="seconds")
        return bool(self._client.set(self._key(dead_letter_id), when, nx=True, ex=self._ttl))

    def release(self, dead_letter_id: str) -> None:
        self._client.delete(self._key(dead_letter_id))

    def close(self) -> None:
        self._client.close()


def replay(settings: Any, plan: list[tuple[DeadLetter, Any]], log: ReplayLog, codec: Any,
           progress: Callable[..., Any]) -> ReplayOutcome:
    """Produce every planned replay (acks=all, idempotent); a failed delivery gives its claim back."""
    from confluent_kafka import KafkaException, Producer

    from emofleet.streams.producer import idempotent_producer_config
    from emofleet.streams.replay import replay_reference
    from emofleet.streams.results import unreachable

    outcome = ReplayOutcome(plan)
    todo = [d for d, v in plan if v.replay]
    topic = settings.kafka.audio_topic
    producer = Producer(idempotent_producer_config(settings.kafka))

    def delivered(letter: DeadLetter) -> Callable[[Any, Any], None]:
        def report(error: Any, _message: Any) -> None:
            if error is None:
                outcome.sent += 1
            else:
                outcome.failed.append(f"{letter.record['dead_letter_id']}: {error.str()}")
                log.release(letter.record["dead_letter_id"])
            bar.update(1)
        return report

    with progress(len(todo), "replay", unit="msg") as bar:
        for letter in todo:
            dead_letter_id = letter.record["dead_letter_id"]
            if not log.claim(dead_letter_id):
                outcome.failed.append(f"{dead_letter_id}: replayed meanwhile by someone else")
                bar.update(1)
                continue
            value = codec.encode("audio_reference", replay_reference(letter.reference, letter.record), topic=topic)
            try:
                producer.produce(topic, value=value, key=letter.record["key"], headers=letter.record["headers"],
                                 on_delivery=delivered(letter))
            except KafkaException as error:
                log.release(dead_letter_id)
                raise unreachable(settings.kafka, error) from None
            producer.poll(0)
        left = producer.flush(60)
    if left:
        outcome.failed.append(f"{left} replay(s) not confirmed by Kafka within 60 s: their replay log entries stay; "
                              "check the audio topic before replaying them again")
    return outcome


# ------------------------------------------------------------------------------------ the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "summary", "show", "replay"),
                        help="list | summary (by reason, stage, tenant, hour) | show ID | replay a selection")
    parser.add_argument("ids", nargs="*", metavar="ID", help="dead_letter_id(s) (show: one; replay: a selection)")
    parser.add_argument("--id", dest="extra_ids", action="append", default=[], metavar="ID",
                        help="select this dead_letter_id; repeatable")
    parser.add_argument("--reason", action="append", default=[], help="select this reason (root_not_allowed, ...)")
    parser.add_argument("--stage", action="append", default=[], help="select this stage (decode, audio, ...)")
    parser.add_argument("--tenant", help="select this tenant (from the decoded reference)")
    parser.add_argument("--since", metavar="TIME", help="failed from this time on: 15m, 2h, 7d (ago) or ISO 8601")
    parser.add_argument("--until", metavar="TIME", help="failed before this time (same forms)")
    parser.add_argument("--all", action="store_true", help="replay: every dead letter (else a selector is required)")
    parser.add_argument("--dry-run", action="store_true", help="replay: say what would be replayed, send nothing")
    parser.add_argument("--limit", type=int, default=10_000, help="most dead letters read (default 10000)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--dsn", dest="clickhouse__dsn", help="ClickHouse DSN (default: chDB under the data dir)")


def filter_from(args: argparse.Namespace, now: datetime) -> DeadLetterFilter:
    from emofleet.results_cmd import time_range_ms

    since_ms, until_ms = time_range_ms(args.since, args.until, now)
    return DeadLetterFilter(reasons=tuple(args.reason), stages=tuple(args.stage),
                            ids=tuple(dict.fromkeys([*args.ids, *args.extra_ids])), tenant=args.tenant,
                            since_ms=since_ms, until_ms=until_ms)


def run(args: argparse.Namespace, settings: Any, query_runner: Callable[[Any], tuple[QueryRunner, Callable[[], None]]],
        progress: Callable[..., Any]) -> int:
    from emofleet.schemas.codec import make_codec
    from emofleet.sinks.analytics import render_rows

    wanted = filter_from(args, datetime.now(UTC))
    if args.action == "show" and len(wanted.ids) != 1:
        raise UserFacingError("show takes one dead_letter_id", "`emofleet dead-letters list` shows them")
    if args.action == "replay" and not (wanted.selects or args.all):
        raise UserFacingError("replay needs a selection", "--reason R, --since/--until, --id ID, --tenant T, or --all")
    codec = make_codec(settings.kafka.schema_registry_url, settings.kafka.registry_config)
    database = settings.clickhouse.database
    run_query, close = query_runner(settings)
    try:
        letters = fetch(run_query, database, wanted, args.limit, codec, settings.kafka.audio_topic)
        stored = stored_references(run_query, database, letters) if args.action == "replay" else set()
    finally:
        close()
    if args.action == "list":
        print(render_rows(list_rows(letters), args.format))
    elif args.action == "summary":
        _print_summary(summary(letters), args.format, render_rows)
    elif args.action == "show":
        if not letters:
            raise UserFacingError(f"no dead letter {wanted.ids[0]}", "`emofleet dead-letters list` shows the ids")
        print(show_text(letters[0]))
    else:
        return _replay(args, settings, letters, stored, codec, progress, render_rows)
    return 0


def _print_summary(tables: dict[str, list[dict[str, Any]]], fmt: str, render: Callable[..., str]) -> None:
    if fmt == "json":
        print(json.dumps(tables))
        return
    print("\n\n".join(f"{name.replace('_', ' ')}\n{render(rows, fmt)}" for name, rows in tables.items()))


def _replay(args: argparse.Namespace, settings: Any, letters: list[DeadLetter], stored: set[tuple[str, int]],
            codec: Any, progress: Callable[..., Any], render: Callable[..., str]) -> int:
    log = ReplayLog(settings)
    try:
        replayed = log.replayed([d.record["dead_letter_id"] for d in letters])
        plan = plan_replay(letters, stored, replayed, settings.kafka.audio_topic)
        rows = [{"dead_letter_id": d.record["dead_letter_id"], "failed_at": _time(d.record["failed_at"]),
                 "reason": d.record["reason"], "audio_id": d.record["audio_id"],
                 "action": ("would replay" if args.dry_run else "replay") if v.replay else f"skip: {v.why}"}
                for d, v in plan]
        if rows:
            print(render(rows, args.format))
        count = sum(1 for _, v in plan if v.replay)
        if args.dry_run:
            print(f"dry run: would replay {count} of {len(plan)} dead letter(s) onto {settings.kafka.audio_topic}",
                  file=sys.stderr)
            return 0
        outcome = replay(settings, plan, log, codec, progress)
    finally:
        log.close()
    print(f"replayed {outcome.sent} of {len(plan)} dead letter(s) onto {settings.kafka.audio_topic}, "
          f"skipped {len(plan) - count}", file=sys.stderr)
    for line in outcome.failed:
        print(f"error: {line}", file=sys.stderr)
    return 1 if outcome.failed else 0
