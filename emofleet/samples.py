"""Generated sample clips for demos and tests: voiced, speech-like signals of varied length."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emofleet.schemas.emotions import SAMPLE_RATE


def synth_clip(seconds: float, seed: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A pitched, syllable-modulated signal with a little noise; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = rng.uniform(90, 260) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.2, 1.5) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(2.5, 5.5) * t)) ** 2
    signal = 0.2 * voice * syllables + 0.01 * rng.standard_normal(t.size)
    return signal.astype(np.float32)


def write_samples(directory: Path, count: int, *, min_seconds: float = 1.0, max_seconds: float = 8.0,
                  seed: int = 0) -> list[Path]:
    """Write ``count`` distinct 16-bit WAV clips (idempotent: existing files are kept)."""
    import soundfile

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        seconds = float(rng.uniform(min_seconds, max_seconds))
        path = directory / f"sample-{seed:03d}-{index:05d}.wav"
        if not path.exists():
            soundfile.write(path, synth_clip(seconds, seed * 1_000_003 + index), SAMPLE_RATE, subtype="PCM_16")
        paths.append(path)
    return paths
