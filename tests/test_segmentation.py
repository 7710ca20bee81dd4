"""Voice-activity segmentation: the pure rules on made-up probabilities, and Silero VAD on real speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emofleet.processors.segmentation import FRAME_SAMPLES, UtteranceRules, VoiceActivity, speech_regions
from emofleet.schemas.emotions import SAMPLE_RATE

from speech_fixtures import PHRASES, build_call, speak

FPS = SAMPLE_RATE / FRAME_SAMPLES  # frames per second
LOOSE = UtteranceRules(min_seconds=0.1, max_seconds=30.0, padding_seconds=0.0, merge_gap_seconds=0.0)


def probs(*spans: tuple[float, float, float], seconds: float) -> np.ndarray:
    """Frame probabilities: 0 everywhere, ``p`` over each (start s, end s, p)."""
    out = np.zeros(round(seconds * FPS), dtype=np.float32)
    for start, end, p in spans:
        out[round(start * FPS):round(end * FPS)] = p
    return out


def seconds(regions: list[tuple[int, int]]) -> list[tuple[float, float]]:
    return [(round(s / SAMPLE_RATE, 2), round(e / SAMPLE_RATE, 2)) for s, e in regions]


def test_speech_becomes_regions_and_silence_none() -> None:
    n = 10 * SAMPLE_RATE
    assert speech_regions(probs(seconds=10), n, LOOSE) == []
    found = seconds(speech_regions(probs((1, 3, 0.9), (6, 8, 0.9), seconds=10), n, LOOSE))
    assert found == [(pytest.approx(1, abs=0.04), pytest.approx(3, abs=0.04)),
                     (pytest.approx(6, abs=0.04), pytest.approx(8, abs=0.04))]


def test_hysteresis_keeps_a_dip_inside_speech() -> None:
    dip = probs((1, 3, 0.9), (2, 2.2, 0.4), seconds=5)  # 0.4 >= 0.5 - 0.15: still speech
    assert len(speech_regions(dip, 5 * SAMPLE_RATE, LOOSE)) == 1
    gap = probs((1, 3, 0.9), (2, 2.2, 0.2), seconds=5)
    assert len(speech_regions(gap, 5 * SAMPLE_RATE, LOOSE)) == 2


def test_short_gaps_merge_short_blips_drop_and_padding_stays_in_silence() -> None:
    rules = UtteranceRules(min_seconds=0.4, max_seconds=30, padding_seconds=0.2, merge_gap_seconds=0.3)
    p = probs((1, 2, 0.9), (2.2, 3, 0.9), (5, 5.1, 0.9), (6, 7, 0.9), seconds=7.1)
    found = seconds(speech_regions(p, round(7.1 * SAMPLE_RATE), rules))
    assert len(found) == 2, "the 0.2 s gap merged, the 0.1 s blip dropped"
    assert found[0] == (pytest.approx(0.8, abs=0.04), pytest.approx(3.2, abs=0.04))
    assert found[1][1] == pytest.approx(7.1, abs=0.01), "padding stops at the end of the clip"


def test_a_long_region_is_split_at_its_quietest_point() -> None:
    rules = UtteranceRules(min_seconds=0.5, max_seconds=10, padding_seconds=0, merge_gap_seconds=0)
    p = probs((0, 25, 0.95), (7, 7.1, 0.6), (16, 16.1, 0.55), seconds=25)
    found = seconds(speech_regions(p, 25 * SAMPLE_RATE, rules))
    assert [round(s) for s, _ in found] == [0, 7, 16]
    assert all(e - s <= 10 for s, e in found) and found[-1][1] == pytest.approx(25, abs=0.04)


@pytest.mark.parametrize("bad", [dict(threshold=0), dict(threshold=1.2), dict(min_seconds=20, max_seconds=10),
                                 dict(padding_seconds=-1)])
def test_absurd_rules_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        UtteranceRules(**bad)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    cache: Path = tmp_path_factory.mktemp("speech")
    return [speak(text, cache) for text in PHRASES]


def test_silero_finds_real_utterances_within_a_quarter_second(speech: list[np.ndarray]) -> None:
    rng = np.random.default_rng(7)
    vad = VoiceActivity()
    rules = UtteranceRules(padding_seconds=0.0)  # the boundaries VAD finds, before the padding the product adds
    hits = total = 0
    for seed in range(3):
        gaps = list(rng.uniform(0.8, 3.0, len(speech) + 1))
        call = build_call(speech, gaps, seed=seed)
        found = seconds(vad.utterances(call.samples, rules))
        assert len(found) == len(call.truth), (found, call.truth)
        for (start, end), (true_start, true_end) in zip(found, call.truth, strict=True):
            total += 1
            hits += abs(start - true_start) <= 0.25 and abs(end - true_end) <= 0.25
    assert hits / total >= 0.95


def test_silence_and_noise_have_no_speech() -> None:
    rng = np.random.default_rng(1)
    vad = VoiceActivity()
    assert vad.utterances(np.zeros(5 * SAMPLE_RATE, np.float32), UtteranceRules()) == []
    noise = (rng.standard_normal(5 * SAMPLE_RATE) * 0.01).astype(np.float32)
    assert vad.utterances(noise, UtteranceRules()) == []
