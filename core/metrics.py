"""Prometheus metrics, consumer lag, and the /metrics /healthz /readyz HTTP endpoint of every process.

Every metric the fleet exposes is defined here, once, on a :class:`Metrics` object that owns its own
``CollectorRegistry`` (never the global default registry), so one process - or one test - can hold
several. Metrics that belong to another service are created unregistered: code can always call them,
and a process only exposes what it produces.

Names follow the Prometheus conventions (base units, ``_total`` counters, ``_seconds``, ``_bytes``):

=========================================  =====================  ==============================================
name                                       labels                 meaning
=========================================  =====================  ==============================================
emofleet_build_info                        service, version       1
emofleet_messages_in_total                 topic                  messages consumed from Kafka
emofleet_messages_out_total                topic                  messages delivered to Kafka (events, dead letters;
                                                                  the aggregator's observations and heartbeats,
                                                                  aggregates, alerts)
emofleet_dead_letters_total                reason, stage          dead letters written, by machine reason and stage
emofleet_errors_total                      kind                   consumer / commit / delivery / model / worker errors;
                                                                  results the aggregator skipped as undecodable
                                                                  (``malformed``, ``unknown_schema``)
emofleet_stage_seconds (histogram)         stage                  fetch, decode (per clip), cache (per batch), model
                                                                  (per forward), produce (per clip), insert (per table),
                                                                  flush (aggregator producer flushes)
emofleet_end_to_end_seconds (histogram)                           reference produced_at -> result emitted
emofleet_batch_clips (histogram)                                  clips per gathered micro-batch
emofleet_batch_audio_seconds (histogram)                          audio seconds per gathered micro-batch
emofleet_model_batch_windows (histogram)                          windows per model forward pass
emofleet_audio_seconds_total                                      audio seconds run through the model
emofleet_fetch_retries_total                                      transient audio fetch errors retried
emofleet_cache_hits_total / _misses_total                         dedupe cache lookups
emofleet_cache_errors_total                operation              Redis failures (processing goes on without it)
emofleet_in_flight_messages                                       consumed, not yet finished or dropped
emofleet_in_flight_messages_peak                                  the most in flight at once (processor)
emofleet_backpressure_pauses_total                                times in-flight work reached max_in_flight
                                                                  and the processor paused its partitions
emofleet_paused_partitions                                        partitions paused by backpressure (or the sink)
emofleet_assigned_partitions                                      partitions this member owns
emofleet_rebalances_total                  event                  assign / revoke / lost
emofleet_commit_seconds (histogram)        mode                   offset commit latency (sync, async)
emofleet_commit_failures_total                                    offset commits that failed (retried later)
emofleet_consumer_lag_messages             topic, partition       high-water mark - committed offset
emofleet_last_poll_timestamp_seconds                              last turn of the poll loop (stuck consumer)
emofleet_model_load_seconds                                       time to load and verify the model
emofleet_model_info                        model, revision, ...   1
emofleet_gpu_memory_{allocated,reserved,used,total}_bytes  device  GPU memory (processes on a GPU only)
emofleet_gpu_utilization_ratio             device                 GPU busy fraction (needs NVML)
emofleet_sink_inserted_rows_total          table                  rows ClickHouse acknowledged
emofleet_sink_insert_failures_total                               inserts that failed (and are retried)
emofleet_sink_batch_rows (histogram)                              rows per flush
emofleet_sink_skipped_replays_total        by                     messages ClickHouse already had: by
                                                                  ``position`` (re-read after a crash) or
                                                                  ``id`` (a processor's replay)
emofleet_aggregator_observations_total     outcome                observations the aggregate step handled: ``counted``,
                                                                  ``duplicate`` (already counted, a replay) or
                                                                  ``late`` (behind the watermark by more than grace,
                                                                  dropped)
=========================================  =====================  ==============================================

Plus ``process_*`` (CPU, memory, file descriptors) and ``python_info``.

Health: :class:`Health` answers ``/healthz`` (the poll loop turned within ``stall_seconds``; before the
loop starts - model download and load - alive for up to ``startup_seconds``) and ``/readyz``
(the loop runs and every registered check passes: model loaded, broker reachable, partitions assigned,
ClickHouse accepting inserts for the sink).

The aggregator (faust) hooks in the same way::

    metrics = Metrics("aggregator")
    server = serve(settings.observability, metrics,        # None when metrics_port is 0
                   aggregator_health(metrics, settings.kafka.client_config(), settings.observability))

    @app.timer(interval=1.0)                     # liveness + partitions, from faust's event loop
    async def observe() -> None:
        metrics.heartbeat()
        metrics.set_assigned(len(app.consumer.assignment()))

    metrics.messages_in.labels(message.topic).inc()          # in the agent, per event
    metrics.messages_out.labels(kafka.aggregates_topic).inc() # per observation / aggregate / alert sent
    metrics.aggregator_observations.labels("late").inc()      # per observation handled, by outcome
    with metrics.time_stage("flush"): ...                     # any stage name
    metrics.consumer_lag.labels(topic, str(partition)).set(consumer.highwater(tp) - committed)
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                               disable_created_metrics)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from emofleet.core.config import ConfigError, ObservabilitySettings

log = logging.getLogger(__name__)

disable_created_metrics()  # no *_created series: they double the series count and nothing here reads them

TopicPartition = tuple[str, int]
SERVICES = ("processor", "sink", "aggregator", "reader")  # reader: a downstream ResultStream (streams/results.py)
SKIPPED_BY = ("position", "id")  # how the sink knew a message was stored: its Kafka position, its row id
OBSERVATION_OUTCOMES = ("counted", "duplicate", "late")  # what the aggregate step did with an observation

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
END_TO_END_BUCKETS = (.05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
AUDIO_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0)
ROWS_BUCKETS = (1, 10, 100, 1_000, 5_000, 10_000, 20_000, 50_000, 100_000)


class Metrics:
    """All metrics of one process (``service`` = processor, sink, aggregator or reader), in its own registry."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        from importlib.metadata import version

        if service not in SERVICES:
            raise ValueError(f"service {service!r}: use one of {', '.join(SERVICES)}")
        self.service = service
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        everyone = self.registry
        consumers = self.registry  # every service is a consumer-group member
        processor = self.registry if service == "processor" else None
        sink = self.registry if service == "sink" else None
        aggregator = self.registry if service == "aggregator" else None

        Gauge("emofleet_build_info", "emofleet version of this process", ["service", "version"],
              registry=everyone).labels(service, version("emofleet")).set(1)
        self.messages_in = Counter("emofleet_messages_in_total", "Messages consumed from Kafka", ["topic"],
                                   registry=everyone)
        self.messages_out = Counter("emofleet_messages_out_total", "Messages delivered to Kafka (events, dead letters)",
                                    ["topic"], registry=everyone)
        self.dead_letters = Counter("emofleet_dead_letters_total", "Dead letters written, by reason and stage",
                                    ["reason", "stage"], registry=everyone)
        self.errors = Counter("emofleet_errors_total", "Errors by kind (consumer, commit, delivery, model, worker)",
                              ["kind"], registry=everyone)
        self.stage_seconds = Histogram("emofleet_stage_seconds", "Seconds per pipeline stage", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=everyone)
        self.last_poll = Gauge("emofleet_last_poll_timestamp_seconds", "Unix time of the poll loop's last turn",
                               registry=everyone)

        # consumer-group members
        self.in_flight = Gauge("emofleet_in_flight_messages", "Messages consumed and not yet finished or dropped",
                               registry=consumers)
        self.paused_partitions = Gauge("emofleet_paused_partitions", "Partitions paused (backpressure, sink retry)",
                                       registry=consumers)
        self.assigned_partitions = Gauge("emofleet_assigned_partitions", "Partitions assigned to this member",
                                         registry=consumers)
        self.rebalances = Counter("emofleet_rebalances_total", "Rebalance callbacks (assign, revoke, lost)",
                                  ["event"], registry=consumers)
        self.commit_seconds = Histogram("emofleet_commit_seconds", "Offset commit latency", ["mode"],
                                        buckets=LATENCY_BUCKETS, registry=consumers)
        self.commit_failures = Counter("emofleet_commit_failures_total", "Offset commits that failed",
                                       registry=consumers)
        self.consumer_lag = Gauge("emofleet_consumer_lag_messages",
                                  "High-water mark minus committed offset, per assigned partition",
                                  ["topic", "partition"], registry=consumers)

        # processor
        self.end_to_end_seconds = Histogram("emofleet_end_to_end_seconds",
                                            "Reference produced_at to result emitted", buckets=END_TO_END_BUCKETS,
                                            registry=processor)
        self.batch_clips = Histogram("emofleet_batch_clips", "Clips per gathered micro-batch", buckets=COUNT_BUCKETS,
                                     registry=processor)
        self.batch_audio_seconds = Histogram("emofleet_batch_audio_seconds", "Audio seconds per gathered micro-batch",
                                             buckets=AUDIO_BUCKETS, registry=processor)
        self.model_batch_windows = Histogram("emofleet_model_batch_windows", "Windows per model forward pass",
                                             buckets=COUNT_BUCKETS, registry=processor)
        self.audio_seconds = Counter("emofleet_audio_seconds_total", "Audio seconds run through the model",
                                     registry=processor)
        self.fetch_retries = Counter("emofleet_fetch_retries_total", "Transient audio fetch errors retried",
                                     registry=processor)
        self.in_flight_peak = Gauge("emofleet_in_flight_messages_peak", "The most messages in flight at once",
                                    registry=processor)
        self.backpressure_pauses = Counter("emofleet_backpressure_pauses_total",
                                           "Times max_in_flight messages were unsettled and partitions paused",
                                           registry=processor)
        self.cache_hits = Counter("emofleet_cache_hits_total", "Dedupe cache hits", registry=processor)
        self.cache_misses = Counter("emofleet_cache_misses_total", "Dedupe cache misses", registry=processor)
        self.cache_errors = Counter("emofleet_cache_errors_total", "Redis failures by operation", ["operation"],
                                    registry=processor)
        self.model_load_seconds = Gauge("emofleet_model_load_seconds", "Seconds to load and verify the model",
                                        registry=processor)
        self.model_info = Gauge("emofleet_model_info", "The loaded model", ["model", "revision", "device", "precision"],
                                registry=processor)

        # sink
        self.sink_rows = Counter("emofleet_sink_inserted_rows_total", "Rows ClickHouse acknowledged", ["table"],
                                 registry=sink)
        self.sink_insert_failures = Counter("emofleet_sink_insert_failures_total",
                                            "ClickHouse inserts that failed (retried with backoff)", registry=sink)
        self.sink_batch_rows = Histogram("emofleet_sink_batch_rows", "Rows per flush", buckets=ROWS_BUCKETS,
                                         registry=sink)
        self.sink_skipped_replays = Counter("emofleet_sink_skipped_replays_total",
                                            "Messages skipped because ClickHouse already had them, by stored "
                                            "position or stored id", ["by"], registry=sink)
        for by in SKIPPED_BY:
            self.sink_skipped_replays.labels(by)

        # aggregator
        self.aggregator_observations = Counter("emofleet_aggregator_observations_total",
                                               "Observations the aggregate step handled, by outcome (counted, "
                                               "duplicate, late)", ["outcome"], registry=aggregator)
        for outcome in OBSERVATION_OUTCOMES:
            self.aggregator_observations.labels(outcome)

        self._last_beat: float | None = None
        self._assigned = 0
        self.model_loaded = False
        self.clickhouse_ok = True
        self._gpu: GpuCollector | None = None

    # ------------------------------------------------------------ helpers

    def heartbeat(self) -> None:
        """The loop is alive: call on every turn (cheap)."""
        self._last_beat = time.monotonic()
        self.last_poll.set(time.time())

    def seconds_since_heartbeat(self) -> float | None:
        return None if self._last_beat is None else time.monotonic() - self._last_beat

    @contextmanager
    def time_stage(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(stage).observe(time.perf_counter() - started)

    def dead_letter(self, reason: str, stage: str) -> None:
        self.dead_letters.labels(reason, stage).inc()

    def set_assigned(self, count: int) -> None:
        self._assigned = count
        self.assigned_partitions.set(count)

    @property
    def assigned(self) -> int:
        return self._assigned

    def loaded_model(self, model: Any, seconds: float | None) -> None:
        """Record a loaded model (anything with model_id, revision, device, precision)."""
        if seconds is not None:
            self.model_load_seconds.set(seconds)
        device = str(getattr(model, "device", ""))
        self.model_info.labels(getattr(model, "model_id", ""), getattr(model, "revision", ""), device,
                               getattr(model, "precision", "")).set(1)
        if device.startswith("cuda") and self._gpu is None:
            self._gpu = GpuCollector(device)
            self.registry.register(self._gpu)
        self.model_loaded = True

    def render(self, accept: str = "") -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class GpuCollector(Collector):
    """GPU memory and utilisation of the device the model runs on, read at scrape time.

    Lazy: torch is taken from ``sys.modules`` (never imported here) and nothing is reported until CUDA is
    initialised, so reading it never creates a CUDA context. Utilisation needs NVML (``pynvml``); without
    it that one metric is left out.
    """

    def __init__(self, device: str, cuda: Any = None) -> None:
        self._device = device
        self._cuda = cuda
        self._nvml = True

    def _index(self, cuda: Any) -> int:
        _, _, index = self._device.partition(":")
        return int(index) if index else int(cuda.current_device())

    def collect(self) -> Iterable[GaugeMetricFamily]:
        cuda = self._cuda or getattr(sys.modules.get("torch"), "cuda", None)
        try:
            if cuda is None or not cuda.is_available() or not cuda.is_initialized():
                return []
            index = self._index(cuda)
            free, total = cuda.mem_get_info(index)
            values = {
                "allocated": ("Bytes held by tensors of this process", cuda.memory_allocated(index)),
                "reserved": ("Bytes reserved by this process's caching allocator", cuda.memory_reserved(index)),
                "used": ("Bytes in use on the device, all processes", total - free),
                "total": ("Device memory", total),
            }
        except Exception as error:  # a scrape must never fail because of the GPU
            log.debug("GPU metrics unavailable: %s", error)
            return []
        families = []
        for name, (doc, value) in values.items():
            family = GaugeMetricFamily(f"emofleet_gpu_memory_{name}_bytes", doc, labels=["device"])
            family.add_metric([str(index)], float(value))
            families.append(family)
        if self._nvml:
            try:
                utilization = float(cuda.utilization(index)) / 100.0
            except Exception:  # no pynvml / NVML: stop trying
                self._nvml = False
            else:
                family = GaugeMetricFamily("emofleet_gpu_utilization_ratio", "GPU busy fraction (NVML)",
                                           labels=["device"])
                family.add_metric([str(index)], utilization)
                families.append(family)
        return families


class LagMonitor:
    """Consumer lag per assigned partition: high-water mark minus committed offset.

    The high-water mark comes from fetch responses (``get_watermark_offsets(cached=True)``), never from
    a ListOffsets query, which some Kafka-compatible brokers answer wrongly (Tansu's "latest" is the
    start of the last batch + 1); on real Kafka both agree. The committed offset is the last one this
    member committed; for a partition it has not committed yet, the group's committed offset is read
    once per assignment (OffsetFetch). A partition with no committed offset at all counts from its low
    watermark (``auto.offset.reset=earliest``). Only the poll thread calls this.
    """

    def __init__(self, consumer: Any, gauge: Gauge, interval: float) -> None:
        self._consumer = consumer
        self._gauge = gauge
        self._interval = interval
        self._committed: dict[TopicPartition, int | None] = {}  # None: nothing committed, start at low
        self._shown: set[TopicPartition] = set()
        self._next = 0.0

    def committed(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._committed.pop(tp, None)
            if tp in self._shown:
                self._shown.discard(tp)
                try:
                    self._gauge.remove(tp[0], str(tp[1]))
                except KeyError:
                    pass

    def update(self, assigned: Iterable[TopicPartition], *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self._interval
        from confluent_kafka import KafkaException
        from confluent_kafka import TopicPartition as KafkaTP

        assigned = list(assigned)
        unknown = [tp for tp in assigned if tp not in self._committed]
        if unknown:
            try:
                for entry in self._consumer.committed([KafkaTP(t, p) for t, p in unknown], timeout=1.0):
                    if entry.error is None:
                        tp = (entry.topic, entry.partition)
                        self._committed.setdefault(tp, entry.offset if entry.offset >= 0 else None)
            except (KafkaException, RuntimeError) as error:  # broker away: try again next time
                log.debug("committed offsets unavailable for lag: %s", error)
        for tp in assigned:
            if tp not in self._committed:
                continue
            try:
                low, high = self._consumer.get_watermark_offsets(KafkaTP(*tp), cached=True)
            except (KafkaException, RuntimeError):
                continue
            committed = self._committed[tp]
            if committed is None:
                committed = low
            if high < 0 or committed is None or committed < 0:
                continue  # nothing fetched yet: no high-water mark known
            self._gauge.labels(tp[0], str(tp[1])).set(max(0, high - committed))
            self._shown.add(tp)


class CommitTimer:
    """Latency of asynchronous offset commits: request time to the broker's answer (``on_commit``).

    A request is matched to its answer by the exact offsets it carried; synchronous commits are timed
    around the call instead and never registered here, so their callbacks find nothing.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._pending: dict[frozenset[tuple[str, int, int]], float] = {}
        self._lock = threading.Lock()

    def requested(self, offsets: Mapping[TopicPartition, int]) -> None:
        key = frozenset((t, p, o) for (t, p), o in offsets.items())
        with self._lock:
            if len(self._pending) > 1000:  # answers that never came (closed consumer): do not grow
                self._pending.clear()
            self._pending[key] = time.perf_counter()

    def on_commit(self, error: Any, partitions: list[Any]) -> None:
        key = frozenset((p.topic, p.partition, p.offset) for p in partitions or [])
        with self._lock:
            started = self._pending.pop(key, None)
        if started is None:
            return  # a synchronous commit: timed and counted around the call
        if error is not None:
            from confluent_kafka import KafkaError

            if error.code() != KafkaError._NO_OFFSET:  # nothing to commit is no failure
                self._metrics.commit_failures.inc()
            return
        self._metrics.commit_seconds.labels("async").observe(time.perf_counter() - started)


class BrokerProbe:
    """Is the Kafka cluster reachable? A metadata round trip on a separate admin client, cached for ``ttl``.

    Separate so the probe never touches the consumer from the HTTP thread (the consumer is closed by
    its own thread on shutdown).
    """

    def __init__(self, client_config: Mapping[str, Any], *, ttl: float = 2.0, timeout: float = 1.0) -> None:
        self._config = dict(client_config) | {"log_level": 0}
        self._ttl = ttl
        self._timeout = timeout
        self._admin: Any = None
        self._lock = threading.Lock()
        self._checked = -math.inf
        self._ok = False

    def __call__(self) -> bool:
        with self._lock:
            if time.monotonic() - self._checked < self._ttl:
                return self._ok
            try:
                if self._admin is None:
                    from confluent_kafka.admin import AdminClient

                    self._admin = AdminClient(self._config)
                self._admin.list_topics(timeout=self._timeout)
                self._ok = True
            except Exception:
                self._ok = False
            self._checked = time.monotonic()
            return self._ok


class Health:
    """Liveness from the loop's heartbeat; readiness from named checks.

    Alive: the loop turned within ``stall_seconds``, or it has not started yet and the process is younger
    than ``startup_seconds`` (loading or downloading the model), so no separate startup probe is needed.
    """

    def __init__(self, metrics: Metrics, stall_seconds: float, startup_seconds: float = 900.0) -> None:
        self.metrics = metrics
        self.stall_seconds = stall_seconds
        self.startup_seconds = startup_seconds
        self._created = time.monotonic()
        self._checks: dict[str, Callable[[], bool]] = {}

    def require(self, name: str, check: Callable[[], bool]) -> Health:
        self._checks[name] = check
        return self

    def live(self) -> tuple[bool, dict[str, Any]]:
        since = self.metrics.seconds_since_heartbeat()
        if since is None:
            starting = time.monotonic() - self._created
            ok = starting <= self.startup_seconds
            return ok, {"status": "starting" if ok else "never_started", "seconds_starting": round(starting, 3),
                        "startup_seconds": self.startup_seconds}
        ok = since <= self.stall_seconds
        return ok, {"status": "ok" if ok else "stalled", "seconds_since_poll": round(since, 3),
                    "stall_seconds": self.stall_seconds}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        since = self.metrics.seconds_since_heartbeat()
        checks = {"loop_running": since is not None and since <= self.stall_seconds}
        for name, check in self._checks.items():
            try:
                checks[name] = bool(check())
            except Exception:
                checks[name] = False
        ok = all(checks.values())
        return ok, {"ready": ok, "checks": checks}


def processor_health(metrics: Metrics, kafka_client_config: Mapping[str, Any],
                     settings: ObservabilitySettings) -> Health:
    return (Health(metrics, settings.stall_seconds, settings.startup_seconds)
            .require("model_loaded", lambda: metrics.model_loaded)
            .require("broker_reachable", BrokerProbe(kafka_client_config))
            .require("partitions_assigned", lambda: metrics.assigned > 0))


def sink_health(metrics: Metrics, kafka_client_config: Mapping[str, Any],
                settings: ObservabilitySettings) -> Health:
    return (Health(metrics, settings.stall_seconds, settings.startup_seconds)
            .require("broker_reachable", BrokerProbe(kafka_client_config))
            .require("partitions_assigned", lambda: metrics.assigned > 0)
            .require("clickhouse_inserting", lambda: metrics.clickhouse_ok))


def aggregator_health(metrics: Metrics, kafka_client_config: Mapping[str, Any],
                      settings: ObservabilitySettings) -> Health:
    return (Health(metrics, settings.stall_seconds, settings.startup_seconds)
            .require("broker_reachable", BrokerProbe(kafka_client_config))
            .require("partitions_assigned", lambda: metrics.assigned > 0))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class MetricsServer:
    """``/metrics`` (Prometheus text or OpenMetrics), ``/healthz`` and ``/readyz`` (JSON, 200 or 503) on a
    daemon thread. ``port=0`` binds an ephemeral port (see :attr:`port`)."""

    def __init__(self, metrics: Metrics, health: Health, *, host: str = "0.0.0.0", port: int = 0) -> None:
        self.metrics = metrics
        self.health = health
        self._server = _Server((host, port), _handler(metrics, health))
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics and health on port %d (/metrics /healthz /readyz)", self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _handler(metrics: Metrics, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/metrics":
                body, content_type = metrics.render(self.headers.get("Accept", ""))
                self._send(200, body, content_type)
            elif path in ("/healthz", "/readyz"):
                ok, detail = health.live() if path == "/healthz" else health.ready()
                self._send(200 if ok else 503, json.dumps(detail).encode() + b"\n", "application/json")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes are not news
            log.debug("http %s", format % args)

    return Handler


def serve(settings: ObservabilitySettings, metrics: Metrics, health: Health) -> MetricsServer | None:
    """Start the endpoint on ``settings.metrics_port``; None when it is 0 (off)."""
    if not settings.metrics_port:
        return None
    try:
        server = MetricsServer(metrics, health, host=settings.metrics_host, port=settings.metrics_port)
    except OSError as error:
        raise ConfigError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: "
                          f"{error.strerror or error} (EMOFLEET_OBSERVABILITY_METRICS_PORT / --metrics-port)") from None
    return server.start()
