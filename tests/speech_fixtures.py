"""Real recorded-like speech for tests and benches: espeak-ng renders phrases, calls are built from them with
known silences, so where each utterance starts and ends is known exactly."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from emofleet.schemas.emotions import SAMPLE_RATE

PHRASES = (
    "I have been waiting on hold for forty minutes and nobody can tell me why my bill doubled.",
    "I understand, let me look at your account right now.",
    "This is the third time I am calling about the same problem.",
    "Thank you for your patience, I can see the duplicate charge here.",
    "Great, so when will the money be back on my card?",
    "It should appear within three to five business days.",
    "Okay. Thanks for sorting it out so quickly.",
    "You are welcome, is there anything else I can help you with today?",
)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, cache_dir: Path, *, voice: str = "en-us", speed: int = 160) -> np.ndarray:
    """``text`` spoken by espeak-ng, mono float32 at 16 kHz, leading and trailing silence trimmed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{voice}|{speed}|{text}".encode()).hexdigest()[:16]
    path = cache_dir / f"{key}.wav"
    if not path.exists():
        raw = cache_dir / f"{key}.raw.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True,
                       capture_output=True)
        subprocess.run(["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(path)], check=True,
                       capture_output=True)
        raw.unlink()
    samples, _ = sf.read(path, dtype="float32")
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    return samples[loud[0]:loud[-1] + 1]


@dataclass(frozen=True)
class Call:
    samples: np.ndarray
    truth: list[tuple[float, float]]  # seconds where each utterance starts and ends

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    @property
    def speech_seconds(self) -> float:
        return sum(end - start for start, end in self.truth)


def build_call(utterances: list[np.ndarray], gaps: list[float], *, noise: float = 0.002, seed: int = 0) -> Call:
    """``gaps[i]`` seconds of low noise before utterance ``i`` and ``gaps[-1]`` after the last one."""
    assert len(gaps) == len(utterances) + 1
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    truth: list[tuple[float, float]] = []
    at = 0
    for gap, speech in zip(gaps, [*utterances, None], strict=True):
        silence = (rng.standard_normal(round(gap * SAMPLE_RATE)) * noise).astype(np.float32)
        parts.append(silence)
        at += len(silence)
        if speech is not None:
            parts.append(speech)
            truth.append((at / SAMPLE_RATE, (at + len(speech)) / SAMPLE_RATE))
            at += len(speech)
    return Call(np.concatenate(parts), truth)
