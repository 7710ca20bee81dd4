"""The inference step: the strategy the consumer loop drives for `emofleet process`.

Pipeline per message, off the poll thread:

1. prepare (thread pool, ``fetch_workers`` wide): Avro-decode the reference, fetch and decode the
   audio with bounded retries for transient errors. Failures go straight to the dead-letter topic.
   Prepared clips wait in a ready queue bounded by audio seconds, so memory stays bounded.
2. batch (one worker thread): gather up to ``max_clips`` clips / ``max_audio_seconds`` or
   ``max_wait_ms``; look the batch up in the cache (one MGET), claim the misses, run the model on the
   claimed clips' windows sorted by length, store the results, emit events. Clips another member is
   computing are deferred and looked up again until its result lands or its claim expires.
3. emit: events (or a dead letter) are produced with the idempotent producer; when every output of a
   message is delivered the message is reported finished, which lets the loop commit past it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from confluent_kafka import KafkaError, Message, Producer

from emofleet.processors.audio import Audio, AudioError, AudioLoader, windows
from emofleet.processors.batch_plan import plan_batches
from emofleet.processors.cache import ResultCache, cache_namespace
from emofleet.processors.events import ClipResult, ModelIdentity, emotion_events
from emofleet.processors.model import EmotionModel, Prediction
from emofleet.schemas.codec import Codec, SchemaError
from emofleet.schemas.emotions import SAMPLE_RATE
from emofleet.core.config import Settings
from emofleet.streams.consumer import Reporter
from emofleet.streams.dead_letters import Failure, Lineage, dead_letter
from emofleet.core.logs import add_log_context, with_log_context
from emofleet.core.metrics import Metrics
from emofleet.streams.offsets import TopicPartition

log = logging.getLogger(__name__)

FETCH_ATTEMPTS = 3
DEFER_SECONDS = 0.25


@dataclass(eq=False)
class Item:
    """One consumed message on its way through the step."""

    tp: TopicPartition
    offset: int
    generation: int
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


class InferenceStep:
    def __init__(self, settings: Settings, model: EmotionModel, codec: Codec, producer: Producer,
                 report: Reporter, is_current: Callable[[TopicPartition, int], bool], *,
                 processor_id: str, loader: AudioLoader | None = None, cache: ResultCache | None = None,
                 metrics: Metrics | None = None) -> None:
        self._settings = settings
        self.metrics = metrics or Metrics("processor")
        self._model = model
        self._codec = codec
        self._producer = producer
        self._report = report
        self._is_current = is_current
        self.processor_id = processor_id
        self._identity = ModelIdentity(model.model_id, model.revision, settings.model.granularity,
                                       settings.model.embeddings)
        self._loader = loader or AudioLoader(settings.audio, observe=self._observe_stage)
        self.cache = cache or ResultCache(settings.cache, cache_namespace(
            model.model_id, model.revision, settings.model.granularity, settings.model.embeddings), processor_id,
            metrics=self.metrics)
        self._pool = ThreadPoolExecutor(settings.audio.fetch_workers, thread_name_prefix="fetch")
        self._ready: deque[Item] = deque()
        self._deferred: list[Item] = []
        self._ready_seconds = 0.0
        self._ready_limit = 4 * settings.batch.max_audio_seconds
        self._cond = threading.Condition()
        self._open: set[Item] = set()
        self._open_lock = threading.Lock()
        self._closing = threading.Event()
        self._failure: BaseException | None = None
        self._worker = threading.Thread(target=self._run_worker, name="inference", daemon=True)
        self._delivery = threading.Thread(target=self._serve_deliveries, name="delivery", daemon=True)
        self._worker.start()
        self._delivery.start()

    # ------------------------------------------------------------ Strategy interface (poll thread)

    def submit(self, message: Message, generation: int) -> None:
        item = Item((message.topic(), message.partition()), message.offset(), generation, message.key(),
                    message.value() or b"", list(message.headers() or []), time.monotonic())
        with self._open_lock:
            self._open.add(item)
        self._pool.submit(with_log_context(self._prepare, topic=item.tp[0], partition=item.tp[1], offset=item.offset),
                          item)

    def revoke(self, partitions: set[TopicPartition]) -> None:
        with self._cond:
            keep = [i for i in self._ready if i.tp not in partitions]
            gone = [i for i in self._ready if i.tp in partitions] + [i for i in self._deferred if i.tp in partitions]
            self._ready = deque(keep)
            self._deferred = [i for i in self._deferred if i.tp not in partitions]
            self._ready_seconds = sum(i.seconds for i in keep)
            self._cond.notify_all()
        self._drop(gone)

    def failure(self) -> BaseException | None:
        return self._failure

    def close(self, timeout: float) -> None:
        """Finish the batch in progress, drop queued work, flush outputs."""
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        self._worker.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)  # running fetches see _closing and drop
        self._producer.flush(timeout)
        with self._open_lock:
            unfinished = [i for i in self._open if i.outputs_pending == 0]
        self._drop(unfinished)
        self._loader.close()
        self.cache.close()

    # ------------------------------------------------------------ prepare (pool threads)

    def _prepare(self, item: Item) -> None:
        if self._closing.is_set() or not self._is_current(item.tp, item.generation):
            self._drop([item])
            return
        try:
            item.reference = self._codec.decode("audio_reference", item.value, topic=item.tp[0])
        except SchemaError as error:
            self._dead_letter(item, Failure(error.reason, "decode", type(error).__name__, str(error)))
            return
        add_log_context(audio_id=item.reference.get("audio_id"))
        try:
            item.audio = self._load_with_retries(item.reference["uri"])
        except AudioError as error:
            if self._closing.is_set() and not error.permanent:
                self._drop([item])  # cut short by shutdown, not a verdict on the message
                return
            self._dead_letter(item, Failure(error.reason, "audio", type(error).__name__, str(error),
                                            attempts=getattr(error, "attempts", 1)))
            return
        except Exception as error:  # a decoder bug must not take the fleet down; the message is kept
            log.exception("unexpected error loading %s", item.reference.get("audio_id"))
            self._dead_letter(item, Failure("internal_error", "audio", type(error).__name__, str(error)))
            return
        if self._closing.is_set():
            self._drop([item])
            return
        with self._cond:
            while self._ready_seconds > self._ready_limit and not self._closing.is_set():
                self._cond.wait(0.5)
            item.ready_at = time.monotonic()
            self._ready.append(item)
            self._ready_seconds += item.seconds
            self._cond.notify_all()

    def _load_with_retries(self, uri: str) -> Audio:
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                return self._loader.load(uri)
            except AudioError as error:
                if error.permanent or attempt == FETCH_ATTEMPTS or self._closing.is_set():
                    error.attempts = attempt  # type: ignore[attr-defined]
                    raise
                self.metrics.fetch_retries.inc()
                log.warning("transient audio error (attempt %d/%d): %s", attempt, FETCH_ATTEMPTS, error)
                self._closing.wait(0.5 * 2 ** (attempt - 1))  # backoff, cut short by shutdown
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ batch (worker thread)

    def _run_worker(self) -> None:
        try:
            while not self._closing.is_set():
                batch = self._gather()
                if batch:
                    self._process(batch)
        except BaseException as error:  # surfaced to the poll thread, which stops the member
            log.exception("inference worker failed")
            self.metrics.errors.labels("worker").inc()
            self._failure = error

    def _gather(self) -> list[Item]:
        limits = self._settings.batch
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
        self._drop(batch)
        return []

    def _process(self, batch: list[Item]) -> None:
        current = [i for i in batch if self._is_current(i.tp, i.generation)]
        self._drop([i for i in batch if i not in current])
        self.metrics.batch_clips.observe(len(current))
        self.metrics.batch_audio_seconds.observe(sum(i.seconds for i in current))
        started = time.monotonic()
        by_sha: dict[str, list[Item]] = defaultdict(list)
        for item in current:
            by_sha[item.audio.sha256].append(item)  # type: ignore[union-attr]
        cached = self.cache.get_many(list(by_sha))
        for sha, payload in cached.items():
            self._emit_results(by_sha.pop(sha), ClipResult.from_bytes(payload), cache_hit=True)
        busy = self.cache.claim_many(by_sha)
        self._observe_stage("cache", time.monotonic() - started)
        self._defer([i for sha in busy for i in by_sha.pop(sha)])
        if by_sha:
            self._compute(by_sha)

    def _defer(self, items: list[Item]) -> None:
        """Wait for another member's result; after its claim expires, compute it ourselves."""
        now = time.monotonic()
        for item in items:
            item.claim_deadline = item.claim_deadline or now + self._settings.cache.claim_seconds
            if now >= item.claim_deadline:
                self.cache.release([item.audio.sha256])  # type: ignore[union-attr]
            item.retry_at = now + DEFER_SECONDS
        with self._cond:
            self._deferred.extend(items)

    def _compute(self, by_sha: dict[str, list[Item]]) -> None:
        """Run the model over every window of these clips, in planned batches; a clip is emitted and
        cached as soon as its last window is scored, not when the whole batch is done."""
        shas = list(by_sha)
        segments: list[tuple[int, int, int]] = []  # (clip index, start sample, end sample)
        for clip_index, sha in enumerate(shas):
            samples = by_sha[sha][0].audio.samples  # type: ignore[union-attr]
            segments += [(clip_index, s, e) for s, e in windows(len(samples), self._settings.audio.window_seconds)]
        clips = [by_sha[shas[c]][0].audio.samples[s:e] for c, s, e in segments]  # type: ignore[union-attr]
        windows_left = Counter(c for c, _, _ in segments)
        predictions: list[Prediction | None] = [None] * len(segments)
        limits = self._settings.batch
        plan = plan_batches([len(c) for c in clips], max_clips=limits.max_clips,
                            max_padded_samples=int(limits.max_audio_seconds * SAMPLE_RATE),
                            max_padding=limits.max_padding_fraction)
        failed: set[int] = set()
        for indices in plan:
            touched = {segments[i][0] for i in indices}
            outputs = self._forward([clips[i] for i in indices])
            if isinstance(outputs, Exception):
                for clip_index in touched - failed:
                    self.cache.release([shas[clip_index]])
                    for item in by_sha[shas[clip_index]]:
                        self._dead_letter(item, Failure("model_error", "model", type(outputs).__name__, str(outputs)))
                failed |= touched
                continue
            for i, output in zip(indices, outputs, strict=True):
                predictions[i] = output
                windows_left[segments[i][0]] -= 1
            done = [c for c in touched if windows_left[c] == 0 and c not in failed]
            results = {shas[c]: self._clip_result(by_sha[shas[c]][0].audio, [
                (s, e, predictions[i]) for i, (owner, s, e) in enumerate(segments) if owner == c]) for c in done}
            for sha, result in results.items():
                self._emit_results(by_sha[sha], result, cache_hit=False)
            self.cache.put_many({sha: result.to_bytes() for sha, result in results.items()})

    @staticmethod
    def _clip_result(audio: Audio | None, scored: list[tuple[int, int, Prediction | None]]) -> ClipResult:
        duration = audio.duration_seconds if audio else 0.0
        spans = tuple((s / SAMPLE_RATE, min(e / SAMPLE_RATE, duration)) for s, e, _ in scored)
        return ClipResult(spans, tuple(p for *_, p in scored))  # type: ignore[misc]

    def _forward(self, clips: list[np.ndarray]) -> list[Prediction] | Exception:
        """One model forward; a failure is returned (its clips get dead letters), not raised."""
        started = time.monotonic()
        try:
            outputs = self._predict(clips)
        except Exception as error:
            log.exception("model failed on a batch of %d clips", len(clips))
            self.metrics.errors.labels("model").inc()
            return error
        finally:
            self._observe_stage("model", time.monotonic() - started)
        self.metrics.model_batch_windows.observe(len(clips))
        self.metrics.audio_seconds.inc(sum(len(c) for c in clips) / SAMPLE_RATE)
        return outputs

    def _predict(self, clips: list[np.ndarray]) -> list[Prediction]:
        return self._model.predict(clips, granularity=self._settings.model.granularity,
                                   embeddings=self._settings.model.embeddings)

    # ------------------------------------------------------------ emit

    def _emit_results(self, items: list[Item], result: ClipResult, *, cache_hit: bool) -> None:
        started = time.monotonic()
        now_ms = int(time.time() * 1000)
        for item in items:
            events = emotion_events(item.reference, item.lineage, item.audio.sha256, result,  # type: ignore[arg-type,union-attr]
                                    self._identity, cache_hit=cache_hit, processed_at_ms=now_ms,
                                    latency_ms=int((time.monotonic() - item.received) * 1000))
            encoded = [self._codec.encode("emotion_event", e, topic=self._settings.kafka.results_topic)
                       for e in events]
            item.audio = None  # the samples are no longer needed; free them before delivery
            self._produce_all(item, self._settings.kafka.results_topic,
                              [(item.key, value) for value in encoded])
            self.metrics.end_to_end_seconds.observe(max(0.0, time.time() - item.reference["produced_at"] / 1000))  # type: ignore[index]
        self._observe_stage("produce", time.monotonic() - started)

    def _observe_stage(self, stage: str, seconds: float) -> None:
        self.metrics.stage_seconds.labels(stage).observe(seconds)

    def _dead_letter(self, item: Item, failure: Failure) -> None:
        record = dead_letter(key=item.key, payload=item.value, headers=item.headers, lineage=item.lineage,
                             failure=failure, reference=item.reference, processor=self.processor_id,
                             failed_at_ms=int(time.time() * 1000))
        value = self._codec.encode("dead_letter", record, topic=self._settings.kafka.dead_letter_topic)
        log.info("dead letter %s[%d]@%d: %s (%s)", *item.tp, item.offset, failure.reason, failure.message[:200],
                 extra={"topic": item.tp[0], "partition": item.tp[1], "offset": item.offset,
                        "audio_id": (item.reference or {}).get("audio_id")})
        self.metrics.dead_letter(failure.reason, failure.stage)
        self._produce_all(item, self._settings.kafka.dead_letter_topic, [(item.key, value)])

    def _produce_all(self, item: Item, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
        item.outputs_pending = len(messages)
        for key, value in messages:
            while True:
                try:
                    self._producer.produce(topic, value=value, key=key,
                                           on_delivery=lambda error, msg, item=item: self._delivered(item, error, msg))
                    break
                except BufferError:
                    self._producer.poll(0.05)

    def _delivered(self, item: Item, error: KafkaError | None, message: Message | None = None) -> None:
        if error is not None:
            self.metrics.errors.labels("delivery").inc()
            # The idempotent producer already retried for delivery.timeout.ms: stop this member
            # rather than commit past a lost result. The message is redelivered after restart.
            self._failure = RuntimeError(f"delivery to Kafka failed: {error.str()}")
            return
        if message is not None:
            self.metrics.messages_out.labels(message.topic()).inc()
        with self._open_lock:
            item.outputs_pending -= 1
            done = item.outputs_pending == 0
        if done:
            self._settle(item, finished=True)

    def _serve_deliveries(self) -> None:
        while not self._closing.is_set() or len(self._producer):
            self._producer.poll(0.05)

    # ------------------------------------------------------------ settling

    def _drop(self, items: Iterable[Item]) -> None:
        for item in items:
            self._settle(item, finished=False)

    def _settle(self, item: Item, *, finished: bool) -> None:
        with self._open_lock:
            if item not in self._open:
                return
            self._open.discard(item)
        self._report(item.tp, item.offset, finished=finished)
