"""Synthetic audio for tests: deterministic tones encoded in memory with soundfile."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf


def tone(seconds: float, rate: int, channels: int = 1, amplitude: float = 0.5) -> np.ndarray:
    """(frames, channels) float32 sines, a different pitch per channel so a mixdown is visible."""
    t = np.arange(round(seconds * rate)) / rate
    pitches = 220.0 * (1 + np.arange(channels))
    return (amplitude * np.sin(2 * np.pi * t[:, None] * pitches)).astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    """Samples in a container (WAV, FLAC, OGG, ...) as bytes."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def wav(seconds: float = 1.0, rate: int = 16_000, channels: int = 1, subtype: str = "PCM_16") -> bytes:
    return encode(tone(seconds, rate, channels), rate, "WAV", subtype)
