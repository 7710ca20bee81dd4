"""The inference step's stages (processors/stages.py), each on its own: no broker, no consumer loop.

Redis and the tiny model are real; the only stand-in is a producer that hands delivery callbacks back when
polled (the settling logic is the point there; the end-to-end tests use the real broker).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from emofleet.core.config import BatchSettings, Settings
from emofleet.core.metrics import Metrics
from emofleet.processors.audio import Audio, AudioError, AudioLoader
from emofleet.processors.cache import ResultCache
from emofleet.processors.events import ClipResult, ModelIdentity
from emofleet.processors.prediction import Prediction
from emofleet.processors.stages import (
    Claimed, Dedupe, Emit, ForwardFailed, Gather, Infer, Item, Prepare, Scored, Settle, by_content,
)
from emofleet.samples import synth_clip
from emofleet.schemas.codec import make_codec
from emofleet.schemas.emotions import SAMPLE_RATE
from emofleet.streams.dead_letters import Failure
from emofleet.streams.references import make_reference

from metrics_helpers import metric

TP = ("audio", 0)


def _item(offset: int = 0, *, seconds: float = 1.0, sha: str | None = None, tp: tuple[str, int] = TP,
          value: bytes = b"") -> Item:
    item = Item(tp, offset, b"k", value, [], time.monotonic())
    if seconds:
        samples = np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)
        item.audio = Audio(samples, sha or f"sha-{tp[1]}-{offset}", seconds)
    return item


def _prediction(seed: int = 0) -> Prediction:
    scores = np.random.default_rng(seed).dirichlet(np.ones(9)).astype(np.float32)
    return Prediction(scores, "neutral", float(scores.max()), None, None)


class Reports:
    """The loop's Reporter: records every report."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, int], int, bool]] = []

    def __call__(self, tp: tuple[str, int], offset: int, *, finished: bool) -> None:
        self.calls.append((tp, offset, finished))


# ------------------------------------------------------------------------------------------- prepare


def _wav(path: Path, seconds: float, seed: int = 1) -> str:
    sf.write(path, synth_clip(seconds, seed), SAMPLE_RATE)
    return path.as_uri()


def test_prepare_decodes_and_loads_or_names_the_failure(settings: Settings, tmp_path: Path) -> None:
    codec, metrics, closing = make_codec(), Metrics("processor"), threading.Event()
    loader = AudioLoader(settings.audio)
    prepare = Prepare(codec, loader, metrics, closing)

    def message(uri: str) -> Item:
        return _item(seconds=0, value=codec.encode("audio_reference", make_reference({"uri": uri}), topic="audio"))

    good = message(_wav(tmp_path / "good.wav", 1.5))
    assert prepare(good) is good
    assert good.reference is not None and good.audio is not None and abs(good.seconds - 1.5) < 1e-3

    missing = prepare(message((tmp_path / "missing.wav").as_uri()))
    assert isinstance(missing, Failure) and (missing.reason, missing.stage) == ("not_found", "audio")
    outside = prepare(message("file:///etc/hostname"))
    assert isinstance(outside, Failure) and outside.reason == "root_not_allowed"
    garbage = prepare(_item(seconds=0, value=b"\x00\x01garbage"))
    assert isinstance(garbage, Failure) and (garbage.reason, garbage.stage) == ("malformed", "decode")
    loader.close()


class FlakyLoader:
    def __init__(self, failures: int, audio: Audio) -> None:
        self.failures, self.calls, self._audio = failures, 0, audio

    def load(self, uri: str) -> Audio:
        self.calls += 1
        if self.calls <= self.failures:
            raise AudioError("unavailable", "injected: try again", permanent=False)
        return self._audio


def test_prepare_retries_transient_errors_and_stops_at_the_attempt_limit(settings: Settings) -> None:
    codec, metrics = make_codec(), Metrics("processor")
    audio = _item().audio
    value = codec.encode("audio_reference", make_reference({"uri": "file:///x.wav"}), topic="audio")

    loader = FlakyLoader(2, audio)  # type: ignore[arg-type]
    item = _item(seconds=0, value=value)
    assert Prepare(codec, loader, metrics, threading.Event(), backoff=0.01)(item) is item  # type: ignore[arg-type]
    assert loader.calls == 3 and item.audio is audio
    assert metric(metrics, "emofleet_fetch_retries_total") == 2

    loader = FlakyLoader(5, audio)  # type: ignore[arg-type]
    failure = Prepare(codec, loader, metrics, threading.Event(), backoff=0.01)(_item(seconds=0, value=value))  # type: ignore[arg-type]
    assert isinstance(failure, Failure) and (failure.reason, failure.attempts) == ("unavailable", 3)

    closing = threading.Event()
    closing.set()  # shutting down: a transient error is no verdict, the message is dropped
    assert Prepare(codec, FlakyLoader(5, audio), metrics, closing)(_item(seconds=0, value=value)) is None  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- gather


def _timed_batch(gather: Gather) -> tuple[list[Item] | None, float]:
    started = time.monotonic()
    batch = gather.next_batch()
    return batch, time.monotonic() - started


def test_gather_cuts_batches_by_count_and_audio_seconds() -> None:
    gather = Gather(BatchSettings(max_clips=3, max_audio_seconds=10.0, max_wait_ms=5_000), threading.Event())
    items = [_item(i, seconds=1.0) for i in range(5)]
    for item in items:
        gather.put(item)
    batch, took = _timed_batch(gather)
    assert batch == items[:3] and took < 1.0, "a full batch does not wait"

    gather = Gather(BatchSettings(max_clips=10, max_audio_seconds=5.0, max_wait_ms=5_000), threading.Event())
    items = [_item(i, seconds=3.0) for i in range(3)]
    for item in items:
        gather.put(item)
    batch, took = _timed_batch(gather)
    assert batch == items[:2] and took < 1.0, "cut once the audio seconds are reached"
    assert gather.ready_seconds == 3.0


def test_gather_waits_at_most_max_wait_from_the_oldest_clip() -> None:
    gather = Gather(BatchSettings(max_clips=10, max_audio_seconds=100.0, max_wait_ms=200), threading.Event())
    item = _item()
    gather.put(item)
    batch, took = _timed_batch(gather)
    assert batch == [item] and 0.15 <= took < 1.0

    old = _item(1)
    gather.put(old)
    time.sleep(0.3)  # waited through a forward already
    batch, took = _timed_batch(gather)
    assert batch == [old] and took < 0.1


def test_gather_bounds_the_ready_queue_by_audio_seconds() -> None:
    closing = threading.Event()
    gather = Gather(BatchSettings(max_clips=1, max_audio_seconds=1.0, max_wait_ms=0), closing)
    assert gather.ready_limit == 4.0
    for i in range(5):
        gather.put(_item(i, seconds=1.0))  # 5 s > 4 s: the next put blocks
    blocked = threading.Thread(target=gather.put, args=(_item(9, seconds=1.0),), daemon=True)
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "a full queue holds its producers back"
    assert gather.next_batch() is not None
    blocked.join(2)
    assert not blocked.is_alive() and gather.ready_seconds == 5.0


def test_a_producer_blocked_on_a_full_queue_is_refused_when_the_step_stops() -> None:
    """Found by bench/fleet_scaling.py: a prepare thread waiting for room queued its clip after the step's join had
    drained the queue, and the join then waited its whole grace for a message nobody would process."""
    closing = threading.Event()
    gather = Gather(BatchSettings(max_clips=1, max_audio_seconds=1.0, max_wait_ms=0), closing)
    for i in range(5):
        assert gather.put(_item(i, seconds=1.0))
    outcome: list[bool] = []
    blocked = threading.Thread(target=lambda: outcome.append(gather.put(_item(9, seconds=1.0))), daemon=True)
    blocked.start()
    closing.set()
    gather.wake()
    blocked.join(2)
    assert outcome == [False] and len(gather.drain()) == 5


def test_gather_revoke_deferral_and_close() -> None:
    closing = threading.Event()
    gather = Gather(BatchSettings(max_clips=10, max_audio_seconds=100.0, max_wait_ms=50), closing)
    kept, gone = _item(0, tp=("audio", 0)), _item(0, tp=("audio", 1))
    deferred_gone = _item(1, tp=("audio", 1))
    deferred_gone.retry_at = time.monotonic() + 60
    gather.put(kept)
    gather.put(gone)
    gather.defer([deferred_gone])
    assert set(gather.revoke({("audio", 1)})) == {gone, deferred_gone}
    assert gather.next_batch() == [kept] and gather.ready_seconds == 0

    due = _item(2)
    due.retry_at = time.monotonic() + 0.1
    gather.defer([due])
    batch, took = _timed_batch(gather)
    assert batch == [due] and took < 1.0, "a deferred clip comes back once due"

    late = _item(3)
    gather.put(late)
    closing.set()
    assert gather.next_batch() is None
    assert gather.drain() == [late]


# ------------------------------------------------------------------------------------------- dedupe


def test_dedupe_looks_up_claims_and_defers_against_redis(settings: Settings, redis_client) -> None:
    cache_settings = replace(settings.cache, claim_seconds=30)
    ours = ResultCache(cache_settings, "ns", "member-a")
    theirs = ResultCache(cache_settings, "ns", "member-b")
    dedupe = Dedupe(ours, cache_settings.claim_seconds, defer_seconds=0.25)
    stored = ClipResult(((0.0, 1.0),), (_prediction(),))
    theirs.put_many({"hit": stored.to_bytes()})
    assert theirs.claim_many(["busy"]) == set()

    items = [_item(0, sha="hit"), _item(1, sha="hit"), _item(2, sha="busy"), _item(3, sha="free")]
    hits, misses = dedupe.lookup(by_content(items))
    assert [(group, result.windows) for group, result in hits] == [(items[:2], stored.windows)]
    assert np.allclose(hits[0][1].predictions[0].scores, stored.predictions[0].scores)
    assert set(misses) == {"busy", "free"}

    now = time.monotonic()
    claimed = dedupe.claim(misses, now=now)
    assert claimed == Claimed({"free": [items[3]]}, [items[2]])
    assert redis_client.get(ours.claim_key("free")) == b"member-a"
    assert items[2].retry_at == now + 0.25 and items[2].claim_deadline == now + 30

    dedupe.schedule([items[2]], now + 31)  # their claim outlived claim_seconds: release it, compute it
    assert redis_client.get(ours.claim_key("busy")) is None
    assert dedupe.claim({"busy": [items[2]]}).compute == {"busy": [items[2]]}

    dedupe.store({"free": stored})
    assert redis_client.get(ours.claim_key("free")) is None
    assert dedupe.lookup({"free": [items[3]]})[0][0][0] == [items[3]]
    ours.close()
    theirs.close()


# ------------------------------------------------------------------------------------------- infer


def _audio(seconds: float, seed: int) -> Audio:
    return Audio(synth_clip(seconds, seed).astype(np.float32), f"sha-{seed}", seconds)


def test_infer_gives_each_clip_its_exact_result_as_soon_as_it_is_scored(settings: Settings, tiny_model) -> None:
    metrics = Metrics("processor")
    limits = replace(settings.batch, max_clips=2)
    infer = Infer(tiny_model, settings.model, settings.audio, limits, metrics)
    audios = {a.sha256: a for a in (_audio(1.0, 1), _audio(2.5, 2), _audio(70.0, 3))}

    outcomes = list(infer.run(audios))
    assert all(isinstance(o, Scored) for o in outcomes) and len(outcomes) >= 2
    results = {sha: r for o in outcomes for sha, r in o.results.items()}  # type: ignore[union-attr]
    assert set(results) == set(audios) and sum(len(o.results) for o in outcomes) == 3  # type: ignore[union-attr]
    assert results["sha-3"].windows == ((0.0, 30.0), (30.0, 60.0), (60.0, 70.0))
    for sha in ("sha-1", "sha-2"):
        alone = tiny_model.predict([audios[sha].samples], granularity=settings.model.granularity,
                                   embeddings=settings.model.embeddings)[0]
        assert np.allclose(results[sha].predictions[0].scores, alone.scores, atol=1e-5)
    assert metric(metrics, "emofleet_model_batch_windows_sum") == 5


def test_infer_reports_a_failed_forward_for_its_clips_only(settings: Settings, tiny_model) -> None:
    class Broken(Infer):
        def predict(self, clips: list[np.ndarray]) -> list[Prediction]:
            if any(len(c) > 2 * SAMPLE_RATE for c in clips):
                raise RuntimeError("injected: out of memory")
            return super().predict(clips)

    metrics = Metrics("processor")
    infer = Broken(tiny_model, settings.model, settings.audio, replace(settings.batch, max_clips=1), metrics)
    outcomes = list(infer.run({a.sha256: a for a in (_audio(1.0, 1), _audio(3.0, 2))}))
    assert isinstance(outcomes[0], Scored) and list(outcomes[0].results) == ["sha-1"]
    assert isinstance(outcomes[1], ForwardFailed) and outcomes[1].shas == ["sha-2"]
    assert metric(metrics, "emofleet_errors_total", kind="model") == 1


# ------------------------------------------------------------------------------------------- emit


class Delivered:
    """A message as the delivery callback sees it."""

    def __init__(self, topic: str) -> None:
        self._topic = topic

    def topic(self) -> str:
        return self._topic


class KafkaError:
    def str(self) -> str:
        return "injected: delivery timed out"


class ProducerStandIn:
    """Keeps what is produced; ``deliver`` runs the delivery callbacks, as poll() would."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, bytes | None, bytes, Any]] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, *,
                on_delivery: Any) -> None:
        self.pending.append((topic, key, value, on_delivery))  # type: ignore[arg-type]

    def deliver(self, count: int | None = None, *, error: Any = None) -> None:
        taken, self.pending = self.pending[:count], self.pending[len(self.pending[:count]):]
        for topic, _key, _value, callback in taken:
            callback(error, None if error else Delivered(topic))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return len(self.pending)

    def __len__(self) -> int:
        return len(self.pending)


def _emit(settings: Settings) -> tuple[Emit, ProducerStandIn, Reports, Settle, Metrics]:
    producer, reports, metrics = ProducerStandIn(), Reports(), Metrics("processor")
    settle = Settle(reports)
    identity = ModelIdentity("tiny", "r1", settings.model.granularity, settings.model.embeddings)
    emit = Emit(settings.kafka, make_codec(), producer, identity, settle, metrics, processor_id="p1")
    return emit, producer, reports, settle, metrics


def _referenced(offset: int, seconds: float = 70.0) -> Item:
    item = _item(offset, seconds=seconds)
    item.reference = make_reference({"uri": f"file:///clip-{offset}.wav"})
    return item


def test_emit_settles_a_message_once_all_its_outputs_are_delivered(settings: Settings) -> None:
    emit, producer, reports, settle, metrics = _emit(settings)
    item = _referenced(7)
    settle.opened(item)
    windows = ((0.0, 30.0), (30.0, 60.0), (60.0, 70.0))
    emit.results([item], ClipResult(windows, tuple(_prediction(i) for i in range(3))), cache_hit=False)
    assert len(producer.pending) == 4 and item.audio is None, "an event per window plus the whole clip"
    producer.deliver(3)
    assert reports.calls == [] and item.outputs_pending == 1
    producer.deliver()
    assert reports.calls == [(TP, 7, True)]
    settle.drop([item])  # a late drop (close, revoke) must not report it again
    assert reports.calls == [(TP, 7, True)] and len(settle) == 0
    assert metric(metrics, "emofleet_messages_out_total", topic=settings.kafka.results_topic) == 4


def test_emit_dead_letters_and_a_failed_delivery_keeps_the_message_open(settings: Settings) -> None:
    emit, producer, reports, settle, metrics = _emit(settings)
    failed, lost = _referenced(1), _referenced(2, seconds=1.0)
    for item in (failed, lost):
        settle.opened(item)
    emit.dead_letter(failed, Failure("not_found", "audio", "AudioError", "no such file"))
    assert [p[0] for p in producer.pending] == [settings.kafka.dead_letter_topic]
    producer.deliver()
    assert reports.calls == [(TP, 1, True)]
    assert metric(metrics, "emofleet_dead_letters_total", reason="not_found", stage="audio") == 1

    emit.results([lost], ClipResult(((0.0, 1.0),), (_prediction(),)), cache_hit=True)
    producer.deliver(error=KafkaError())
    assert emit.failure is not None and "delivery to Kafka failed" in str(emit.failure)
    assert reports.calls == [(TP, 1, True)], "never reported finished: the loop must not commit past it"
    assert settle.without_outputs() == [], "outputs were produced: close does not drop it either"


def test_settle_reports_each_message_exactly_once() -> None:
    reports = Reports()
    settle = Settle(reports)
    items = [_item(i) for i in range(3)]
    for item in items:
        settle.opened(item)
    settle.drop(items[:1])
    settle.drop(items[:1])
    settle.settle(items[1], finished=True)
    settle.settle(items[1], finished=False)
    assert settle.without_outputs() == [items[2]]
    settle.drop(settle.without_outputs())
    assert reports.calls == [(TP, 0, False), (TP, 1, True), (TP, 2, False)]
