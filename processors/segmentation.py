"""Where the utterances are: voice-activity segmentation of a clip's samples, before the model sees them.

emotion2vec+ is trained on utterances of a few seconds; a call is minutes of turns with silences between
them. :class:`VoiceActivity` asks Silero VAD (trained weights shipped inside the ``silero-vad`` wheel, so
nothing is downloaded at run time) for a speech probability per 32 ms frame; :func:`speech_regions` turns
those probabilities into utterances, a pure function of the probabilities and :class:`UtteranceRules`:

1. frames at or above ``threshold`` start speech, frames below ``threshold - 0.15`` end it (hysteresis, so
   a dip inside a word does not cut it);
2. regions closer than ``merge_gap_seconds`` are merged (a breath is not a turn);
3. a region longer than ``max_seconds`` is split at its quietest frame (lowest speech probability) away
   from its ends, recursively, so no utterance is longer than the model is good at;
4. regions shorter than ``min_seconds`` are dropped (clicks, coughs);
5. each region is padded by ``padding_seconds`` on both sides (VAD onsets are late by a frame or two),
   at most half way to its neighbour and never past the clip.

Silence is never sent to the model; a clip with no speech has no utterances (its whole-clip event says so).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from emofleet.schemas.emotions import SAMPLE_RATE

FRAME_SAMPLES = 512  # Silero VAD's frame at 16 kHz: 32 ms
HYSTERESIS = 0.15


@dataclass(frozen=True)
class UtteranceRules:
    threshold: float = 0.5
    min_seconds: float = 0.4
    max_seconds: float = 15.0
    padding_seconds: float = 0.2
    merge_gap_seconds: float = 0.5  # pauses inside a sentence run to ~0.4 s; turns in a call are longer

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"VAD threshold must be between 0 and 1, got {self.threshold}")
        if not 0.0 <= self.min_seconds < self.max_seconds:
            raise ValueError(f"need 0 <= min_seconds < max_seconds, got {self.min_seconds}, {self.max_seconds}")
        if self.padding_seconds < 0 or self.merge_gap_seconds < 0:
            raise ValueError("padding_seconds and merge_gap_seconds must be >= 0")


def _raw_regions(probs: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Frame ranges [start, end) of speech, with hysteresis."""
    regions: list[tuple[int, int]] = []
    start: int | None = None
    low = max(0.0, threshold - HYSTERESIS)
    for index, p in enumerate(probs):
        if start is None and p >= threshold:
            start = index
        elif start is not None and p < low:
            regions.append((start, index))
            start = None
    if start is not None:
        regions.append((start, len(probs)))
    return regions


def _merge(regions: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in regions:
        if merged and start - merged[-1][1] < gap:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _split(start: int, end: int, probs: np.ndarray, longest: int, shortest: int) -> list[tuple[int, int]]:
    """Split [start, end) at its quietest frame until no part is longer than ``longest`` frames."""
    if end - start <= longest:
        return [(start, end)]
    margin = max(shortest, 1)
    inner = probs[start + margin:end - margin]
    if len(inner) == 0:  # cannot keep both halves long enough: cut in the middle
        cut = (start + end) // 2
    else:
        cut = start + margin + int(np.argmin(inner))
    return _split(start, cut, probs, longest, shortest) + _split(cut, end, probs, longest, shortest)


def speech_regions(probs: np.ndarray, n_samples: int, rules: UtteranceRules,
                   frame_samples: int = FRAME_SAMPLES, sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """Utterances as sample ranges [start, end) of a clip of ``n_samples``, from per-frame speech probabilities."""
    frames_per_second = sample_rate / frame_samples
    regions = _merge(_raw_regions(probs, rules.threshold), round(rules.merge_gap_seconds * frames_per_second))
    longest = max(1, int(rules.max_seconds * frames_per_second))
    shortest = max(1, round(rules.min_seconds * frames_per_second))
    frames = [part for start, end in regions for part in _split(start, end, probs, longest, shortest)]
    pad = round(rules.padding_seconds * sample_rate)
    bounds = [(start * frame_samples, min(end * frame_samples, n_samples)) for start, end in frames
              if (end - start) * frame_samples >= rules.min_seconds * sample_rate]
    utterances: list[tuple[int, int]] = []
    for index, (first, last) in enumerate(bounds):
        # into the silence around it, at most half way to a neighbour (never overlapping it) or to the clip's edge
        left = (bounds[index - 1][1] + first) // 2 if index else 0
        right = (last + bounds[index + 1][0]) // 2 if index + 1 < len(bounds) else n_samples
        utterances.append((max(left, first - pad), min(right, last + pad)))
    return utterances


class VoiceActivity:
    """Silero VAD speech probabilities per 32 ms frame. Thread-safe (one model per thread: it keeps state).

    The model (2 MB, TorchScript) loads from the installed wheel on first use in each thread.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def _model(self) -> Any:
        model = getattr(self._local, "model", None)
        if model is None:
            from silero_vad import load_silero_vad

            model = self._local.model = load_silero_vad()
        return model

    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        """One probability per started frame of ``samples`` (mono, float32, 16 kHz)."""
        import torch

        if len(samples) == 0:
            return np.zeros(0, dtype=np.float32)
        with torch.inference_mode():
            out = self._model().audio_forward(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)),
                                              SAMPLE_RATE)
        return out[0].numpy()

    def utterances(self, samples: np.ndarray, rules: UtteranceRules) -> list[tuple[int, int]]:
        return speech_regions(self.probabilities(samples), len(samples), rules)
