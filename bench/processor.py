"""End-to-end processor throughput: the emofleet processor vs a naive one-message-at-a-time loop.

    python bench/processor.py [--model tiny|mid-shape|large-shape] [--clips N] [--min-seconds S]
                              [--max-seconds S] [--rounds R] [--no-warm]

Same clips, same loaded model, one process, one embedded Tansu broker, the real Redis:

* ``emofleet processor`` -- ``build_processor(settings, model=model)``, its ConsumerLoop run in a
  thread (as tests/pipeline_helpers.running_processor does). Fresh topics, group and Redis key prefix
  per run, so the dedupe cache misses.
* ``emofleet processor (warm cache)`` -- the same again on fresh topics but with the Redis key prefix
  of the round's cold run: every clip is a cache hit (no model).
* ``naive loop`` -- written here: poll one message, Avro-decode, ``AudioLoader.load``,
  ``model.predict_reference`` (funasr ``generate``), ``emotion_events`` + Avro encode, produce,
  ``producer.flush()``, ``consumer.commit(message, asynchronous=False)``; per message.

Timing: each consumer first joins its group and gets every partition (the ~session.timeout/2 join is
not timed). Then the references are produced in one burst, and the clock runs from the moment the
consumer hands over the first reference ("first reference available" to it) until a separate reader
of the results topic has seen a whole-clip event (segment_index == -1) for every reference. The time
from producing to that first hand-over is shown apart as "fetch wait s": on Tansu it is ~0.5 s for
every row, because Tansu answers an empty long-poll Fetch only after fetch.wait.max.ms (librdkafka
default 500 ms) even when data arrives meanwhile; real Kafka answers as soon as data arrives.
Rounds interleave the rows (order alternates); tables show medians.

Targets: ``--model tiny``: processor >= 3x the naive loop. ``--model large-shape`` (the real
emotion2vec_plus_large architecture, random weights): >= 90% of the processor's wall time inside
the model forward (the model stage's emofleet_stage_seconds / wall).
"""

from __future__ import annotations

import argparse
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from emofleet.samples import write_samples
from emofleet.schemas.codec import make_codec
from emofleet.schemas.emotions import SAMPLE_RATE
from emofleet.core.config import BatchSettings, ModelSettings, Settings
from emofleet.streams.consumer import consumer_config
from emofleet.core.metrics import Metrics
from emofleet.streams.producer import AudioReferenceProducer, idempotent_producer_config
from emofleet.streams.references import make_reference

from harness import (
    DEFAULT_REDIS_URL, bench_settings, create_pipeline_topics, delete_redis_prefix, embedded_broker, log,
    machine_line, markdown_table, median, require_redis, workspace,
)

TINY_TARGET_RATIO = 3.0
LARGE_TARGET_MODEL_FRACTION = 0.90
PROCESSOR = "emofleet processor"
WARM = "emofleet processor (warm cache)"
NAIVE = "naive loop (1 msg: generate, flush, sync commit)"
MODEL_DEFAULTS = {  # clips, min s, max s, rounds
    "tiny": (120, 1.0, 6.0, 3),
    "mid-shape": (24, 2.0, 6.0, 2),
    "large-shape": (8, 2.0, 6.0, 2),
}


# ------------------------------------------------------------------------------------------ model


def load_bench_model(kind: str, cache_root: Path):  # type: ignore[no-untyped-def]
    """(EmotionModel, ModelSettings) for tiny / mid-shape / large-shape; directories are cached."""
    from emofleet.processors.model import load_model
    from emofleet.processors.tiny_model import LARGE_CONFIG, build_random_model, emotion2vec_config

    if kind == "tiny":
        settings = ModelSettings(model="tiny")
        return load_model(settings, cache_dir=cache_root), settings
    if kind == "large-shape":
        config = LARGE_CONFIG  # 1024-d, 16 heads, 8 prenet + 16 blocks: emotion2vec_plus_large
    elif kind == "mid-shape":  # the large model's per-layer shapes with 2 blocks (as tests/test_model.py)
        config = emotion2vec_config(embed_dim=1024, num_heads=16, depth=1, prenet_depth=1)
    else:
        raise SystemExit(f"unknown --model {kind!r}")
    started = time.monotonic()
    directory = build_random_model(cache_root / kind, config, seed=0)
    log(f"{kind} model directory ready in {time.monotonic() - started:.1f} s: {directory}")
    settings = ModelSettings(model=str(directory))
    return load_model(settings), settings


def count_forwards(model) -> list[int]:  # type: ignore[no-untyped-def]
    """Count model.predict calls (batched forwards) on this instance; returns the mutable counter."""
    counter = [0]
    predict = model.predict

    def counted(clips, **kwargs):  # type: ignore[no-untyped-def]
        counter[0] += 1
        return predict(clips, **kwargs)

    model.predict = counted
    return counter


# ------------------------------------------------------------------------------------------ results


class ResultWatcher:
    """Reads the results and dead-letter topics from the start; notes when every reference is settled."""

    def __init__(self, settings: Settings, expected: int) -> None:
        self._codec = make_codec()
        self._expected = expected
        self._results = settings.kafka.results_topic
        kafka = settings.kafka
        metadata = AdminClient(kafka.client_config()).list_topics(timeout=10)
        assignment = [TopicPartition(topic, p, OFFSET_BEGINNING)
                      for topic in (kafka.results_topic, kafka.dead_letter_topic)
                      for p in metadata.topics[topic].partitions]
        self._consumer = Consumer(kafka.client_config() | {
            "group.id": f"{kafka.processor_group}.watcher", "enable.auto.commit": False,
            "fetch.wait.max.ms": 10, "log_level": 0})
        self._consumer.assign(assignment)
        self.whole: dict[tuple[int, int], dict] = {}
        self.dead: dict[tuple[int, int], dict] = {}
        self.first_at: float | None = None
        self.done_at: float | None = None
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.done.is_set():
            for message in self._consumer.consume(num_messages=1000, timeout=0.01):
                if message.error() is not None:
                    continue
                if message.topic() == self._results:
                    event = self._codec.decode("emotion_event", message.value(), topic=message.topic())
                    if event["segment_index"] == -1:
                        self.whole[(event["source_partition"], event["source_offset"])] = event
                        if self.first_at is None:
                            self.first_at = time.perf_counter()
                else:
                    record = self._codec.decode("dead_letter", message.value(), topic=message.topic())
                    self.dead[(record["source_partition"], record["source_offset"])] = record
            if len(self.whole) + len(self.dead) >= self._expected:
                self.done_at = time.perf_counter()
                self.done.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


# ------------------------------------------------------------------------------------------ runs


@dataclass
class RunResult:
    name: str
    refs: int
    seconds: float  # first reference consumed -> every whole-clip result read back
    first_result_seconds: float  # first reference consumed -> first whole-clip result read back
    fetch_wait_seconds: float  # first reference produced -> first reference consumed
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage
    counts: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0

    @property
    def rate(self) -> float:
        return self.refs / self.seconds


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


class FirstConsumed:
    """perf_counter() of the first message a consumer handed on (set by the instrumented callee)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def mark(self) -> None:
        if self.at is None:
            self.at = time.perf_counter()


def timed_pipeline(settings: Settings, uris: list[str], timeout: float,
                   ) -> tuple[float, float, float, ResultWatcher]:
    """Produce the references, wait for every whole-clip result; (wall, first-result, start, watcher)."""
    references = [make_reference({"uri": uri, "tenant": "bench", "source": "bench"}) for uri in uris]
    watcher = ResultWatcher(settings, len(references))
    producer = AudioReferenceProducer(settings.kafka, make_codec())
    started = time.perf_counter()
    for reference in references:
        producer.send(reference)
    report = producer.flush()
    if report.failed:
        raise RuntimeError(f"enqueueing references failed: {report.failed[:3]}")
    if not watcher.done.wait(timeout):
        watcher.close()
        raise RuntimeError(f"only {len(watcher.whole)} results and {len(watcher.dead)} dead letters of "
                           f"{len(references)} within {timeout:.0f} s")
    watcher.close()
    if watcher.dead:
        reasons = {d["reason"] for d in watcher.dead.values()}
        raise RuntimeError(f"{len(watcher.dead)} references were dead-lettered ({reasons}): fix the bench setup")
    assert watcher.done_at is not None and watcher.first_at is not None
    return watcher.done_at - started, watcher.first_at - started, started, watcher


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample of the processor's Prometheus metrics (0 when never recorded)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def stage_seconds(metrics: Metrics, stage: str) -> float:
    """Seconds spent in ``stage``, summed over every thread that ran it."""
    return sample(metrics, "emofleet_stage_seconds_sum", stage=stage)


def run_processor(name: str, settings: Settings, model, uris: list[str], timeout: float,  # type: ignore[no-untyped-def]
                  forwards: list[int]) -> RunResult:
    from emofleet.processors.service import build_processor

    create_pipeline_topics(settings)
    forwards[0] = 0
    processor = build_processor(settings, model=model)
    first = FirstConsumed()
    steps = processor.steps

    def marking_steps(partitions, report):  # type: ignore[no-untyped-def]
        step = steps(partitions, report)
        submit = step.submit

        def submit_and_mark(message):  # type: ignore[no-untyped-def]
            first.mark()  # instrumentation only: when the poll thread handed over the first message
            submit(message)

        step.submit = submit_and_mark  # type: ignore[method-assign]
        return step

    processor.loop._factory = marking_steps  # type: ignore[assignment]  # instrumentation only
    thread = threading.Thread(target=processor.run, name="processor-loop", daemon=True)
    thread.start()
    try:
        partitions = settings.kafka.partitions
        wait_for(lambda: len(processor.loop.assigned) >= partitions, 30, "the processor's assignment")
        wall, first_result, started, watcher = timed_pipeline(settings, uris, timeout)
        metrics = processor.metrics
        stages = {"fetch_decode": stage_seconds(metrics, "fetch") + stage_seconds(metrics, "decode"),
                  **{stage: stage_seconds(metrics, stage) for stage in ("cache", "model", "produce")}}
        counts = {"batches": int(sample(metrics, "emofleet_batch_clips_count")), "forwards": forwards[0],
                  "clips": int(sample(metrics, "emofleet_model_batch_windows_sum")),
                  "cache hits": int(sample(metrics, "emofleet_cache_hits_total"))}
        hits = sum(1 for e in watcher.whole.values() if e["cache_hit"])
    finally:
        processor.stop()
        thread.join(30)
    if thread.is_alive():
        raise RuntimeError("processor did not stop within 30 s")
    del processor
    gc.collect()  # close its Kafka clients now, not when the broker is gone
    assert first.at is not None
    return RunResult(name, len(uris), started + wall - first.at, started + first_result - first.at,
                     first.at - started, stages, counts, hits)


class NaiveLoop:
    """The obvious per-message loop, for comparison: no batching, no pipelining, sync everything."""

    def __init__(self, settings: Settings, model) -> None:  # type: ignore[no-untyped-def]
        from emofleet.processors.audio import AudioLoader
        from emofleet.processors.events import ModelIdentity

        self._settings = settings
        self._model = model
        self._codec = make_codec()
        self._loader = AudioLoader(settings.audio)
        self._identity = ModelIdentity(model.model_id, model.revision, settings.model.granularity,
                                       settings.model.embeddings)
        self._consumer = Consumer(consumer_config(settings.kafka, settings.kafka.processor_group))
        self._producer = Producer(idempotent_producer_config(settings.kafka, **{"linger.ms": 5}))
        self.assigned: set[tuple[str, int]] = set()
        self.stages = {"fetch_decode": 0.0, "model": 0.0, "produce_flush": 0.0, "commit": 0.0}
        self.processed = 0
        self.first = FirstConsumed()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="naive-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _on_assign(self, _consumer, partitions) -> None:  # type: ignore[no-untyped-def]
        self.assigned |= {(p.topic, p.partition) for p in partitions}

    def _run(self) -> None:
        self._consumer.subscribe([self._settings.kafka.audio_topic], on_assign=self._on_assign)
        try:
            while not self._stop.is_set():
                message = self._consumer.poll(0.05)
                if message is None:
                    continue
                if message.error() is not None:
                    if message.error().code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(message.error().str())
                    continue
                self.first.mark()
                self._handle(message)
        except BaseException as error:  # surfaced by the caller's timeout message
            self.error = error
            log(f"naive loop failed: {error!r}")
        finally:
            self._consumer.close()
            self._loader.close()

    def _handle(self, message) -> None:  # type: ignore[no-untyped-def]
        from emofleet.processors.events import ClipResult, Lineage, emotion_events

        received = time.monotonic()
        t0 = time.perf_counter()
        reference = self._codec.decode("audio_reference", message.value(), topic=message.topic())
        audio = self._loader.load(reference["uri"])
        if audio.duration_seconds > self._settings.audio.window_seconds:
            raise RuntimeError("the naive loop does not window clips: keep --max-seconds under 30")
        t1 = time.perf_counter()
        prediction = self._model.predict_reference(audio.samples)
        if not self._settings.model.embeddings:
            prediction = replace(prediction, embedding=None)  # as the processor: no embeddings
        t2 = time.perf_counter()
        result = ClipResult(((0.0, audio.duration_seconds),), (prediction,))
        events = emotion_events(reference, Lineage(message.topic(), message.partition(), message.offset()),
                                audio.sha256, result, self._identity, cache_hit=False,
                                processed_at_ms=int(time.time() * 1000),
                                latency_ms=int((time.monotonic() - received) * 1000))
        topic = self._settings.kafka.results_topic
        for event in events:
            self._producer.produce(topic, value=self._codec.encode("emotion_event", event, topic=topic),
                                   key=message.key())
        remaining = self._producer.flush(30)
        if remaining:
            raise RuntimeError(f"{remaining} event(s) not delivered")
        t3 = time.perf_counter()
        self._consumer.commit(message=message, asynchronous=False)
        t4 = time.perf_counter()
        for stage, seconds in zip(self.stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            self.stages[stage] += seconds
        self.processed += 1


def run_naive(settings: Settings, model, uris: list[str], timeout: float) -> RunResult:  # type: ignore[no-untyped-def]
    create_pipeline_topics(settings)
    loop = NaiveLoop(settings, model)
    loop.start()
    try:
        partitions = settings.kafka.partitions
        wait_for(lambda: len(loop.assigned) >= partitions or loop.error is not None, 30, "the naive assignment")
        wall, first_result, started, _watcher = timed_pipeline(settings, uris, timeout)
    finally:
        loop.stop()
        gc.collect()
    first = loop.first.at
    assert first is not None
    return RunResult(NAIVE, len(uris), started + wall - first, started + first_result - first, first - started,
                     dict(loop.stages), {"clips": loop.processed})


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(MODEL_DEFAULTS))
    parser.add_argument("--clips", type=int)
    parser.add_argument("--min-seconds", type=float)
    parser.add_argument("--max-seconds", type=float)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-cache row")
    parser.add_argument("--what-if-batch", default="",
                        help="an extra processor row with these BatchSettings, e.g. max_audio_seconds=24,max_clips=8")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--model-cache", type=Path, default=Path.home() / ".cache" / "emofleet" / "bench",
                        help="where model directories are built once and reused")
    args = parser.parse_args()
    clips, min_s, max_s, rounds = MODEL_DEFAULTS[args.model]
    clips = args.clips or clips
    min_s = args.min_seconds if args.min_seconds is not None else min_s
    max_s = args.max_seconds if args.max_seconds is not None else max_s
    rounds = args.rounds or rounds
    redis_url = require_redis(args.redis_url)
    what_if = {}
    for item in filter(None, args.what_if_batch.split(",")):
        key, _, value = item.partition("=")
        what_if[key.strip()] = type(getattr(BatchSettings(), key.strip()))(value)
    what_if_name = f"{PROCESSOR} (batch {args.what_if_batch})"

    import torch

    log(f"importing funasr and loading the {args.model} model (not timed)...")
    started = time.monotonic()
    model, model_settings = load_bench_model(args.model, args.model_cache)
    forwards = count_forwards(model)
    logging.getLogger("emofleet").setLevel(logging.WARNING)  # no per-run assign/revoke lines
    log(f"model ready in {time.monotonic() - started:.1f} s; torch threads {torch.get_num_threads()}")

    with workspace("emofleet-bench-processor-") as workdir, embedded_broker(workdir) as bootstrap:
        clip_dir = workdir / "clips"
        paths = write_samples(clip_dir, clips, min_seconds=min_s, max_seconds=max_s, seed=11)
        uris = [p.resolve().as_uri() for p in paths]
        import soundfile

        audio_seconds = sum(soundfile.info(str(p)).duration for p in paths)
        log(f"{clips} clips, {audio_seconds:.1f} s of audio ({min_s}-{max_s} s each)")
        # Warm both inference paths once (kernels, allocator, funasr's first-call setup): not timed.
        import numpy as np

        sample = np.zeros(int(min_s * SAMPLE_RATE), dtype=np.float32) + 0.01
        model.predict([sample, sample])
        model.predict_reference(sample)

        per_clip_budget = 0.05 if args.model == "tiny" else 1.5
        timeout = 60 + 4 * per_clip_budget * audio_seconds

        def settings_for(name: str, key_prefix: str | None = None, **batch: object) -> Settings:
            settings = bench_settings(bootstrap, redis_url, name, workdir / "data", file_roots=(clip_dir,),
                                      key_prefix=key_prefix)
            return replace(settings, model=model_settings, batch=replace(settings.batch, **batch))

        results: dict[str, list[RunResult]] = {PROCESSOR: [], WARM: [], NAIVE: []}
        if what_if:
            results[what_if_name] = []
        prefixes: list[str] = []
        try:
            for round_index in range(rounds):
                cold = settings_for("proc")
                prefixes.append(cold.cache.key_prefix)
                runs: list[tuple[str, Callable[[], RunResult]]] = [
                    (PROCESSOR, lambda: run_processor(PROCESSOR, cold, model, uris, timeout, forwards)),
                    (NAIVE, lambda: run_naive(settings_for("naive"), model, uris, timeout)),
                ]
                if what_if:
                    runs.insert(1, (what_if_name, lambda: run_processor(
                        what_if_name, settings_for("what-if", **what_if), model, uris, timeout, forwards)))
                if round_index % 2:
                    runs.reverse()
                if not args.no_warm:  # after the cold run it reuses
                    runs.append((WARM, lambda: run_processor(
                        WARM, settings_for("warm", cold.cache.key_prefix), model, uris, timeout, forwards)))
                for name, run in runs:
                    result = run()
                    results[name].append(result)
                    log(f"round {round_index + 1}/{rounds} {name}: {result.rate:.2f} refs/s "
                        f"({result.seconds:.2f} s, first result {result.first_result_seconds:.2f} s, "
                        f"fetch wait {result.fetch_wait_seconds:.2f} s)")
        finally:
            for prefix in prefixes:
                delete_redis_prefix(redis_url, prefix)

    report(args.model, clips, audio_seconds, min_s, max_s, rounds, results)


def report(model: str, clips: int, audio_seconds: float, min_s: float, max_s: float, rounds: int,
           results: dict[str, list[RunResult]]) -> None:
    results = {k: v for k, v in results.items() if v}
    naive_rate = median([r.rate for r in results[NAIVE]])
    rows = []
    for name, runs in results.items():
        rate = median([r.rate for r in runs])
        rows.append([name, clips, median([r.seconds for r in runs]), rate, f"{rate / naive_rate:.2f}x",
                     median([r.first_result_seconds for r in runs]),
                     median([r.fetch_wait_seconds for r in runs]), ", ".join(f"{r.rate:.1f}" for r in runs)])
    print(f"\n### Processor, model `{model}`: {clips} clips, {audio_seconds:.0f} s of audio ({min_s:g}-{max_s:g} s "
          f"each), {rounds} rounds interleaved, medians ({machine_line()})\n")
    print(markdown_table(["run", "refs", "seconds", "refs/s", "ratio vs naive", "first result s",
                          "fetch wait s (not in seconds)", "refs/s per round"], rows))

    print("\nTime split, fraction of each run's wall time (median over rounds). Processor stages are "
          "emofleet_stage_seconds sums: fetch_decode (fetch + decode) is summed over the fetch pool's threads and overlaps the others; "
          "cache, model and produce run serially on the inference thread. batches = gathered batches, "
          "forwards = batched model forwards the planner cut them into.\n")
    split_rows = []
    for name, runs in results.items():
        stages = runs[0].stages
        cells = [f"{median([r.stages[s] / r.seconds for r in runs]):.1%}" for s in stages]
        detail = ", ".join(f"{s} {median([r.stages[s] for r in runs]):.2f} s" for s in stages)
        counts = ", ".join(f"{k} {median([r.counts.get(k, 0) for r in runs]):g}" for k in runs[0].counts)
        split_rows.append([name, " / ".join(f"{s} {c}" for s, c in zip(stages, cells)), detail, counts])
    print(markdown_table(["run", "fraction of wall", "seconds", "counts"], split_rows))

    processor_rate = median([r.rate for r in results[PROCESSOR]])
    for name in results:
        if name.startswith(f"{PROCESSOR} (batch"):
            print(f"{name}: wall inside the model forward "
                  f"{median([r.stages['model'] / r.seconds for r in results[name]]):.1%}")
    ratio = processor_rate / naive_rate
    model_fraction = median([r.stages["model"] / r.seconds for r in results[PROCESSOR]])
    print()
    if model == "tiny":
        verdict = "PASS" if ratio >= TINY_TARGET_RATIO else "FAIL"
        print(f"processor / naive = **{ratio:.2f}x**; target >= {TINY_TARGET_RATIO:g}x: **{verdict}**")
    else:
        verdict = "PASS" if model_fraction >= LARGE_TARGET_MODEL_FRACTION else "FAIL"
        print(f"processor wall time inside the model forward = **{model_fraction:.1%}**; target >= "
              f"{LARGE_TARGET_MODEL_FRACTION:.0%}: **{verdict}** (processor / naive = {ratio:.2f}x)")


if __name__ == "__main__":
    main()
