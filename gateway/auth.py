"""API keys -> tenant, and the per-key rate limit shared by every gateway replica.

Keys come from ``EMOFLEET_GATEWAY_API_KEYS`` ("tenant:key,tenant:key") and/or the file named by
``EMOFLEET_GATEWAY_API_KEYS_FILE`` (one ``tenant:key`` per line, ``#`` comments). Only SHA-256 digests of the
keys are held after loading, and a key is never logged: the rate limiter and logs see the digest's prefix.
A request presents its key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

The rate limit is a token bucket per key in Redis (one Lua script: atomic, clocked by Redis's TIME, so every
replica shares one bucket per key): ``rate_per_second`` tokens per second up to ``rate_burst``. When Redis
is unreachable the limiter lets requests through (and counts it): the limit protects capacity, and a dead
Redis must not turn the front door into an outage.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from emofleet.core.config import ConfigError, GatewaySettings

log = logging.getLogger(__name__)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant their key belongs to, and a loggable id of the key."""

    tenant: str
    key_id: str  # the first 12 hex digits of the key's SHA-256: safe in logs and Redis key names


class ApiKeys:
    """Key digests -> tenant. Lookup hashes the presented key, so no comparison leaks a key's prefix."""

    def __init__(self, tenants_by_digest: Mapping[str, str]) -> None:
        self._tenants = dict(tenants_by_digest)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> ApiKeys:
        pairs = list(parse_key_pairs(str(settings.api_keys), "EMOFLEET_GATEWAY_API_KEYS", separator=","))
        if settings.api_keys_file:
            path = Path(settings.api_keys_file)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as error:
                raise ConfigError(f"EMOFLEET_GATEWAY_API_KEYS_FILE={path}: cannot read it ({error.strerror})") from None
            pairs += parse_key_pairs(text, f"EMOFLEET_GATEWAY_API_KEYS_FILE={path}", separator="\n")
        return cls({key_digest(key): tenant for tenant, key in pairs})

    def __len__(self) -> int:
        return len(self._tenants)

    def caller(self, key: str) -> Caller | None:
        digest = key_digest(key)
        tenant = self._tenants.get(digest)
        return None if tenant is None else Caller(tenant, digest[:12])


def parse_key_pairs(text: str, source: str, *, separator: str) -> Iterable[tuple[str, str]]:
    """``tenant:key`` items; the error names the item's position, never its key."""
    for number, raw in enumerate(text.split(separator), start=1):
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        tenant, colon, key = item.partition(":")
        if not colon or not tenant.strip() or len(key.strip()) < 16:
            raise ConfigError(f"{source}: item {number} is not tenant:key with a key of at least 16 characters")
        yield tenant.strip(), key.strip()


def ensure_key_file(path: Path, tenant: str) -> bool:
    """A ``tenant:key`` file with a fresh random key, readable by its owner only, unless ``path`` exists;
    True when it was created (`emofleet up` gives the embedded default a key this way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(f"# API key of `emofleet serve` (send it as Authorization: Bearer <key>)\n"
                     f"{tenant}:{secrets.token_urlsafe(32)}\n")
    return True


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key of a request's headers (Bearer token or X-API-Key), or None."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


# KEYS[1] = bucket; ARGV = rate per second, burst. Returns {allowed (0/1), milliseconds until a token}.
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
"""


class RateLimiter:
    """Token bucket per API key in Redis; :meth:`acquire` returns None (go) or seconds to wait."""

    def __init__(self, client: aioredis.Redis, prefix: str, rate_per_second: float, burst: int,
                 *, on_redis_error: Callable[[], None] = lambda: None) -> None:
        self._client = client
        self._prefix = prefix
        self._rate = rate_per_second
        self._burst = burst
        self._script = client.register_script(_TOKEN_BUCKET)
        self._on_redis_error = on_redis_error

    async def acquire(self, caller: Caller) -> float | None:
        if self._rate <= 0:
            return None
        try:
            allowed, wait_ms = await self._script(keys=[f"{self._prefix}:rate:{caller.key_id}"],
                                                  args=[self._rate, self._burst])
        except RedisError as error:
            self._on_redis_error()
            log.warning("rate limit check failed (%s); letting the request through", type(error).__name__)
            return None
        return None if int(allowed) else max(1, math.ceil(int(wait_ms) / 1000))
