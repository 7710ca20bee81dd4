"""`emofleet process`: one member of the processor consumer group, wired from settings."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

from confluent_kafka import Producer

from emofleet.processors.model import EmotionModel, load_model
from emofleet.processors.step import InferenceSteps
from emofleet.schemas.codec import make_codec
from emofleet.core.config import Settings, describe
from emofleet.streams.consumer import ConsumerLoop, LoopLimits, consumer_config
from emofleet.core.logs import kafka_logger
from emofleet.core.metrics import Metrics, processor_health, serve
from emofleet.streams.producer import idempotent_producer_config

log = logging.getLogger(__name__)


@dataclass
class Processor:
    loop: ConsumerLoop
    steps: InferenceSteps

    @property
    def metrics(self) -> Metrics:
        return self.steps.metrics

    def run(self) -> None:
        """Consume until :meth:`stop`; then release what the steps share."""
        try:
            self.loop.run()
        finally:
            self.steps.close()

    def stop(self) -> None:
        self.loop.stop()


def member_id(settings: Settings) -> str:
    return settings.kafka.group_instance_id or f"{socket.gethostname()}-{os.getpid()}"


def loop_limits(settings: Settings) -> LoopLimits:
    batch = settings.batch
    return LoopLimits(max_in_flight=batch.max_in_flight, commit_interval_seconds=batch.commit_interval_seconds,
                      join_timeout_seconds=batch.revoke_grace_seconds)


def build_processor(settings: Settings, model: EmotionModel | None = None, metrics: Metrics | None = None) -> Processor:
    metrics = metrics or Metrics("processor")
    load_seconds = None
    if model is None:
        started = time.monotonic()
        model = load_model(settings.model, cache_dir=settings.data_dir / "models")
        load_seconds = time.monotonic() - started
    metrics.loaded_model(model, load_seconds)
    codec = make_codec(settings.kafka.schema_registry_url, settings.kafka.registry_config)
    producer = Producer(idempotent_producer_config(settings.kafka, **{"linger.ms": 5, "logger": kafka_logger()}))
    steps = InferenceSteps(settings, model, codec, producer, processor_id=member_id(settings), metrics=metrics)
    loop = ConsumerLoop(consumer_config(settings.kafka, settings.kafka.processor_group), [settings.kafka.audio_topic],
                        steps, loop_limits(settings), metrics=metrics,
                        lag_interval=settings.observability.lag_interval_seconds,
                        leave_group=settings.kafka.leave_group_on_close)
    return Processor(loop, steps)


def run_processor(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT: then stop fetching, finish the batch, flush, commit, exit 0.

    The handlers go in before the (slow) model load, so a stop request during loading exits cleanly too.
    """
    stop_requested = threading.Event()
    processor: Processor | None = None

    def request_stop(*_: object) -> None:
        stop_requested.set()
        if processor is not None:
            processor.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    log.info("starting processor %s with settings %s", member_id(settings), json.dumps(describe(settings)))
    metrics = Metrics("processor")
    server = serve(settings.observability, metrics, processor_health(
        metrics, settings.kafka.client_config(), settings.observability))  # up before the model loads
    try:
        processor = build_processor(settings, metrics=metrics)
        if stop_requested.is_set():
            return 0
        log.info("processor %s consuming %s as group %s", processor.steps.processor_id, settings.kafka.audio_topic,
                 settings.kafka.processor_group)
        processor.run()
    finally:
        if server is not None:
            server.stop()
    return 0
