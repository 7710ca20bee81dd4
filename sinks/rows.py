"""Pure conversions from decoded Avro records (plain dicts) to ClickHouse rows.

The sink calls these once per consumed message, so they are written for speed (measured
~0.5-0.7 M rows/s for :func:`event_row` on the 2-core dev machine, see tests/test_clickhouse_schema.py):
direct dict indexing, no per-row loops over column names, one precomputed epoch for timestamps.

Conventions (they match ``sinks/migrations.py``):

* ``timestamp-millis`` fields arrive as ints (epoch milliseconds UTC, see ``schemas/codec.py``) and leave
  as timezone-aware UTC ``datetime`` objects, which clickhouse-connect writes into ``DateTime64(3, 'UTC')``
  unambiguously whatever the process timezone (chDB uses the process TZ for naive values).
* Optional strings of EmotionEvent (``tenant``, ``source``, ``channel``, ``call_id``) and of DeadLetter
  (``audio_id``, ``uri``) become ``''`` when null: they are ``LowCardinality(String)`` / ``String`` columns,
  ORDER BY keys may not be Nullable, and analysts filter ``source = ''`` more easily than ``IS NULL``.
* ``DeadLetter.key`` stays ``None`` when null (``Nullable(String)``): for replay a missing key and an empty
  key are different Kafka records. Header values keep their ``None`` too.
* ``embedding`` null -> ``[]``. ``frame_scores`` are not part of the event row; see :func:`frame_rows`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any

from emofleet.schemas.emotions import EMOTIONS

SCORE_COLUMNS: tuple[str, ...] = tuple(f"score_{name}" for name in EMOTIONS)

LINEAGE_COLUMNS: tuple[str, ...] = ("kafka_topic", "kafka_partition", "kafka_offset", "kafka_topic_id", "inserted_at")

EVENT_COLUMNS: tuple[str, ...] = (
    "event_id", "audio_id", "uri", "content_sha256", "model_id", "model_revision", "granularity",
    "label", "confidence", *SCORE_COLUMNS, "embedding",
    "duration_seconds", "segment_index", "segment_count", "segment_start_seconds", "segment_end_seconds",
    "processed_at", "processing_latency_ms", "cache_hit",
    "tenant", "source", "channel", "call_id", "attributes", "reference_produced_at",
    "source_topic", "source_partition", "source_offset",
    *LINEAGE_COLUMNS,
)
"""Columns of ``emotion_events`` in table order; :func:`event_row` returns values in this order."""

DEAD_LETTER_COLUMNS: tuple[str, ...] = (
    "dead_letter_id", "source_topic", "source_partition", "source_offset", "key", "payload", "headers",
    "error_class", "error_message", "reason", "stage", "attempts", "audio_id", "uri", "failed_at",
    "processor",
    *LINEAGE_COLUMNS,
)
"""Columns of ``dead_letters`` in table order; :func:`dead_letter_row` returns values in this order."""

FRAME_COLUMNS: tuple[str, ...] = (
    "event_id", "tenant", "reference_produced_at", "processed_at", "frame_index", *SCORE_COLUMNS,
)
"""Columns of ``emotion_frames`` in table order; :func:`frame_rows` returns rows in this order."""

AGGREGATE_COLUMNS: tuple[str, ...] = (
    "aggregate_id", "scope", "tenant", "scope_value", "window_type", "window_size_seconds", "window_hop_seconds",
    "window_start", "window_end", "clips", *(f"count_{name}" for name in EMOTIONS), "mean_confidence", "negativity",
    "first_event_at", "last_event_at",
    *LINEAGE_COLUMNS,
)
"""Columns of ``emotion_aggregates`` in table order; :func:`aggregate_row` returns values in this order."""

FRAMES_PER_SECOND = 50
"""emotion2vec frame rate: frame ``i`` of a clip starts at ``i / 50`` seconds."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_in_emotion_order = itemgetter(*EMOTIONS)  # a scores or counts record's values, in EMOTIONS order


def millis_to_datetime(ms: int) -> datetime:
    """Epoch milliseconds UTC -> aware UTC datetime (exact, no float rounding)."""
    return _EPOCH + ms * _MILLISECOND


def datetime_to_millis(value: datetime) -> int:
    """Aware datetime -> epoch milliseconds (naive values are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MILLISECOND


def event_row(event: Mapping[str, Any], topic: str, partition: int, offset: int, inserted_at: datetime,
              topic_id: str = "") -> list:
    """One ``emotion_events`` row (order of :data:`EVENT_COLUMNS`) from a decoded EmotionEvent.

    ``topic``/``partition``/``offset`` are the position of the event in the results topic and ``topic_id``
    the Kafka id of that topic's incarnation (the sink resumes from them); ``inserted_at`` should be an
    aware UTC datetime, one per batch.
    """
    return [
        event["event_id"], event["audio_id"], event["uri"], event["content_sha256"],
        event["model_id"], event["model_revision"], event["granularity"],
        event["label"], event["confidence"],
        *_in_emotion_order(event["scores"]),
        event.get("embedding") or [],
        event["duration_seconds"], event["segment_index"], event["segment_count"],
        event["segment_start_seconds"], event["segment_end_seconds"],
        _EPOCH + event["processed_at"] * _MILLISECOND, event["processing_latency_ms"], event["cache_hit"],
        event.get("tenant") or "", event.get("source") or "", event.get("channel") or "",
        event.get("call_id") or "", event.get("attributes") or {},
        _EPOCH + event["reference_produced_at"] * _MILLISECOND,
        event["source_topic"], event["source_partition"], event["source_offset"],
        topic, partition, offset, topic_id, inserted_at,
    ]


def dead_letter_row(record: Mapping[str, Any], topic: str, partition: int, offset: int,
                    inserted_at: datetime, topic_id: str = "") -> list:
    """One ``dead_letters`` row (order of :data:`DEAD_LETTER_COLUMNS`) from a decoded DeadLetter.

    ``payload``/``key``/header values stay ``bytes`` (ClickHouse ``String`` holds arbitrary bytes; read
    them back with ``column_formats={'payload': 'bytes'}``, else clickhouse-connect hex-encodes non-UTF-8).
    """
    return [
        record["dead_letter_id"], record["source_topic"], record["source_partition"], record["source_offset"],
        record.get("key"), record["payload"],
        [(h["key"], h.get("value")) for h in record.get("headers") or ()],
        record["error_class"], record["error_message"], record["reason"], record["stage"], record["attempts"],
        record.get("audio_id") or "", record.get("uri") or "",
        _EPOCH + record["failed_at"] * _MILLISECOND, record["processor"],
        topic, partition, offset, topic_id, inserted_at,
    ]


def frame_rows(event: Mapping[str, Any], max_frames: int | None = None) -> list[list]:
    """``emotion_frames`` rows (order of :data:`FRAME_COLUMNS`) for a frame-granularity event.

    Only the whole-clip summary event (``segment_index == -1``) yields rows: its ``frame_scores`` are all
    frames of the clip in order (the per-window events carry the same frames again, split by window), so
    taking the summary stores each frame exactly once, with ``frame_index`` counted from the clip start
    (``frame_index / 50`` = seconds). Events without ``frame_scores`` yield ``[]``.

    A clip of more than ``max_frames`` frames is downsampled, not truncated: each row is then the mean of a
    run of ``ceil(frames / max_frames)`` consecutive frames and its ``frame_index`` is the run's first frame,
    so ``frame_index / 50`` stays the start in seconds and the whole clip stays covered, more coarsely.
    """
    frames = event.get("frame_scores")
    if not frames or event["segment_index"] != -1:
        return []
    head = [event["event_id"], event.get("tenant") or "", _EPOCH + event["reference_produced_at"] * _MILLISECOND,
            _EPOCH + event["processed_at"] * _MILLISECOND]
    if max_frames is not None and len(frames) > max_frames:
        return [[*head, index, *scores] for index, scores in pooled_frames(frames, max_frames)]
    return [
        [*head, index, *_in_emotion_order(f)]
        for index, f in enumerate(frames)
    ]


def pooled_frames(frames: Sequence[Mapping[str, float]], max_frames: int) -> list[tuple[int, list[float]]]:
    """At most ``max_frames`` (first frame index, mean scores in :data:`EMOTIONS` order) pairs: the means of
    consecutive runs of ``ceil(len(frames) / max_frames)`` frames (the last run may be shorter)."""
    import numpy as np

    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    stride = -(-len(frames) // max_frames)
    scores = np.array([[f[name] for name in EMOTIONS] for f in frames], dtype=np.float64)
    starts = np.arange(0, len(frames), stride)
    lengths = np.diff(np.append(starts, len(frames)))
    means = np.add.reduceat(scores, starts, axis=0) / lengths[:, None]
    return list(zip(starts.tolist(), means.tolist(), strict=True))


def aggregate_row(record: Mapping[str, Any], topic: str, partition: int, offset: int, inserted_at: datetime,
                  topic_id: str = "") -> list:
    """One ``emotion_aggregates`` row (order of :data:`AGGREGATE_COLUMNS`) from a decoded EmotionAggregate."""
    return [
        record["aggregate_id"], record["scope"], record["tenant"], record["scope_value"], record["window_type"],
        record["window_size_seconds"], record["window_hop_seconds"],
        _EPOCH + record["window_start"] * _MILLISECOND, _EPOCH + record["window_end"] * _MILLISECOND,
        record["clips"], *_in_emotion_order(record["label_counts"]), record["mean_confidence"], record["negativity"],
        _EPOCH + record["first_event_at"] * _MILLISECOND, _EPOCH + record["last_event_at"] * _MILLISECOND,
        topic, partition, offset, topic_id, inserted_at,
    ]
