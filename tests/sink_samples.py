"""Realistic EmotionEvent / DeadLetter records for the sink's tests (and bench/sink.py).

The events are made by the processors' own :func:`emofleet.processors.events.emotion_events` (so their
shape can never drift from what the processors publish); that module imports the model code (torch),
so it is imported lazily here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from emofleet.schemas.emotions import EMOTIONS


def scores_for(label: str, confidence: float) -> list[float]:
    """Nine scores summing to 1 with ``label`` on top at ``confidence`` (the rest shared evenly).

    Values are float32-exact when ``confidence`` is a multiple of 1/8 (so tests can compare exactly).
    """
    rest = (1.0 - confidence) / (len(EMOTIONS) - 1)
    if rest > confidence:
        raise ValueError(f"confidence {confidence} too low for {label!r} to be the top score")
    return [confidence if name == label else rest for name in EMOTIONS]


def sample_events(*, audio_id: str, label: str = "neutral", confidence: float = 0.75, produced_at_ms: int,
                  processed_at_ms: int | None = None, tenant: str | None = "acme", source: str | None = "line-1",
                  channel: str | None = None, call_id: str | None = None, attributes: Mapping[str, str] | None = None,
                  windows: Sequence[tuple[float, float]] = ((0.0, 4.0),), window_labels: Sequence[str] | None = None,
                  cache_hit: bool = False, latency_ms: int = 120, embedding_dim: int = 0, frames: int = 0,
                  model_id: str = "iic/emotion2vec_plus_large", revision: str = "r1",
                  lineage: tuple[str, int, int] = ("emofleet.audio", 0, 0)) -> list[dict[str, Any]]:
    """The events a processor publishes for one clip: one per window plus the whole-clip summary
    (segment_index -1, last) when there are several windows, else just the summary.

    Every window scores ``label`` at ``confidence`` unless ``window_labels`` gives one label per window.
    ``frames`` > 0 adds that many frame score rows per window (granularity "frame"); ``embedding_dim`` > 0
    adds an embedding.
    """
    import numpy as np

    from emofleet.processors.events import ClipResult, ModelIdentity, emotion_events, prediction_from_scores
    from emofleet.streams.dead_letters import Lineage

    labels = list(window_labels) if window_labels is not None else [label] * len(windows)
    predictions = []
    for i, window_label in enumerate(labels):
        scores = np.asarray(scores_for(window_label, confidence), dtype=np.float32)
        embedding = np.linspace(0, 1, embedding_dim, dtype=np.float32) + i if embedding_dim else None
        frame_scores = np.tile(scores, (frames, 1)) if frames else None
        predictions.append(prediction_from_scores(scores, embedding, frame_scores))
    reference = {"audio_id": audio_id, "uri": f"file:///data/{audio_id}.wav", "produced_at": produced_at_ms,
                 "tenant": tenant, "source": source, "channel": channel, "call_id": call_id,
                 "attributes": dict(attributes or {})}
    model = ModelIdentity(model_id, revision, "frame" if frames else "utterance", bool(embedding_dim))
    return emotion_events(
        reference, Lineage(*lineage), hashlib.sha256(audio_id.encode()).hexdigest(),
        ClipResult(tuple(tuple(w) for w in windows), tuple(predictions)), model, cache_hit=cache_hit,
        processed_at_ms=processed_at_ms if processed_at_ms is not None else produced_at_ms + 1_000,
        latency_ms=latency_ms)


def sample_dead_letter(*, offset: int, reason: str = "not_found", stage: str = "fetch", failed_at_ms: int,
                       key: bytes | None = b"k", payload: bytes = b"\xc3\x01\x00\xffnot-avro",
                       headers: Sequence[tuple[str, bytes | None]] = (("trace", b"t-1"), ("trace", None)),
                       topic: str = "emofleet.audio", partition: int = 0, audio_id: str | None = None,
                       ) -> dict[str, Any]:
    """A DeadLetter record as the processors publish it (via ``streams.dead_letters.dead_letter``)."""
    from emofleet.streams.dead_letters import Failure, Lineage, dead_letter

    reference = {"audio_id": audio_id, "uri": f"file:///data/{audio_id}.wav"} if audio_id else None
    return dead_letter(key=key, payload=payload, headers=list(headers), lineage=Lineage(topic, partition, offset),
                       failure=Failure(reason, stage, "FileNotFoundError", f"no such file (offset {offset})"),
                       reference=reference, processor="proc-1/123", failed_at_ms=failed_at_ms)
