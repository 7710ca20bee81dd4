"""The inference step: the strategy the consumer loop drives for `emofleet process`, composed from stages.

The loop makes a fresh :class:`InferenceStep` for each assignment (:class:`InferenceSteps` is the factory);
what outlives an assignment (the model, the producer, the audio loader, the Redis cache) belongs to the
factory.

The stages (``processors/stages.py``) each do one job and know nothing of each other or of threads; this
module is the one place that wires them, in the spirit of Sentry Arroyo's processing strategies::

    poll thread          fetch pool (fetch_workers)     "inference" thread                      "delivery" thread
    submit(message) ---> Prepare ----- Failure -------------------------------------------> Emit.dead_letter
                           | Item                                                                  |
                           v                                                                       |
                         Gather.put --> Gather.next_batch --> Dedupe.lookup -- hit ------> Emit.results
                         (bounded by      (count, audio s,     Dedupe.claim  -- busy --> Gather.defer (look again)
                          audio seconds)   max wait)               | claimed                       |
                                                                   v                               |
                                                               Infer.run -- Scored -----> Emit.results, Dedupe.store
                                                                         -- ForwardFailed -> Dedupe.release,
                                                                                            Emit.dead_letter
                                                                                                   v
                                                           delivery callbacks --> Settle --> the loop's Reporter

1. **prepare** (thread pool): Avro-decode the reference, fetch and decode the audio with bounded retries
   for transient errors. A failure goes straight to the dead-letter topic; a prepared clip waits in the
   ready queue, bounded by audio seconds, so memory stays bounded.
2. **gather** (the inference thread): up to ``max_clips`` clips / ``max_audio_seconds`` or ``max_wait_ms``,
   plus deferred clips that are due.
3. **dedupe**: one MGET for the batch; hits are emitted at once; misses are claimed (``SET NX EX``) so two
   members never compute the same clip; clips another member is computing are deferred and looked up
   again until its result lands or its claim expires.
4. **infer**: the claimed clips' windows, sorted by length into planned forwards; a clip is emitted and
   cached as soon as its last window is scored.
5. **emit**: events (or a dead letter) are produced with the idempotent producer; when every output of a
   message is delivered the message is reported finished, which lets the loop commit past it.

Every submitted message is reported exactly once (``Settle``): finished once its outputs are delivered,
dropped when the step stops before it produced anything. ``join`` stops taking work, drops what has not reached
the model and waits for the batch in progress; ``close`` stops the threads and reports what is left dropped
(the loop re-reads it).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from confluent_kafka import Message, Producer

from emofleet.core.config import Settings
from emofleet.core.logs import with_log_context
from emofleet.core.metrics import Metrics
from emofleet.processors.audio import AudioLoader
from emofleet.processors.cache import ResultCache, cache_namespace
from emofleet.processors.events import ModelIdentity
from emofleet.processors.model import EmotionModel
from emofleet.processors.stages import (
    DEFER_SECONDS, FETCH_ATTEMPTS, Dedupe, Emit, ForwardFailed, Gather, Infer, Item, Prepare, Settle, by_content,
)
from emofleet.schemas.codec import Codec
from emofleet.streams.consumer import Reporter
from emofleet.streams.dead_letters import Failure
from emofleet.streams.offsets import TopicPartition

__all__ = ["DEFER_SECONDS", "FETCH_ATTEMPTS", "InferenceStep", "InferenceSteps", "Item"]

log = logging.getLogger(__name__)


class InferenceSteps:
    """The strategy factory of a processor: one :class:`InferenceStep` per assignment, sharing what outlives it."""

    def __init__(self, settings: Settings, model: EmotionModel, codec: Codec, producer: Producer, *,
                 processor_id: str, metrics: Metrics) -> None:
        self.settings = settings
        self.model = model
        self.codec = codec
        self.producer = producer
        self.processor_id = processor_id
        self.metrics = metrics
        self.loader = AudioLoader(settings.audio, observe=self.observe_stage)
        self.cache = ResultCache(settings.cache, cache_namespace(
            model.model_id, model.revision, settings.model.granularity, settings.model.embeddings), processor_id,
            metrics=metrics)
        self.identity = ModelIdentity(model.model_id, model.revision, settings.model.granularity,
                                      settings.model.embeddings)

    def __call__(self, partitions: frozenset[TopicPartition], report: Reporter) -> InferenceStep:
        return InferenceStep(self, report)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.metrics.stage_seconds.labels(stage).observe(seconds)

    def close(self) -> None:
        self.loader.close()
        self.cache.close()


class InferenceStep:
    def __init__(self, shared: InferenceSteps, report: Reporter) -> None:
        settings, metrics = shared.settings, shared.metrics
        self.metrics = metrics
        self._observe_stage = shared.observe_stage
        self._closing = threading.Event()  # no more work taken: prepare, gather and the inference loop stop
        self._closed = threading.Event()  # the delivery thread may stop once the producer is empty
        self._failure: BaseException | None = None

        self._settle = Settle(report)
        self._prepare = Prepare(shared.codec, shared.loader, metrics, self._closing)
        self._gather = Gather(settings.batch, self._closing)
        self._dedupe = Dedupe(shared.cache, settings.cache.claim_seconds)
        self._infer = Infer(shared.model, settings.model, settings.audio, settings.batch, metrics)
        self._emit = Emit(settings.kafka, shared.codec, shared.producer, shared.identity, self._settle, metrics,
                          processor_id=shared.processor_id)

        self._pool = ThreadPoolExecutor(settings.audio.fetch_workers, thread_name_prefix="fetch")
        self._worker = threading.Thread(target=self._run_worker, name="inference", daemon=True)
        self._delivery = threading.Thread(target=self._emit.serve_deliveries, args=(self._closed,),
                                          name="delivery", daemon=True)
        self._worker.start()
        self._delivery.start()

    # ------------------------------------------------------------ Strategy interface (poll thread)

    def submit(self, message: Message) -> None:
        item = Item((message.topic(), message.partition()), message.offset(), message.key(),
                    message.value() or b"", list(message.headers() or []), time.monotonic())
        self._settle.opened(item)
        self._pool.submit(with_log_context(self._run_prepare, topic=item.tp[0], partition=item.tp[1],
                                           offset=item.offset), item)

    def poll(self) -> None:
        if (failure := self._failure or self._emit.failure) is not None:
            raise failure

    def join(self, timeout: float) -> None:
        """Finish the forward in progress and deliver its outputs, for at most ``timeout``; drop what has not
        reached the model (the loop reads it again, or the partition's next owner does). Fast on purpose: an
        assignment change or a stop waits for one batch, not for the whole queue."""
        self._closing.set()
        self._gather.wake()
        self._settle.drop(self._gather.drain())
        self._settle.wait_empty(timeout)

    def close(self) -> None:
        """Stop the threads after the forward in progress, drop what is queued, flush outputs."""
        self._closing.set()
        self._gather.wake()
        self._pool.shutdown(wait=True, cancel_futures=True)  # running fetches see _closing and drop
        self._worker.join()
        self._closed.set()
        self._settle.drop(self._gather.drain())
        self._emit.flush(5.0)
        self._settle.drop(self._settle.without_outputs())

    # ------------------------------------------------------------ prepare (pool threads)

    def _run_prepare(self, item: Item) -> None:
        if self._closing.is_set():
            self._settle.drop([item])
            return
        outcome = self._prepare(item)
        if isinstance(outcome, Failure):
            self._emit.dead_letter(item, outcome)
        elif outcome is None or not self._gather.put(outcome):  # put refuses once the step is stopping
            self._settle.drop([item])

    # ------------------------------------------------------------ gather -> dedupe -> infer (inference thread)

    def _run_worker(self) -> None:
        try:
            while not self._closing.is_set():
                batch = self._gather.next_batch()
                if batch:
                    self._process(batch)
        except BaseException as error:  # surfaced to the poll thread, which stops the member
            log.exception("inference worker failed")
            self.metrics.errors.labels("worker").inc()
            self._failure = error

    def _process(self, batch: list[Item]) -> None:
        self.metrics.batch_clips.observe(len(batch))
        self.metrics.batch_audio_seconds.observe(sum(i.seconds for i in batch))
        started = time.monotonic()
        hits, misses = self._dedupe.lookup(by_content(batch))
        for items, result in hits:
            self._emit.results(items, result, cache_hit=True)
        claimed = self._dedupe.claim(misses)
        self._observe_stage("cache", time.monotonic() - started)
        self._gather.defer(claimed.deferred)
        if not claimed.compute:
            return
        audios = {sha: items[0].audio for sha, items in claimed.compute.items()}
        for outcome in self._infer.run(audios):  # type: ignore[arg-type]
            if isinstance(outcome, ForwardFailed):
                failure = Failure("model_error", "model", type(outcome.error).__name__, str(outcome.error))
                for sha in outcome.shas:
                    self._dedupe.release([sha])
                    for item in claimed.compute[sha]:
                        self._emit.dead_letter(item, failure)
                continue
            for sha, result in outcome.results.items():
                self._emit.results(claimed.compute[sha], result, cache_hit=False)
            self._dedupe.store(outcome.results)
