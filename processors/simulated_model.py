"""A simulated accelerator for capacity planning and benchmarks: NEVER a production model.

``--model simulated:<audio-s/s>[,<ms per forward>]`` (``EMOFLEET_MODEL_MODEL``) selects it explicitly; no
default and no fallback ever picks it. It stands for one device that scores ``<audio-s/s>`` seconds of
audio per second plus a fixed ``<ms per forward>`` per batched forward (kernel launches, transfers). A
forward of clips totalling ``A`` audio seconds returns after ``A / rate + ms / 1000`` seconds, measured from
the call, like a real forward that the host waits on: the wait is a ``time.sleep`` (the GIL is released,
as it is while a GPU computes), so the data path around it runs exactly as it would next to a device.
``simulated:inf`` (or ``inf,0``) is an infinitely fast device: it measures the data path alone.

Scores are valid and deterministic: a softmax over the nine labels of ``emofleet.schemas.emotions``, derived
from a hash of each clip's samples, so the same audio always gets the same scores and the dedupe cache,
windowing, frame outputs and embeddings (``EMBEDDING_DIM``, emotion2vec+ large) all behave as with the real
model. They mean nothing about emotions: every event carries the model id ``simulated:<rate>,<ms>`` and the
revision ``simulated``, so results can never be mistaken for real ones (and never share a cache namespace
with them).
"""

from __future__ import annotations

import hashlib
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from emofleet.processors.model import GRANULARITIES, Prediction
from emofleet.processors.packed_forward import frame_count, min_samples
from emofleet.processors.tiny_model import FEATURE_ENCODER_SPEC
from emofleet.schemas.emotions import EMOTIONS, SAMPLE_RATE

__all__ = ["EMBEDDING_DIM", "PREFIX", "SimulatedDevice", "SimulatedModel", "SimulatedSpecError", "is_simulated",
           "parse_simulated"]

PREFIX = "simulated:"
REVISION = "simulated"
EMBEDDING_DIM = 1024  # emotion2vec_plus_large
# emotion2vec's conv feature extractor, (dim, kernel, stride) per layer: the frame count of a clip.
# funasr evaluates this spec string the same way; it is our own constant, not input.
_LAYERS: list[tuple[int, int, int]] = eval(FEATURE_ENCODER_SPEC.format(c=512), {"__builtins__": {}})  # noqa: S307
_LOGIT_SCALE = 4.0  # spread of the logits: softmax maxima mostly 0.2-0.6, like real scores


class SimulatedSpecError(ValueError):
    """``simulated:<...>`` does not parse; the message says how to write it."""


@dataclass(frozen=True)
class SimulatedDevice:
    audio_seconds_per_second: float  # math.inf = infinitely fast
    ms_per_forward: float = 0.0

    @property
    def model_id(self) -> str:
        rate = "inf" if math.isinf(self.audio_seconds_per_second) else f"{self.audio_seconds_per_second:g}"
        return f"{PREFIX}{rate},{self.ms_per_forward:g}"

    def forward_seconds(self, audio_seconds: float) -> float:
        """How long a forward over ``audio_seconds`` of audio takes on this device."""
        return audio_seconds / self.audio_seconds_per_second + self.ms_per_forward / 1000


def is_simulated(model: str) -> bool:
    return model.startswith(PREFIX)


def parse_simulated(model: str) -> SimulatedDevice:
    """``simulated:5000`` / ``simulated:5000,2`` / ``simulated:inf`` -> the device it models."""
    if not is_simulated(model):
        raise SimulatedSpecError(f"{model!r} does not start with {PREFIX!r}")
    hint = "write simulated:<audio seconds per second>[,<ms per forward>], e.g. simulated:5000,2 or simulated:inf"
    parts = model[len(PREFIX):].split(",")
    if len(parts) > 2:
        raise SimulatedSpecError(f"{model!r}: {hint}")
    try:
        rate = float(parts[0])
        ms = float(parts[1]) if len(parts) == 2 else 0.0
    except ValueError:
        raise SimulatedSpecError(f"{model!r}: {hint}") from None
    if not rate > 0 or not 0 <= ms < math.inf:  # also rejects NaN
        raise SimulatedSpecError(f"{model!r}: the rate must be > 0 and the ms per forward >= 0 and finite; {hint}")
    return SimulatedDevice(rate, ms)


class SimulatedModel:
    """The :class:`~emofleet.processors.model.EmotionModel` interface the processor uses, on a modelled device.

    Thread-safe: each call sleeps on its own; two concurrent calls model two devices, so keep one inference
    thread per instance (as the processor does) to model one.
    """

    def __init__(self, device: SimulatedDevice, *, precision: str = "fp32") -> None:
        self.simulated = device
        self.model_id = device.model_id
        self.revision = REVISION
        self.device = "simulated"
        self.precision = precision
        self.threads = 0
        self.embedding_dim = EMBEDDING_DIM
        self.min_samples = min_samples(_LAYERS)

    def predict(self, clips: Sequence[np.ndarray], *, granularity: str = "utterance",
                embeddings: bool = False) -> list[Prediction]:
        """Scores for ``clips`` (float32 mono 16 kHz), returned when the modelled forward would finish."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
        started = time.monotonic()
        if not clips:
            return []
        for index, clip in enumerate(clips):
            if clip.ndim != 1:
                raise ValueError(f"clip {index}: expected mono 1-D samples, got shape {clip.shape}")
            if clip.shape[0] < self.min_samples:
                raise ValueError(f"clip {index}: {clip.shape[0]} samples is shorter than the model's minimum "
                                 f"{self.min_samples}")
        predictions = self._predictions(clips, granularity, embeddings)
        audio_seconds = sum(len(c) for c in clips) / SAMPLE_RATE
        remaining = started + self.simulated.forward_seconds(audio_seconds) - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)  # releases the GIL, as the host does while a device computes
        return predictions

    def frames(self, num_samples: int) -> int:
        return frame_count(num_samples, _LAYERS)

    def _predictions(self, clips: Sequence[np.ndarray], granularity: str, embeddings: bool) -> list[Prediction]:
        seeds = [_seed(clip) for clip in clips]
        digests = b"".join(hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=4 * len(EMOTIONS)).digest()
                           for seed in seeds)
        logits = np.frombuffer(digests, dtype="<u4").reshape(len(clips), len(EMOTIONS)) / 2**32 * _LOGIT_SCALE
        scores = _softmax(logits).astype(np.float32)  # one softmax for the batch
        best = scores.argmax(axis=1).tolist()
        predictions = []
        for index, (clip, seed) in enumerate(zip(clips, seeds, strict=True)):
            frame_scores = embedding = None
            if granularity == "frame" or embeddings:
                rng = np.random.default_rng(seed)
                if granularity == "frame":
                    noise = rng.normal(0.0, 0.5, (self.frames(len(clip)), len(EMOTIONS)))
                    frame_scores = _softmax(logits[index] + noise).astype(np.float32)
                if embeddings:
                    embedding = rng.standard_normal(EMBEDDING_DIM).astype(np.float32)
            row = scores[index]
            predictions.append(Prediction(scores=row, label=EMOTIONS[best[index]], confidence=float(row[best[index]]),
                                          embedding=embedding, frame_scores=frame_scores))
        return predictions


def _seed(clip: np.ndarray) -> int:
    """A hash of the clip's samples, at memory speed (crc32 over every byte, mixed with the length)."""
    samples = np.ascontiguousarray(clip, dtype=np.float32)
    return zlib.crc32(memoryview(samples).cast("B"), len(samples))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
