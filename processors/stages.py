"""The stages of the inference step, one job each. ``processors/step.py`` composes them.

Every stage is usable on its own, without a broker or a consumer loop (``tests/test_stages.py``):

- :class:`Prepare`  -- Avro decode + fetch/decode audio with retries: an :class:`Item` -> its reference and
  :class:`Audio` filled in, a :class:`Failure` (dead letter), or ``None`` (cut short by shutdown: drop).
- :class:`Gather`   -- the bounded ready queue (audio seconds) and deferred clips -> micro-batches by count,
  audio seconds and max wait.
- :class:`Dedupe`   -- cache lookup (one MGET) -> hits; claims -> clips to compute and clips another member is
  computing (deferred until its result lands or its claim expires).
- :class:`Infer`    -- plan (``batch_plan.py``) + forward over every window -> a :class:`ClipResult` per clip as
  soon as its last window is scored, or the model's error for the clips of a failed forward.
- :class:`Emit`     -- events and dead letters onto Kafka; each delivery callback counts down its message's
  outputs, and the last one settles the message through :class:`Settle`.
- :class:`Settle`   -- reports each submitted message to the loop's Reporter exactly once (finished / dropped).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from emofleet.core.config import AudioSettings, BatchSettings, KafkaSettings, ModelSettings
from emofleet.core.logs import add_log_context
from emofleet.core.metrics import Metrics
from emofleet.processors.audio import Audio, AudioError, AudioLoader, windows
from emofleet.processors.batch_plan import plan_batches
from emofleet.processors.cache import ResultCache
from emofleet.processors.events import ClipResult, ModelIdentity, emotion_events
from emofleet.processors.model import EmotionModel, Prediction
from emofleet.schemas.codec import Codec, SchemaError
from emofleet.schemas.emotions import SAMPLE_RATE
from emofleet.streams.consumer import Reporter
from emofleet.streams.dead_letters import Failure, Lineage, dead_letter
from emofleet.streams.offsets import TopicPartition

log = logging.getLogger(__name__)

FETCH_ATTEMPTS = 3
DEFER_SECONDS = 0.25


@dataclass(eq=False)
class Item:
    """One consumed message on its way through the stages."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes | None]]
    received: float
    reference: dict[str, Any] | None = None
    audio: Audio | None = None
    outputs_pending: int = 0
    retry_at: float = 0.0
    claim_deadline: float = 0.0
    ready_at: float = 0.0

    @property
    def lineage(self) -> Lineage:
        return Lineage(self.tp[0], self.tp[1], self.offset)

    @property
    def seconds(self) -> float:
        return self.audio.duration_seconds if self.audio else 0.0


# ---------------------------------------------------------------------------------------------- settle


class Settle:
    """The set of open (submitted, unreported) messages; reports each one exactly once. Thread-safe."""

    def __init__(self, report: Reporter) -> None:
        self._report = report
        self._open: set[Item] = set()
        self._lock = threading.Lock()
        self._emptied = threading.Condition(self._lock)

    def opened(self, item: Item) -> None:
        with self._lock:
            self._open.add(item)

    def outputs(self, item: Item, count: int) -> None:
        with self._lock:
            item.outputs_pending = count

    def output_delivered(self, item: Item) -> None:
        """One output of ``item`` is delivered; the last one settles it finished."""
        with self._lock:
            item.outputs_pending -= 1
            done = item.outputs_pending == 0
        if done:
            self.settle(item, finished=True)

    def settle(self, item: Item, *, finished: bool) -> None:
        with self._lock:
            if item not in self._open:
                return
            self._open.discard(item)
            if not self._open:
                self._emptied.notify_all()
        self._report(item.tp, item.offset, finished=finished)

    def wait_empty(self, timeout: float) -> bool:
        """Wait until every open message is reported; False when ``timeout`` ran out first."""
        with self._emptied:
            return self._emptied.wait_for(lambda: not self._open, timeout)

    def drop(self, items: Iterable[Item]) -> None:
        for item in items:
            self.settle(item, finished=False)

    def without_outputs(self) -> list[Item]:
        """Open messages none of whose outputs were produced (queued, deferred, preparing)."""
        with self._lock:
            return [i for i in self._open if i.outputs_pending == 0]

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)


# ---------------------------------------------------------------------------------------------- prepare


class Prepare:
    """Avro decode and fetch/decode the audio, retrying transient errors with backoff. Thread-safe."""

    def __init__(self, codec: Codec, loader: AudioLoader, metrics: Metrics, closing: threading.Event, *,
                 attempts: int = FETCH_ATTEMPTS, backoff: float = 0.5) -> None:
        self._codec = codec
        self._loader = loader
        self._metrics = metrics
        self._closing = closing
        self._attempts = attempts
        self._backoff = backoff

    def __call__(self, item: Item) -> Item | Failure | None:
        """``item`` with reference and audio, a failure for its dead letter, or None: drop (shutting down)."""
        try:
            item.reference = self._codec.decode("audio_reference", item.value, topic=item.tp[0])
        except SchemaError as error:
            return Failure(error.reason, "decode", type(error).__name__, str(error))
        add_log_context(audio_id=item.reference.get("audio_id"))
        try:
            item.audio = self.load(item.reference["uri"])
        except AudioError as error:
            if self._closing.is_set() and not error.permanent:
                return None  # cut short by shutdown, not a verdict on the message
            return Failure(error.reason, "audio", type(error).__name__, str(error),
                           attempts=getattr(error, "attempts", 1))
        except Exception as error:  # a decoder bug must not take the fleet down; the message is kept
            log.exception("unexpected error loading %s", item.reference.get("audio_id"))
            return Failure("internal_error", "audio", type(error).__name__, str(error))
        return None if self._closing.is_set() else item

    def load(self, uri: str) -> Audio:
        for attempt in range(1, self._attempts + 1):
            try:
                return self._loader.load(uri)
            except AudioError as error:
                if error.permanent or attempt == self._attempts or self._closing.is_set():
                    error.attempts = attempt  # type: ignore[attr-defined]
                    raise
                self._metrics.fetch_retries.inc()
                log.warning("transient audio error (attempt %d/%d): %s", attempt, self._attempts, error)
                self._closing.wait(self._backoff * 2 ** (attempt - 1))  # backoff, cut short by shutdown
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- gather


class Gather:
    """The ready queue, bounded by audio seconds, and clips deferred until ``retry_at``; cuts micro-batches.

    ``put`` (prepare threads) blocks while the queue holds more than ``4 x max_audio_seconds``;
    ``next_batch`` (the inference thread) returns when a batch is full or its oldest clip waited ``max_wait_ms``.
    """

    def __init__(self, limits: BatchSettings, closing: threading.Event) -> None:
        self._limits = limits
        self._closing = closing
        self._ready: deque[Item] = deque()
        self._deferred: list[Item] = []
        self._ready_seconds = 0.0
        self.ready_limit = 4 * limits.max_audio_seconds
        self._cond = threading.Condition()

    @property
    def ready_seconds(self) -> float:
        return self._ready_seconds

    def put(self, item: Item) -> bool:
        """Queue ``item``, waiting while the queue is over its bound; False (not queued) once closing."""
        with self._cond:
            while self._ready_seconds > self.ready_limit and not self._closing.is_set():
                self._cond.wait(0.5)
            if self._closing.is_set():
                return False
            item.ready_at = time.monotonic()
            self._ready.append(item)
            self._ready_seconds += item.seconds
            self._cond.notify_all()
        return True

    def defer(self, items: list[Item]) -> None:
        with self._cond:
            self._deferred.extend(items)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def revoke(self, partitions: set[TopicPartition]) -> list[Item]:
        """Remove and return the queued and deferred items of these partitions."""
        with self._cond:
            keep = [i for i in self._ready if i.tp not in partitions]
            gone = [i for i in self._ready if i.tp in partitions] + [i for i in self._deferred if i.tp in partitions]
            self._ready = deque(keep)
            self._deferred = [i for i in self._deferred if i.tp not in partitions]
            self._ready_seconds = sum(i.seconds for i in keep)
            self._cond.notify_all()
        return gone

    def next_batch(self) -> list[Item] | None:
        """The next micro-batch; None once closing (a partial batch goes back to the queue)."""
        limits = self._limits
        batch: list[Item] = []
        seconds = 0.0
        with self._cond:
            while not self._closing.is_set():
                now = time.monotonic()
                due = [i for i in self._deferred if i.retry_at <= now]
                if due:
                    self._deferred = [i for i in self._deferred if i.retry_at > now]
                    batch.extend(due)
                while self._ready and len(batch) < limits.max_clips and seconds < limits.max_audio_seconds:
                    item = self._ready.popleft()
                    self._ready_seconds -= item.seconds
                    seconds += item.seconds
                    batch.append(item)
                    self._cond.notify_all()
                # The wait counts from when the oldest clip became ready, so clips that already waited
                # through the previous forward do not wait a full max_wait again.
                deadline = min(i.ready_at for i in batch) + limits.max_wait_ms / 1000 if batch else None
                full = len(batch) >= limits.max_clips or seconds >= limits.max_audio_seconds
                if full or (deadline is not None and now >= deadline):
                    return batch
                wake = [deadline] if deadline else []
                wake += [i.retry_at for i in self._deferred]
                self._cond.wait(max(0.001, min(wake) - now) if wake else 0.5)
            self._ready.extendleft(reversed(batch))
            self._ready_seconds += seconds
        return None

    def drain(self) -> list[Item]:
        """Remove and return everything queued or deferred."""
        with self._cond:
            gone = list(self._ready) + self._deferred
            self._ready.clear()
            self._deferred = []
            self._ready_seconds = 0.0
            self._cond.notify_all()
        return gone


# ---------------------------------------------------------------------------------------------- dedupe


def by_content(items: Iterable[Item]) -> dict[str, list[Item]]:
    """Items grouped by their audio's content hash (same bytes: one computation)."""
    groups: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        groups[item.audio.sha256].append(item)  # type: ignore[union-attr]
    return dict(groups)


@dataclass
class Claimed:
    """What a batch's cache misses turned into."""

    compute: dict[str, list[Item]] = field(default_factory=dict)  # claimed by us: run the model
    deferred: list[Item] = field(default_factory=list)  # another member is computing them: look again later


Hit = tuple[list[Item], ClipResult]


class Dedupe:
    """The Redis cache in front of the model: one MGET for a batch, claims for its misses."""

    def __init__(self, cache: ResultCache, claim_seconds: float, *, defer_seconds: float = DEFER_SECONDS) -> None:
        self.cache = cache
        self._claim_seconds = claim_seconds
        self._defer_seconds = defer_seconds

    def lookup(self, groups: dict[str, list[Item]]) -> tuple[list[Hit], dict[str, list[Item]]]:
        """One MGET: (hits as (items, result), misses by content hash)."""
        misses = dict(groups)
        cached = self.cache.get_many(list(groups))
        hits = [(misses.pop(sha), ClipResult.from_bytes(payload)) for sha, payload in cached.items()]
        return hits, misses

    def claim(self, misses: dict[str, list[Item]], now: float | None = None) -> Claimed:
        busy = self.cache.claim_many(misses)
        compute = {sha: items for sha, items in misses.items() if sha not in busy}
        deferred = [i for sha in misses if sha in busy for i in misses[sha]]
        self.schedule(deferred, time.monotonic() if now is None else now)
        return Claimed(compute, deferred)

    def schedule(self, items: list[Item], now: float) -> None:
        """Wait for another member's result; after its claim expires, release it so we compute it ourselves."""
        for item in items:
            item.claim_deadline = item.claim_deadline or now + self._claim_seconds
            if now >= item.claim_deadline:
                self.cache.release([item.audio.sha256])  # type: ignore[union-attr]
            item.retry_at = now + self._defer_seconds

    def store(self, results: dict[str, ClipResult]) -> None:
        self.cache.put_many({sha: result.to_bytes() for sha, result in results.items()})

    def release(self, shas: list[str]) -> None:
        self.cache.release(shas)


# ---------------------------------------------------------------------------------------------- infer


@dataclass(frozen=True)
class Scored:
    """Clips whose last window was just scored."""

    results: dict[str, ClipResult]


@dataclass(frozen=True)
class ForwardFailed:
    """Clips (not failed before) with a window in a forward that raised."""

    shas: list[str]
    error: Exception


class Predict(Protocol):
    def __call__(self, clips: list[np.ndarray]) -> list[Prediction]: ...


def clip_result(audio: Audio | None, scored: list[tuple[int, int, Prediction | None]]) -> ClipResult:
    duration = audio.duration_seconds if audio else 0.0
    spans = tuple((s / SAMPLE_RATE, min(e / SAMPLE_RATE, duration)) for s, e, _ in scored)
    return ClipResult(spans, tuple(p for *_, p in scored))  # type: ignore[misc]


class Infer:
    """Windows, plans and runs the model over distinct clips; exact results per clip."""

    def __init__(self, model: EmotionModel, model_settings: ModelSettings, audio: AudioSettings,
                 limits: BatchSettings, metrics: Metrics) -> None:
        self._model = model
        self._model_settings = model_settings
        self._window_seconds = audio.window_seconds
        self._limits = limits
        self._metrics = metrics

    def run(self, audios: dict[str, Audio]) -> Iterator[Scored | ForwardFailed]:
        """One outcome per planned forward: the clips it completed, or the clips it failed."""
        shas = list(audios)
        segments: list[tuple[int, int, int]] = []  # (clip index, start sample, end sample)
        for clip_index, sha in enumerate(shas):
            segments += [(clip_index, s, e) for s, e in windows(len(audios[sha].samples), self._window_seconds)]
        clips = [audios[shas[c]].samples[s:e] for c, s, e in segments]
        windows_left = Counter(c for c, _, _ in segments)
        predictions: list[Prediction | None] = [None] * len(segments)
        limits = self._limits
        plan = plan_batches([len(c) for c in clips], max_clips=limits.max_clips,
                            max_padded_samples=int(limits.max_audio_seconds * SAMPLE_RATE),
                            max_padding=limits.max_padding_fraction)
        failed: set[int] = set()
        for indices in plan:
            touched = {segments[i][0] for i in indices}
            outputs = self.forward([clips[i] for i in indices])
            if isinstance(outputs, Exception):
                yield ForwardFailed([shas[c] for c in touched - failed], outputs)
                failed |= touched
                continue
            for i, output in zip(indices, outputs, strict=True):
                predictions[i] = output
                windows_left[segments[i][0]] -= 1
            done = [c for c in touched if windows_left[c] == 0 and c not in failed]
            yield Scored({shas[c]: clip_result(audios[shas[c]], [
                (s, e, predictions[i]) for i, (owner, s, e) in enumerate(segments) if owner == c]) for c in done})

    def forward(self, clips: list[np.ndarray]) -> list[Prediction] | Exception:
        """One model forward; a failure is returned (its clips get dead letters), not raised."""
        started = time.monotonic()
        try:
            outputs = self.predict(clips)
        except Exception as error:
            log.exception("model failed on a batch of %d clips", len(clips))
            self._metrics.errors.labels("model").inc()
            return error
        finally:
            self._metrics.stage_seconds.labels("model").observe(time.monotonic() - started)
        self._metrics.model_batch_windows.observe(len(clips))
        self._metrics.audio_seconds.inc(sum(len(c) for c in clips) / SAMPLE_RATE)
        return outputs

    def predict(self, clips: list[np.ndarray]) -> list[Prediction]:
        return self._model.predict(clips, granularity=self._model_settings.granularity,
                                   embeddings=self._model_settings.embeddings)


# ---------------------------------------------------------------------------------------------- emit


class Producing(Protocol):
    """The part of confluent_kafka.Producer that Emit uses."""

    def produce(self, topic: str, value: bytes | None = ..., key: bytes | None = ..., *,
                on_delivery: Callable[[Any, Any], None]) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...

    def flush(self, timeout: float = ...) -> int: ...

    def __len__(self) -> int: ...


class Emit:
    """Events and dead letters onto Kafka; a message settles finished when all its outputs are delivered.

    A failed delivery (the idempotent producer gave up after delivery.timeout.ms) is fatal: ``failure`` is
    set and the message stays open, so the loop never commits past a lost result.
    """

    def __init__(self, kafka: KafkaSettings, codec: Codec, producer: Producing, identity: ModelIdentity,
                 settle: Settle, metrics: Metrics, *, processor_id: str) -> None:
        self._kafka = kafka
        self._codec = codec
        self._producer = producer
        self._identity = identity
        self._settle = settle
        self._metrics = metrics
        self._processor_id = processor_id
        self.failure: BaseException | None = None

    def results(self, items: list[Item], result: ClipResult, *, cache_hit: bool) -> None:
        started = time.monotonic()
        now_ms = int(time.time() * 1000)
        topic = self._kafka.results_topic
        for item in items:
            events = emotion_events(item.reference, item.lineage, item.audio.sha256, result,  # type: ignore[arg-type,union-attr]
                                    self._identity, cache_hit=cache_hit, processed_at_ms=now_ms,
                                    latency_ms=int((time.monotonic() - item.received) * 1000))
            encoded = [self._codec.encode("emotion_event", e, topic=topic) for e in events]
            item.audio = None  # the samples are no longer needed; free them before delivery
            self._produce_all(item, topic, [(item.key, value) for value in encoded])
            self._metrics.end_to_end_seconds.observe(max(0.0, time.time() - item.reference["produced_at"] / 1000))  # type: ignore[index]
        self._metrics.stage_seconds.labels("produce").observe(time.monotonic() - started)

    def dead_letter(self, item: Item, failure: Failure) -> None:
        topic = self._kafka.dead_letter_topic
        record = dead_letter(key=item.key, payload=item.value, headers=item.headers, lineage=item.lineage,
                             failure=failure, reference=item.reference, processor=self._processor_id,
                             failed_at_ms=int(time.time() * 1000))
        value = self._codec.encode("dead_letter", record, topic=topic)
        log.info("dead letter %s[%d]@%d: %s (%s)", *item.tp, item.offset, failure.reason, failure.message[:200],
                 extra={"topic": item.tp[0], "partition": item.tp[1], "offset": item.offset,
                        "audio_id": (item.reference or {}).get("audio_id")})
        self._metrics.dead_letter(failure.reason, failure.stage)
        self._produce_all(item, topic, [(item.key, value)])

    def _produce_all(self, item: Item, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
        self._settle.outputs(item, len(messages))
        delivered = functools.partial(self.delivered, item)
        for key, value in messages:
            while True:
                try:
                    self._producer.produce(topic, value=value, key=key, on_delivery=delivered)
                    break
                except BufferError:
                    self._producer.poll(0.05)

    def delivered(self, item: Item, error: Any, message: Any = None) -> None:
        """The producer's delivery callback for one output of ``item``."""
        if error is not None:
            self._metrics.errors.labels("delivery").inc()
            # The idempotent producer already retried for delivery.timeout.ms: stop this member
            # rather than commit past a lost result. The message is redelivered after restart.
            self.failure = RuntimeError(f"delivery to Kafka failed: {error.str()}")
            return
        if message is not None:
            self._metrics.messages_out.labels(message.topic()).inc()
        self._settle.output_delivered(item)

    def serve_deliveries(self, closing: threading.Event) -> None:
        """Run delivery callbacks until closing and every output is delivered (its own thread)."""
        while not closing.is_set() or len(self._producer):
            self._producer.poll(0.05)

    def flush(self, timeout: float) -> None:
        self._producer.flush(timeout)
