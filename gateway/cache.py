"""The cache answers first: audio the fleet already scored is answered from the processors' Redis cache.

The key is the processors' own (``processors/cache.py``: the content's SHA-256 under a namespace of model id,
revision, granularity and options); the value their :class:`ClipResult`, turned into the same events a processor
would emit (``processors/events.py``) and answered without Kafka. The gateway loads no model, so it learns the
fleet's model identities from the results it reads (:class:`FleetModels`, shared by every replica in Redis);
until a first result has been seen every lookup misses and the request takes the pipeline, whose processors
still answer from the cache.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from emofleet.core.config import Settings
from emofleet.processors.cache import ResultCache, cache_namespace
from emofleet.streams.dead_letters import Lineage

log = logging.getLogger(__name__)

MAX_IDENTITIES = 3  # model identities tried per lookup (a rollout runs two at once)
REFRESH_SECONDS = 5.0
GATEWAY_LINEAGE = Lineage("gateway-cache", -1, -1)  # answers that never passed through Kafka


class FleetModels:
    """The (model id, revision) pairs whose results the fleet produces with this deployment's options."""

    def __init__(self, settings: Settings) -> None:
        self._granularity = settings.model.granularity
        self._embeddings = settings.model.embeddings
        self._ttl_ms = settings.cache.ttl_seconds * 1000
        self._key = f"{settings.cache.key_prefix}:gateway:models"
        self._redis = redis.Redis.from_url(settings.cache.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._last_seen: tuple[str, str] | None = None
        self._known: list[tuple[str, str]] = []
        self._refreshed = -REFRESH_SECONDS

    def saw(self, event: dict[str, Any]) -> None:
        """Note the identity of a result (reader thread); Redis is written when it changes."""
        if event["granularity"] != self._granularity or (event.get("embedding") is not None) != self._embeddings:
            return
        identity = (event["model_id"], event["model_revision"])
        if identity == self._last_seen:
            return
        try:
            self._redis.hset(self._key, json.dumps(identity), int(time.time() * 1000))
            self._last_seen = identity
            self._known = [identity, *(known for known in self._known if known != identity)][:MAX_IDENTITIES]
        except redis.RedisError as error:
            log.warning("could not record the fleet's model identity (%s)", type(error).__name__)

    def current(self) -> list[tuple[str, str]]:
        """Identities seen within the cache TTL, newest first (re-read from Redis every few seconds, and on
        every call while none is known)."""
        now = time.monotonic()
        if now - self._refreshed >= REFRESH_SECONDS or not self._known:
            self._refreshed = now
            try:
                seen = self._redis.hgetall(self._key)
            except redis.RedisError:
                return self._known
            cutoff = time.time() * 1000 - self._ttl_ms
            fresh = sorted(((int(at), tuple(json.loads(identity))) for identity, at in seen.items()
                            if int(at) >= cutoff), reverse=True)
            self._known = [identity for _, identity in fresh[:MAX_IDENTITIES]]  # type: ignore[misc]
        return self._known

    def close(self) -> None:
        self._redis.close()


class CachedAnswers:
    """Looks a content hash up under each of the fleet's identities; builds the events of a hit."""

    def __init__(self, settings: Settings, models: FleetModels) -> None:
        self._settings = settings
        self._models = models
        self._caches: dict[tuple[str, str], ResultCache] = {}

    def events(self, reference: dict[str, Any], sha256: str) -> list[dict[str, Any]] | None:
        """The events a processor would emit for ``reference`` from a cache hit, or None on a miss. Blocking."""
        for identity in self._models.current():
            found = self._cache(identity).get_many([sha256])
            if sha256 in found:
                return self._events(reference, sha256, identity, found[sha256])
        return None

    def _cache(self, identity: tuple[str, str]) -> ResultCache:
        if identity not in self._caches:
            model = self._settings.model
            self._caches[identity] = ResultCache(self._settings.cache, cache_namespace(
                *identity, model.granularity, model.embeddings), owner="gateway")
        return self._caches[identity]

    def _events(self, reference: dict[str, Any], sha256: str, identity: tuple[str, str],
                payload: bytes) -> list[dict[str, Any]]:
        from emofleet.processors.events import ClipResult, ModelIdentity, emotion_events

        model = ModelIdentity(*identity, self._settings.model.granularity, self._settings.model.embeddings)
        return emotion_events(reference, GATEWAY_LINEAGE, sha256, ClipResult.from_bytes(payload), model,
                              cache_hit=True, processed_at_ms=int(time.time() * 1000), latency_ms=0)

    def close(self) -> None:
        for cache in self._caches.values():
            cache.close()
        self._models.close()
