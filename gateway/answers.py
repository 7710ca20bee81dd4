"""Pure transformations: EmotionEvents, ClickHouse rows and dead letters -> what a client gets back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from emofleet.gateway.intake import Problem
from emofleet.schemas.emotions import EMOTIONS

PENDING = "pending"
DONE = "done"
FAILED = "failed"


def answer_from_events(result_id: str, events: Iterable[Mapping[str, Any]], *, granularity: str,
                       extract_embedding: bool) -> dict[str, Any]:
    """The answer for one clip from its events (the whole-clip summary, segment_index -1, must be among them).

    Frames and the embedding are included only when asked for (a fleet that computes them for every clip
    answers a plain utterance request without them)."""
    by_index = {event["segment_index"]: event for event in events}
    summary = by_index[-1]
    answer = {
        "id": result_id,
        "status": DONE,
        "label": summary["label"],
        "confidence": summary["confidence"],
        "scores": dict(summary["scores"]),
        "duration_seconds": summary["duration_seconds"],
        "segments": [_segment(by_index[i]) for i in sorted(by_index) if i >= 0],
        "cache_hit": summary["cache_hit"],
        "model": {"id": summary["model_id"], "revision": summary["model_revision"],
                  "granularity": summary["granularity"]},
        "audio_id": summary["audio_id"],
        "content_sha256": summary["content_sha256"],
        **{name: summary.get(name) for name in ("tenant", "source", "channel", "call_id")},
        "attributes": dict(summary.get("attributes") or {}),
        "timings": {"processing_ms": summary["processing_latency_ms"],
                    "pipeline_ms": max(0, summary["processed_at"] - summary["reference_produced_at"])},
    }
    if granularity == "frame":
        answer["frames"] = [dict(frame) for frame in summary.get("frame_scores") or []]
    if extract_embedding:
        answer["embedding"] = summary.get("embedding")
    return answer


def _segment(event: Mapping[str, Any]) -> dict[str, Any]:
    return {"index": event["segment_index"], "start_seconds": event["segment_start_seconds"],
            "end_seconds": event["segment_end_seconds"], "label": event["label"],
            "confidence": event["confidence"], "scores": dict(event["scores"])}


def events_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """emotion_events rows (ClickHouse) back into the event fields :func:`answer_from_events` reads."""
    return [{**row, "scores": {name: row[f"score_{name}"] for name in EMOTIONS},
             "embedding": list(row.get("embedding") or []) or None, "frame_scores": None,
             "processed_at": _millis(row["processed_at"]),
             "reference_produced_at": _millis(row["reference_produced_at"])} for row in rows]


def _millis(value: Any) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, str):
        return int(datetime.fromisoformat(value).timestamp() * 1000)
    return int(value)


def failure(result_id: str, reason: str, message: str) -> dict[str, Any]:
    """A request the pipeline rejected (its dead letter's reason), as stored and answered (422)."""
    return {"id": result_id, "status": FAILED, "reason": reason, "detail": message}


def problem_of(record: Mapping[str, Any]) -> Problem:
    return Problem(422, str(record["reason"]), str(record["detail"]))
