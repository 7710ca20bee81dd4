"""The data path's fast paths give exactly what the general paths give (bench/feed_path.py measures them)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from emofleet.core.config import AudioSettings
from emofleet.processors.audio import AudioError, AudioLoader, decode_audio


def _libsndfile_decode(data: bytes) -> np.ndarray:
    """The general path: libsndfile reads the bytes, channels averaged, resampled as decode_audio does."""
    from emofleet.processors.audio import _read_mono, _resample

    with sf.SoundFile(io.BytesIO(data)) as sound:
        mono, rate = _read_mono(sound, data, 1e9)
    return _resample(mono, rate)


def _wav(frames: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, frames, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


@pytest.mark.parametrize(("rate", "channels"), [(16_000, 1), (44_100, 2), (8_000, 1), (48_000, 6)])
def test_pcm16_wav_decodes_bit_identically_to_libsndfile(rate: int, channels: int) -> None:
    frames = np.random.default_rng(rate).integers(-32768, 32768, (rate // 2, channels), dtype=np.int16)
    frames[:3] = [[-32768], [32767], [0]]  # the extremes
    data = _wav(frames, rate)
    np.testing.assert_array_equal(decode_audio(data, 60.0), _libsndfile_decode(data))


def test_other_wavs_still_go_through_libsndfile_and_keep_its_verdicts() -> None:
    frames = np.random.default_rng(1).uniform(-0.5, 0.5, (8000, 2)).astype(np.float32)
    for subtype in ("PCM_24", "FLOAT", "PCM_U8"):
        data = _wav(frames, 16_000, subtype)
        np.testing.assert_array_equal(decode_audio(data, 60.0), _libsndfile_decode(data))
    truncated = _wav((frames * 30000).astype(np.int16), 16_000)[:-1000]
    with pytest.raises(AudioError, match="corrupt"):
        decode_audio(truncated, 60.0)
    with pytest.raises(AudioError, match="too_long"):
        decode_audio(_wav((frames * 30000).astype(np.int16), 16_000), 0.4)  # 0.5 s


def test_a_file_read_is_sized_by_the_file_and_still_capped(tmp_path: Path) -> None:
    path = tmp_path / "clip.wav"
    data = _wav(np.zeros((16_000, 1), np.int16), 16_000)
    path.write_bytes(data)
    loader = AudioLoader(AudioSettings(file_roots=(tmp_path,), max_bytes=len(data)))
    assert loader.fetch(path.as_uri()) == data
    path.write_bytes(data + b"\0")
    with pytest.raises(AudioError, match="too_large"):
        loader.fetch(path.as_uri())
    loader.close()


def test_a_file_that_grows_after_fstat_is_read_on_up_to_the_cap(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer appending between fstat and read cannot be timed from a test: fstat reports the older size."""
    path = tmp_path / "growing.bin"
    path.write_bytes(b"x" * 1000)
    loader = AudioLoader(AudioSettings(file_roots=(tmp_path,), max_bytes=5000))
    real_fstat = os.fstat

    def before_the_append(fd: int) -> os.stat_result:
        values = list(real_fstat(fd))
        values[6] = 500  # st_size
        return os.stat_result(values)

    monkeypatch.setattr(os, "fstat", before_the_append)
    try:
        assert len(loader.fetch(path.as_uri())) == 1000
        path.write_bytes(b"x" * 6000)
        with pytest.raises(AudioError, match="too_large"):
            loader.fetch(path.as_uri())
    finally:
        loader.close()


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_the_channel_mean_is_numpys_float32_mean_bit_for_bit(channels: int) -> None:
    from emofleet.processors.audio import _channel_mean

    frames = np.random.default_rng(channels).uniform(-1, 1, (50_000, channels)).astype(np.float32)
    frames[:4] = [[1e-39] * channels, [-1.0] * channels, [1e38] * channels, [0.0] * channels]
    np.testing.assert_array_equal(_channel_mean(frames), frames.mean(axis=1, dtype=np.float32))


def test_stereo_compressed_audio_decodes_as_the_channel_mean() -> None:
    stereo = np.random.default_rng(5).uniform(-0.5, 0.5, (48_000, 2)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, stereo, 48_000, format="FLAC", subtype="PCM_16")
    data = buffer.getvalue()
    decoded, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    from emofleet.processors.audio import _resample

    np.testing.assert_array_equal(decode_audio(data, 60.0), _resample(decoded.mean(axis=1, dtype=np.float32), 48_000))
