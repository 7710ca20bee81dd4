"""The simulated accelerator (processors/simulated_model.py): valid, deterministic scores after the modelled time."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from emofleet.core.config import ModelSettings, Settings, from_env
from emofleet.core.metrics import Metrics
from emofleet.processors.audio import Audio
from emofleet.processors.model import ModelLoadError, load_model
from emofleet.processors.simulated_model import EMBEDDING_DIM, SimulatedDevice, parse_simulated
from emofleet.processors.stages import Infer, Scored
from emofleet.schemas.emotions import EMOTIONS, SAMPLE_RATE

from pipeline_helpers import create_topics, enqueue_uris, outcomes, running_processor, sample_uris


def _clips(*seconds: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.5, 0.5, int(s * SAMPLE_RATE)).astype(np.float32) for s in seconds]


def test_the_spec_names_the_modelled_device_and_bad_specs_say_how_to_write_it() -> None:
    assert parse_simulated("simulated:5000") == SimulatedDevice(5000.0, 0.0)
    assert parse_simulated("simulated:2500.5,3") == SimulatedDevice(2500.5, 3.0)
    assert math.isinf(parse_simulated("simulated:inf").audio_seconds_per_second)
    for bad in ("simulated:", "simulated:fast", "simulated:0", "simulated:-5", "simulated:100,-1",
                "simulated:100,inf", "simulated:nan", "simulated:1,2,3"):
        with pytest.raises(ModelLoadError, match="simulated:<audio seconds per second>"):
            load_model(ModelSettings(model=bad))


def test_loaded_through_the_model_setting_and_marked_simulated_in_every_identity_field() -> None:
    model = load_model(ModelSettings(model="simulated:5000,2"))
    assert (model.model_id, model.revision, model.device) == ("simulated:5000,2", "simulated", "simulated")
    assert load_model(ModelSettings(model="simulated:inf")).model_id == "simulated:inf,0"
    assert from_env({"EMOFLEET_MODEL_MODEL": "simulated:5000"}).model.model == "simulated:5000"


def test_scores_are_valid_and_deterministic_per_waveform() -> None:
    model = load_model(ModelSettings(model="simulated:inf"))
    clips = _clips(1.0, 2.5, 0.5, 1.0, seed=1)
    first = model.predict(clips)
    again = model.predict([c.copy() for c in clips])
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.scores, b.scores)
    assert len({p.scores.tobytes() for p in first}) == len(clips), "different audio, different scores"
    for prediction in first:
        assert prediction.scores.dtype == np.float32 and prediction.scores.shape == (len(EMOTIONS),)
        assert abs(float(prediction.scores.sum()) - 1) < 1e-5 and (prediction.scores > 0).all()
        assert prediction.label == EMOTIONS[int(prediction.scores.argmax())]
        assert prediction.confidence == float(prediction.scores.max())
        assert prediction.embedding is None and prediction.frame_scores is None
    labels = {p.label for p in model.predict(_clips(*[0.5] * 60, seed=2))}
    assert len(labels) >= 4, "scores spread over the labels, not one constant answer"


def test_frame_granularity_and_embeddings_have_the_real_models_shapes() -> None:
    model = load_model(ModelSettings(model="simulated:inf"))
    (clip,) = _clips(2.0, seed=3)
    (prediction,) = model.predict([clip], granularity="frame", embeddings=True)
    assert prediction.frame_scores is not None and prediction.embedding is not None
    assert prediction.frame_scores.shape == (model.frames(len(clip)), len(EMOTIONS)) == (99, 9)
    np.testing.assert_allclose(prediction.frame_scores.sum(axis=1), 1.0, atol=1e-5)
    assert prediction.embedding.shape == (EMBEDDING_DIM,)
    (same,) = model.predict([clip], granularity="frame", embeddings=True)
    np.testing.assert_array_equal(same.embedding, prediction.embedding)
    with pytest.raises(ValueError, match="shorter than the model's minimum"):
        model.predict([np.zeros(100, np.float32)])


def test_a_forward_takes_the_modelled_time_without_using_the_cpu() -> None:
    model = load_model(ModelSettings(model="simulated:20,50"))  # 20 audio-s/s, 50 ms per forward
    clips = _clips(2.0, 1.0, 1.0)  # 4 s of audio: 4 / 20 + 0.05 = 0.25 s
    expected = 0.25
    cpu_started, started = time.process_time(), time.monotonic()
    model.predict(clips)
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
    assert expected <= elapsed < expected + 0.1, elapsed
    assert cpu < 0.5 * expected, f"{cpu:.3f} s of CPU: the wait must sleep (release the GIL), not spin"
    started = time.monotonic()
    load_model(ModelSettings(model="simulated:inf")).predict(clips)
    assert time.monotonic() - started < 0.05, "an infinitely fast device does not wait"


def test_the_infer_stage_runs_it_windowed_like_the_real_model(settings: Settings) -> None:
    model = load_model(ModelSettings(model="simulated:inf"))
    infer = Infer(model, settings.model, replace(settings.audio, window_seconds=1.0), settings.batch,
                  Metrics("processor"))
    (long_clip, short_clip) = _clips(2.2, 0.7, seed=4)
    audios = {"long": Audio(long_clip, "long", 2.2), "short": Audio(short_clip, "short", 0.7)}
    results = {sha: result for outcome in infer.run(audios) if isinstance(outcome, Scored)
               for sha, result in outcome.results.items()}
    assert [len(results[s].predictions) for s in ("long", "short")] == [2, 1]  # 1 s + 1.2 s (the 0.2 s rest merges), 0.7 s


def test_the_processor_runs_on_it_end_to_end_and_its_events_say_simulated(settings: Settings, tmp_path: Path,
                                                                         redis_client) -> None:
    settings = replace(settings, model=replace(settings.model, model="simulated:2000,1"))
    create_topics(settings)
    uris = sample_uris(tmp_path / "clips", 12, min_seconds=0.5, max_seconds=3)
    references = enqueue_uris(settings, uris, tenant="bench", source="simulated")

    with running_processor(settings):  # no model passed: the setting selects the simulated one
        events, dead = outcomes(settings, len(references))

    assert dead == []
    assert sorted(e["audio_id"] for e in events) == sorted(r["audio_id"] for r in references)
    assert {(e["model_id"], e["model_revision"]) for e in events} == {("simulated:2000,1", "simulated")}
    assert all(abs(sum(e["scores"].values()) - 1) < 1e-4 for e in events)
