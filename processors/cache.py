"""The dedupe cache in Redis: results keyed by audio content and model, plus in-flight claims.

Key = ``<prefix>:r:<namespace>:<sha256 of the audio bytes>`` where the namespace hashes model id,
revision, granularity and options, so a model upgrade never serves stale results. A claim
(``SET NX EX``) tells other members "I am computing this clip"; they wait for the result instead of
computing it too. Redis is an optimisation, never a dependency: when it fails the cache reports a
miss, counts the error, and skips Redis for ``cooldown`` seconds so a dead server costs one timeout,
not one per batch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable

import redis

from emofleet.core.config import CacheSettings
from emofleet.core.metrics import Metrics

log = logging.getLogger(__name__)

# One command per batch instead of two per clip: redis-py spends ~15 us of Python per pipelined command,
# and the inference thread that pays it holds the GIL the whole data path shares.
_CLAIM = """
local owners = {}
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[1], 'NX', 'EX', ARGV[2])
  owners[i] = redis.call('GET', key)
end
return owners
"""
_STORE = """
local ttl = ARGV[1]
for i = 1, #KEYS, 2 do
  redis.call('SET', KEYS[i], ARGV[(i + 1) / 2 + 1], 'EX', ttl)
  redis.call('DEL', KEYS[i + 1])
end
return #KEYS / 2
"""


def cache_namespace(model_id: str, revision: str, granularity: str, embeddings: bool) -> str:
    """Everything that changes a result, hashed into a short key part."""
    text = f"{model_id}|{revision}|{granularity}|embeddings={embeddings}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResultCache:
    def __init__(self, settings: CacheSettings, namespace: str, owner: str, *, cooldown: float = 5.0,
                 metrics: Metrics | None = None) -> None:
        self._metrics = metrics or Metrics("processor")
        self._settings = settings
        self._prefix = f"{settings.key_prefix}:{namespace}"
        self._owner = owner.encode()
        self._cooldown = cooldown
        self._down_until = 0.0
        self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._claim = self._redis.register_script(_CLAIM)
        self._store = self._redis.register_script(_STORE)

    def result_key(self, sha256: str) -> str:
        return f"{self._prefix}:r:{sha256}"

    def claim_key(self, sha256: str) -> str:
        return f"{self._prefix}:c:{sha256}"

    @property
    def available(self) -> bool:
        return self._settings.enabled and time.monotonic() >= self._down_until

    def get_many(self, shas: list[str]) -> dict[str, bytes]:
        """Cached results for the given content hashes (one MGET); a Redis failure reads as all-miss."""
        if not shas or not self.available:
            return {}
        try:
            values = self._redis.mget([self.result_key(s) for s in shas])
        except redis.RedisError as error:
            self._failed("lookup", error)
            return {}
        found = {sha: value for sha, value in zip(shas, values, strict=True) if value is not None}
        self._metrics.cache_hits.inc(len(found))
        self._metrics.cache_misses.inc(len(shas) - len(found))
        return found

    def claim_many(self, shas: Iterable[str]) -> set[str]:
        """Claim clips for computing; returns those claimed by another member (wait for their result).

        Without Redis every clip counts as ours: computing twice beats waiting on a dead cache.
        """
        shas = list(shas)
        if not shas or not self.available:
            return set()
        try:
            owners = self._claim(keys=[self.claim_key(sha) for sha in shas],
                                 args=[self._owner, self._settings.claim_seconds])
        except redis.RedisError as error:
            self._failed("claim", error)
            return set()
        return {sha for sha, owner in zip(shas, owners, strict=True) if owner not in (None, self._owner)}

    def put_many(self, results: dict[str, bytes]) -> None:
        """Store results with the TTL and release our claims on them."""
        if not results or not self.available:
            return
        keys = [key for sha in results for key in (self.result_key(sha), self.claim_key(sha))]
        try:
            self._store(keys=keys, args=[self._settings.ttl_seconds, *results.values()])
        except redis.RedisError as error:
            self._failed("store", error)

    def release(self, shas: Iterable[str]) -> None:
        """Drop our claims on clips we will not compute after all (failed or revoked)."""
        keys = [self.claim_key(s) for s in shas]
        if not keys or not self.available:
            return
        try:
            self._redis.delete(*keys)
        except redis.RedisError as error:
            self._failed("release", error)

    def _failed(self, operation: str, error: redis.RedisError) -> None:
        self._metrics.cache_errors.labels(operation).inc()
        self._down_until = time.monotonic() + self._cooldown
        log.warning("Redis %s failed (%s); processing continues without the cache for %.0fs",
                    operation, type(error).__name__, self._cooldown)

    def close(self) -> None:
        self._redis.close()
