"""Pure transformations from references and model results to EmotionEvent and DeadLetter records."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from emofleet.processors.prediction import Prediction
from emofleet.schemas.emotions import EMOTIONS
from emofleet.streams.dead_letters import Lineage


@dataclass(frozen=True)
class ModelIdentity:
    model_id: str
    revision: str
    granularity: str
    embeddings: bool


@dataclass(frozen=True)
class ClipResult:
    """The model's answer for one clip: a prediction per window, windows as (start, end) seconds."""

    windows: tuple[tuple[float, float], ...]
    predictions: tuple[Prediction, ...]

    @property
    def duration_seconds(self) -> float:
        return self.windows[-1][1]

    def to_bytes(self) -> bytes:
        """Compact JSON for the cache (float32 precision, which is what the model produced)."""
        return json.dumps({
            "windows": self.windows,
            "predictions": [_prediction_to_json(p) for p in self.predictions],
        }, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClipResult:
        payload = json.loads(data)
        return cls(tuple(tuple(w) for w in payload["windows"]),
                   tuple(_prediction_from_json(p) for p in payload["predictions"]))


def _prediction_to_json(prediction: Prediction) -> dict[str, Any]:
    return {
        "scores": prediction.scores.tolist(),
        "embedding": None if prediction.embedding is None else prediction.embedding.tolist(),
        "frame_scores": None if prediction.frame_scores is None else prediction.frame_scores.tolist(),
    }


def _prediction_from_json(payload: Mapping[str, Any]) -> Prediction:
    def array(value: Any) -> np.ndarray | None:
        return None if value is None else np.asarray(value, dtype=np.float32)

    return prediction_from_scores(np.asarray(payload["scores"], dtype=np.float32),
                                  array(payload["embedding"]), array(payload["frame_scores"]))


def prediction_from_scores(scores: np.ndarray, embedding: np.ndarray | None = None,
                           frame_scores: np.ndarray | None = None) -> Prediction:
    best = int(np.argmax(scores))
    return Prediction(scores=scores, label=EMOTIONS[best], confidence=float(scores[best]),
                      embedding=embedding, frame_scores=frame_scores)


def whole_clip(result: ClipResult) -> Prediction:
    """The clip-level prediction of a windowed clip: duration-weighted mean of its windows."""
    if len(result.predictions) == 1:
        return result.predictions[0]
    weights = np.array([end - start for start, end in result.windows], dtype=np.float64)
    weights /= weights.sum()
    scores = np.einsum("w,wk->k", weights, np.stack([p.scores for p in result.predictions])).astype(np.float32)
    embeddings = [p.embedding for p in result.predictions]
    embedding = None if embeddings[0] is None else np.einsum(
        "w,wd->d", weights, np.stack(embeddings)).astype(np.float32)
    frames = [p.frame_scores for p in result.predictions]
    frame_scores = None if frames[0] is None else np.concatenate(frames)
    return prediction_from_scores(scores, embedding, frame_scores)


def event_id(audio_id: str, content_sha256: str, model: ModelIdentity, segment_index: int) -> str:
    """Same reference, same content, same model and options -> same id, so replays are idempotent."""
    text = "|".join([audio_id, content_sha256, model.model_id, model.revision, model.granularity,
                     f"embeddings={model.embeddings}", str(segment_index)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def emotion_events(reference: Mapping[str, Any], lineage: Lineage, content_sha256: str, result: ClipResult,
                   model: ModelIdentity, *, cache_hit: bool, processed_at_ms: int, latency_ms: int,
                   ) -> list[dict[str, Any]]:
    """One event for a clip that fits a window; for a longer clip one per window plus a whole-clip
    summary (segment_index -1) so consumers that want one row per recording can filter on it."""
    segments: list[tuple[int, float, float, Prediction]] = []
    if len(result.predictions) > 1:
        segments += [(i, start, end, p) for i, ((start, end), p) in enumerate(zip(result.windows, result.predictions))]
    segments.append((-1, 0.0, result.duration_seconds, whole_clip(result)))
    common = {
        "audio_id": reference["audio_id"],
        "uri": reference["uri"],
        "content_sha256": content_sha256,
        "model_id": model.model_id,
        "model_revision": model.revision,
        "granularity": model.granularity,
        "duration_seconds": result.duration_seconds,
        "segment_count": len(result.predictions),
        "processed_at": processed_at_ms,
        "processing_latency_ms": latency_ms,
        "cache_hit": cache_hit,
        **{name: reference.get(name) for name in ("tenant", "source", "channel", "call_id")},
        "attributes": dict(reference.get("attributes") or {}),
        "reference_produced_at": reference["produced_at"],
        "source_topic": lineage.topic,
        "source_partition": lineage.partition,
        "source_offset": lineage.offset,
    }
    return [common | {
        "event_id": event_id(reference["audio_id"], content_sha256, model, index),
        "label": prediction.label,
        "confidence": prediction.confidence,
        "scores": _scores(prediction.scores),
        "frame_scores": None if prediction.frame_scores is None else [_scores(f) for f in prediction.frame_scores],
        "embedding": None if prediction.embedding is None else prediction.embedding.tolist(),
        "segment_index": index,
        "segment_start_seconds": start,
        "segment_end_seconds": end,
    } for index, start, end, prediction in segments]


def _scores(values: np.ndarray) -> dict[str, float]:
    return dict(zip(EMOTIONS, map(float, values), strict=True))
