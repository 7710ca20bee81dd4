"""Audio URI -> float32 mono 16 kHz samples, the input emotion2vec expects.

Plain 16-bit PCM WAV is converted with numpy (bit-identical to libsndfile's float read); everything else
goes through libsndfile from an in-memory file descriptor. Decoding matches what funasr's own loader
(``funasr.utils.load_utils.load_audio_text_image_video``) does in this environment (no torchaudio installed): soundfile reads float32 (integer PCM scaled to
[-1, 1]), channels are averaged, and ``librosa.resample`` with its default ``soxr_hq`` brings the rate
to 16 kHz, fixed to ``ceil(n * 16000 / rate)`` samples. We call soxr directly with the same quality
and length rule (identical output) because importing librosa costs about a second.

What libsndfile cannot open (MP4/M4A, WebM, AMR, AAC-in-WAV, ...) goes through ffmpeg when it is on
PATH (ffmpeg then downmixes and resamples itself, as funasr's own ffmpeg fallback does; output is
f32le, not funasr's s16le). ffmpeg failing, or exiting 0 but printing an error (a truncated WebM),
is ``corrupt`` (or ``not_audio`` when nothing recognised the bytes). Without ffmpeg: a container we
recognise but libsndfile does not is ``unsupported_format``, a format libsndfile knows but cannot
open is ``corrupt``, anything else is ``not_audio``.

Short clips: anything shorter than ``min_seconds`` is rejected (``too_short``). The model needs at
least ``MIN_MODEL_SAMPLES`` samples (fewer yield zero frames -> NaN), so a clip that passes
``min_seconds`` but is shorter than that (possible only when min_seconds < 0.025 s) is zero-padded at
the end; ``Audio.duration_seconds`` keeps the real, unpadded duration.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from emofleet.processors.fetch import AudioError, Fetcher
from emofleet.schemas.emotions import SAMPLE_RATE
from emofleet.core.config import AudioSettings

__all__ = [
    "MIN_MODEL_SAMPLES", "Audio", "AudioError", "AudioLoader", "decode_audio", "windows",
]

MIN_MODEL_SAMPLES = 400
MERGE_FRACTION = 0.25
FFMPEG_TIMEOUT_SECONDS = 600.0
_BLOCK_VALUES = 1 << 22  # floats per read block (16 MiB), whatever the channel count
_SF_UNRECOGNISED = 1  # libsndfile SF_ERR_UNRECOGNISED_FORMAT

# Containers libsndfile cannot open but ffmpeg can: (offset, magic, name).
_CONTAINERS = (
    (4, b"ftyp", "MP4/M4A"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (0, b"#!AMR", "AMR"),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "ASF/WMA"),
    (8, b"AVI ", "AVI"),
)


@dataclass(frozen=True, eq=False)
class Audio:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE, finite, at least MIN_MODEL_SAMPLES long
    sha256: str  # of the fetched bytes, before decoding
    duration_seconds: float  # of the decoded audio, before any padding


class AudioLoader:
    """Fetch, decode and check audio under one AudioSettings policy. Thread-safe."""

    def __init__(self, settings: AudioSettings, *, observe: Callable[[str, float], None] | None = None) -> None:
        self._settings = settings
        self._fetcher = Fetcher(settings)
        self._observe = observe  # (stage, seconds) for "fetch" and "decode", e.g. a metrics histogram

    def fetch(self, uri: str) -> bytes:
        return self._fetcher.fetch(uri)

    def decode(self, data: bytes) -> np.ndarray:
        return decode_audio(data, self._settings.max_seconds)

    def load(self, uri: str) -> Audio:
        started = time.perf_counter()
        data = self.fetch(uri)
        fetched = time.perf_counter()
        digest = hashlib.sha256(data).hexdigest()
        samples = self.decode(data)
        if self._observe is not None:
            self._observe("fetch", fetched - started)
            self._observe("decode", time.perf_counter() - fetched)
        duration = len(samples) / SAMPLE_RATE
        if not len(samples) or duration < self._settings.min_seconds:
            raise AudioError("too_short", f"{duration:.4f} s is under EMOFLEET_AUDIO_MIN_SECONDS={self._settings.min_seconds}")
        if len(samples) < MIN_MODEL_SAMPLES:
            samples = np.pad(samples, (0, MIN_MODEL_SAMPLES - len(samples)))
        return Audio(samples=samples, sha256=digest, duration_seconds=duration)

    def close(self) -> None:
        self._fetcher.close()


def decode_audio(data: bytes, max_seconds: float) -> np.ndarray:
    """Any supported container -> float32 mono SAMPLE_RATE samples, all finite, at most max_seconds."""
    if not data:
        raise AudioError("empty", "no bytes")
    if (pcm := _pcm16_wav(data)) is not None:
        samples = _resample(_pcm16_mono(*pcm, max_seconds), pcm[1])  # integer PCM: always finite
    else:
        samples = _decode_with_libsndfile(data, max_seconds)
        _check_finite(samples)
    _check_max_seconds(len(samples) / SAMPLE_RATE, max_seconds)
    return samples


def _decode_with_libsndfile(data: bytes, max_seconds: float) -> np.ndarray:
    with _in_memory_file(data) as file:
        try:
            sound = sf.SoundFile(file, closefd=False)  # the descriptor is ours to close
        except sf.LibsndfileError as exc:
            return _decode_unreadable(data, exc, max_seconds)
        with sound:
            mono, rate = _read_mono(sound, data, max_seconds)
    return _resample(mono, rate)


@contextmanager
def _in_memory_file(data: bytes) -> Iterator[int | io.BytesIO]:
    """``data`` as something libsndfile opens: an in-memory file descriptor where the OS has them (Linux
    memfd), which libsndfile reads with plain syscalls, without the GIL. Over BytesIO every read is a callback
    into Python that takes the GIL, which the inference thread needs. Costs one copy of ``data`` while open."""
    if not hasattr(os, "memfd_create"):
        yield io.BytesIO(data)
        return
    fd = os.memfd_create("emofleet-audio", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def _read_mono(sound: sf.SoundFile, data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    """Channel mean at the native rate, read block by block so only one channel is ever held whole."""
    rate = sound.samplerate
    _check_max_seconds(sound.frames / rate, max_seconds)  # from the header, before decoding anything
    if sound.format in ("WAV", "WAVEX") and _wav_data_truncated(data):
        raise AudioError("corrupt", "WAV data chunk is shorter than its header says (truncated file)")
    block = max(1, _BLOCK_VALUES // sound.channels)
    parts: list[np.ndarray] = []
    total = 0
    try:
        while len(chunk := sound.read(block, dtype="float32", always_2d=True)):
            parts.append(_channel_mean(chunk))
            total += len(chunk)
            _check_max_seconds(total / rate, max_seconds)  # the header may have understated it
    except sf.LibsndfileError as exc:
        raise AudioError("corrupt", f"{sound.format}: {exc.error_string}") from None
    # MPEG frame counts are estimates (and truncated MP3 still plays), so only exact codecs are held to it.
    if total < sound.frames and not sound.subtype.startswith("MPEG"):
        raise AudioError("corrupt", f"{sound.format}: read {total} of {sound.frames} frames (truncated file)")
    mono = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    _check_finite(mono)  # before resampling, which would smear one NaN over its neighbours
    return mono, rate


def _pcm16_wav(data: bytes) -> tuple[np.ndarray, int] | None:
    """The interleaved int16 frames (a view of ``data``, shape (n, channels)) and rate of a complete,
    little-endian, 16-bit integer PCM WAV (format tag 1); None for anything else, which libsndfile decodes
    (and judges: truncated, extensible, other sample formats, RIFX, streamed sizes). The common case then
    costs a view of the bytes and one multiply instead of a libsndfile open and read."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    fmt: tuple[int, ...] | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk == b"fmt " and size >= 16:
            fmt = struct.unpack_from("<HHIIHH", data, pos + 8)  # tag, channels, rate, byte rate, align, bits
        elif chunk == b"data":
            if fmt is None or size in (0, 0xFFFFFFFF) or pos + 8 + size > len(data):
                return None
            tag, channels, rate, _byte_rate, align, bits = fmt
            if tag != 1 or bits != 16 or channels < 1 or rate < 1 or align != 2 * channels:
                return None
            frames = size // align
            pcm = np.frombuffer(data, dtype="<i2", count=frames * channels, offset=pos + 8)
            return pcm.reshape(frames, channels), rate
        pos += 8 + size + (size & 1)
    return None


def _pcm16_mono(frames: np.ndarray, rate: int, max_seconds: float) -> np.ndarray:
    """Channel mean as float32 at the native rate, exactly as libsndfile's float read (x / 32768) and
    :func:`_read_mono` compute it."""
    _check_max_seconds(len(frames) / rate, max_seconds)
    scale = np.float32(1.0 / 32768)
    if frames.shape[1] == 1:
        return np.multiply(frames[:, 0], scale, dtype=np.float32)
    return _channel_mean(np.multiply(frames, scale, dtype=np.float32))


def _channel_mean(frames: np.ndarray) -> np.ndarray:
    """``frames.mean(axis=1, dtype=float32)`` of float32 (n, channels), bit for bit. numpy reduces a
    2-wide axis element by element (~10x slower than two vector ops); for stereo, (left + right) * 0.5 is
    the same float32 sum and the same exact halving."""
    channels = frames.shape[1]
    if channels == 1:
        return frames[:, 0]
    if channels == 2:
        mean = frames[:, 0] + frames[:, 1]
        mean *= np.float32(0.5)
        return mean
    return frames.mean(axis=1, dtype=np.float32)


def _resample(mono: np.ndarray, rate: int) -> np.ndarray:
    """librosa.resample(mono, orig_sr=rate, target_sr=16000) with its defaults, without importing librosa."""
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(mono, dtype=np.float32)
    size = int(np.ceil(mono.shape[0] * (float(SAMPLE_RATE) / rate)))
    out = soxr.resample(mono, rate, SAMPLE_RATE, quality="soxr_hq") if len(mono) else mono
    if len(out) > size:
        out = out[:size]
    elif len(out) < size:
        out = np.pad(out, (0, size - len(out)))
    return np.ascontiguousarray(out, dtype=np.float32)


def _wav_data_truncated(data: bytes) -> bool:
    """libsndfile silently shortens a truncated WAV; compare the data chunk's declared size instead."""
    if data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return False
    order = "<" if data[:4] == b"RIFF" else ">"
    pos = 12
    while pos + 8 <= len(data):
        (size,) = struct.unpack(order + "I", data[pos + 4 : pos + 8])
        if data[pos : pos + 4] == b"data":
            # 0 and 0xFFFFFFFF mean "unknown" (streamed WAVs, e.g. from a pipe).
            return size not in (0, 0xFFFFFFFF) and pos + 8 + size > len(data)
        pos += 8 + size + (size & 1)
    return False


def _decode_unreadable(data: bytes, exc: sf.LibsndfileError, max_seconds: float) -> np.ndarray:
    """What libsndfile cannot open: ffmpeg if present, else a permanent, specific error."""
    container = _sniff_container(data)
    damaged = exc.code != _SF_UNRECOGNISED or container is not None  # a known format that failed
    if ffmpeg := shutil.which("ffmpeg"):
        return _decode_ffmpeg(ffmpeg, data, max_seconds, "corrupt" if damaged else "not_audio")
    if exc.code != _SF_UNRECOGNISED:
        raise AudioError("corrupt", f"libsndfile: {exc.error_string}")
    if container:
        raise AudioError("unsupported_format", f"{container} audio needs ffmpeg, which is not installed")
    raise AudioError("not_audio", "not a recognised audio format")


def _sniff_container(data: bytes) -> str | None:
    for offset, magic, name in _CONTAINERS:
        if data[offset : offset + len(magic)] == magic:
            return name
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xF6 == 0xF0:
        return "AAC (ADTS)"
    return None


def _decode_ffmpeg(ffmpeg: str, data: bytes, max_seconds: float, failure: str) -> np.ndarray:
    # A seekable temp file rather than a pipe: MP4s often keep their index at the end.
    with tempfile.NamedTemporaryFile(prefix="emofleet-audio-") as source:
        source.write(data)
        source.flush()
        command = [
            ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", source.name,
            "-map", "0:a:0", "-t", f"{max_seconds + 1:.3f}",  # bounds the output; the cap is checked after
            "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "pipe:1",
        ]
        try:
            done = subprocess.run(command, capture_output=True, timeout=FFMPEG_TIMEOUT_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            raise AudioError("decode_timeout", f"ffmpeg took over {FFMPEG_TIMEOUT_SECONDS:.0f} s") from None
    detail = done.stderr.decode("utf-8", "replace").strip()
    if done.returncode != 0:
        raise AudioError(failure, f"ffmpeg could not decode it: {detail[-300:]}")
    if detail:  # at -loglevel error, any message means damage (e.g. "File ended prematurely")
        raise AudioError("corrupt", f"ffmpeg: {detail[-300:]}")
    usable = len(done.stdout) - len(done.stdout) % 4
    return np.frombuffer(done.stdout[:usable], dtype="<f4").astype(np.float32)


def _check_finite(samples: np.ndarray) -> None:
    if not np.isfinite(samples).all():
        raise AudioError("non_finite", "audio contains NaN or infinite samples")


def _check_max_seconds(seconds: float, max_seconds: float) -> None:
    if seconds > max_seconds:
        raise AudioError("too_long", f"{seconds:.1f} s is over EMOFLEET_AUDIO_MAX_SECONDS={max_seconds}")


def windows(n_samples: int, window_seconds: float, sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """[start, end) ranges that tile ``range(n_samples)`` in order, without gaps or overlap.

    Windows are ``round(window_seconds * sample_rate)`` samples long; a clip that fits is one window.
    The last, shorter remainder becomes its own window unless it is under ``MERGE_FRACTION`` (1/4) of
    a window, in which case it joins the previous one (so no window is longer than 1.25 windows, and
    none but a lone window is shorter than 1/4 window). ``n_samples == 0`` gives ``[]``.
    """
    size = round(window_seconds * sample_rate)
    if n_samples < 0 or size < 1:
        raise ValueError(f"need n_samples >= 0 and a window of at least one sample, got {n_samples}, {window_seconds} s")
    bounds = [(start, min(start + size, n_samples)) for start in range(0, n_samples, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < size * MERGE_FRACTION:
        bounds[-2:] = [(bounds[-2][0], n_samples)]
    return bounds
