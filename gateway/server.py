"""`emofleet serve`: the gateway's parts wired together, on uvicorn."""

from __future__ import annotations

import logging
from typing import Any

from emofleet.core.config import ConfigError, Settings

log = logging.getLogger(__name__)


def build_parts(settings: Settings) -> Any:
    """Every part of a running gateway (Kafka clients, Redis, the reader thread), not yet started."""
    from confluent_kafka.admin import AdminClient

    from emofleet.gateway.app import Parts
    from emofleet.gateway.auth import RateLimiter
    from emofleet.gateway.cache import CachedAnswers, FleetModels
    from emofleet.gateway.metrics import GatewayMetrics
    from emofleet.gateway.pressure import PipelineLag
    from emofleet.gateway.reader import ResultsReader
    from emofleet.gateway.results import Records, StoredResults
    from emofleet.gateway.sender import ReferenceSender
    from emofleet.gateway.uploads import open_uploads
    from emofleet.gateway.waiters import Waiters
    from emofleet.schemas.codec import make_codec
    from emofleet.streams.topics import ensure_topics, pipeline_topics

    keys = api_keys(settings)
    uploads = open_uploads(settings)
    ensure_topics(AdminClient(settings.kafka.client_config()), pipeline_topics(settings.kafka))
    codec = make_codec(settings.kafka.schema_registry_url, settings.kafka.registry_config)
    metrics = GatewayMetrics()
    records = Records(settings)
    limiter = RateLimiter(records.client, f"{settings.cache.key_prefix}:gateway", settings.gateway.rate_per_second,
                          settings.gateway.rate_burst, on_redis_error=metrics.rejections.labels("limiter_down").inc)
    waiters = Waiters(settings.gateway.max_waiting)
    models = FleetModels(settings)

    def outcome(waiter: Any, record: dict[str, Any]) -> None:
        records.store_blocking(waiter.tenant, record)
        waiter.resolve(record)

    reader = ResultsReader(settings.kafka, codec, waiters, outcome, models.saw)
    lag = PipelineLag(settings.kafka)
    sender = ReferenceSender(settings.kafka, codec, delivered=lag.produced)
    cache = CachedAnswers(settings, models)
    stored = StoredResults(settings)
    metrics.waiting.set_function(lambda: len(waiters))
    metrics.pipeline_lag.set_function(lambda: lag.lag or 0)

    def start() -> None:
        reader.start()
        lag.start()

    async def stop() -> None:
        from starlette.concurrency import run_in_threadpool

        def close_blocking() -> None:
            sender.close()
            reader.stop()
            lag.stop()
            cache.close()
            stored.close()

        await run_in_threadpool(close_blocking)
        await records.close()

    return Parts(settings, keys, limiter, waiters, records, stored, cache, uploads, sender, lag, reader, metrics,
                 start, stop)


def run_gateway(settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn finishes requests in progress, then the parts close)."""
    import uvicorn

    from emofleet.gateway.app import create_app
    from emofleet.gateway.uploads import open_uploads

    api_keys(settings)  # configuration mistakes: one error line before the server starts
    open_uploads(settings)
    app = create_app(lambda: build_parts(settings))
    log.info("serving on http://%s:%d (docs at /docs)", settings.gateway.host, settings.gateway.port)
    uvicorn.run(app, host=settings.gateway.host, port=settings.gateway.port, log_config=None, access_log=False,
                # beyond this many open requests uvicorn answers 503 before the app runs: the cheapest shedding
                limit_concurrency=settings.gateway.max_connections,
                timeout_graceful_shutdown=max(5, int(settings.gateway.sync_wait_seconds) + 5))
    return 0


def api_keys(settings: Settings) -> Any:
    from emofleet.gateway.auth import ApiKeys

    keys = ApiKeys.from_settings(settings.gateway)
    if not len(keys):
        raise ConfigError("no API keys: set EMOFLEET_GATEWAY_API_KEYS=tenant:key (key >= 16 characters) or "
                          "EMOFLEET_GATEWAY_API_KEYS_FILE")
    return keys
