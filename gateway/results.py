"""Where answers are kept and found: Redis for the recent ones, ClickHouse for everything stored.

Every accepted request gets a record in Redis (``<prefix>:gateway:result:<id>``, ``result_ttl_seconds``):
``pending`` with its tenant before its reference is produced, then the answer or the failure, written by the
replica that read it. ``GET /v1/results/{id}`` on any replica reads the record; while it is pending, or once it
expired, it asks ClickHouse (the sink stores every result and dead letter), so an accepted request can still be
fetched after the replica that accepted it restarted. A record of another tenant reads as not found.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from emofleet.core.config import Settings
from emofleet.gateway.answers import PENDING, answer_from_events, events_from_rows, failure

log = logging.getLogger(__name__)

QueryRunner = Callable[[str, dict[str, Any]], list[dict[str, Any]]]


class Records:
    def __init__(self, settings: Settings) -> None:
        self._prefix = f"{settings.cache.key_prefix}:gateway:result"
        self._ttl = settings.gateway.result_ttl_seconds
        url = settings.cache.redis_url
        self._async = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._sync = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)

    def _key(self, result_id: str) -> str:
        return f"{self._prefix}:{result_id}"

    async def pending(self, result_id: str, tenant: str, call_id: str | None) -> None:
        """Before the reference is produced; a Redis failure fails the request (nothing was sent yet)."""
        record = {"id": result_id, "status": PENDING, "tenant": tenant, "call_id": call_id}
        await self._async.set(self._key(result_id), json.dumps(record), ex=self._ttl, nx=True)

    async def store(self, tenant: str, record: dict[str, Any]) -> None:
        await self._async.set(self._key(record["id"]), json.dumps({**record, "tenant": tenant}), ex=self._ttl)

    def store_blocking(self, tenant: str, record: dict[str, Any]) -> None:
        """From the results reader's thread; a failure is logged (ClickHouse still has the result)."""
        try:
            self._sync.set(self._key(record["id"]), json.dumps({**record, "tenant": tenant}), ex=self._ttl)
        except redis.RedisError as error:
            log.warning("could not keep the answer of %s in Redis (%s)", record["id"], type(error).__name__)

    async def get(self, result_id: str, tenant: str) -> dict[str, Any] | None:
        raw = await self._async.get(self._key(result_id))
        record = None if raw is None else json.loads(raw)
        if record is None or record.get("tenant") != tenant:
            return None
        return record

    async def ping(self) -> bool:
        try:
            return bool(await self._async.ping())
        except redis.RedisError:
            return False

    @property
    def client(self) -> aioredis.Redis:
        return self._async

    async def close(self) -> None:
        await self._async.aclose()
        self._sync.close()


class StoredResults:
    """Results and dead letters from ClickHouse (blocking; the app runs it on a worker thread)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._db = settings.clickhouse.database
        self._direct: QueryRunner | None = None
        self._client: Any = None

    def _runner(self) -> QueryRunner | None:
        """The embedded chDB through the sink that owns it (None while no sink runs); a server directly."""
        from emofleet.sinks.query_server import direct_runner, owner_runner

        dsn = self._settings.clickhouse_dsn
        if dsn.startswith("chdb://"):  # chDB: one process per directory, the sink's; never open it here
            return owner_runner(self._settings.data_dir, timeout=10.0)
        if self._direct is None:
            from emofleet.sinks.clickhouse import connect

            self._client = connect(self._settings.clickhouse, dsn)
            self._direct = direct_runner(self._client)
        return self._direct

    def answer(self, result_id: str, tenant: str, *, owner_known: bool) -> dict[str, Any] | None:
        """The stored answer or failure; ``owner_known``: Redis still says ``tenant`` owns the id (the
        dead_letters table has no tenant column, so without it the dead letter's payload must prove it)."""
        run = self._runner()
        if run is None:
            return None
        rows = run(f"SELECT * FROM {self._db}.emotion_events FINAL WHERE audio_id = {{id:String}} "
                   f"AND tenant = {{tenant:String}} ORDER BY segment_index", {"id": result_id, "tenant": tenant})
        if rows:
            return answer_from_events(result_id, events_from_rows(rows), granularity="utterance",
                                      extract_embedding=bool(rows[0].get("embedding")))
        dead = run(f"SELECT reason, error_message, payload FROM {self._db}.dead_letters FINAL "
                   f"WHERE audio_id = {{id:String}} LIMIT 1", {"id": result_id})
        if dead and (owner_known or self._tenant_of(dead[0].get("payload")) == tenant):
            return failure(result_id, dead[0]["reason"], dead[0]["error_message"])
        return None

    def _tenant_of(self, payload: Any) -> str | None:
        """The tenant of a dead letter's original reference (dead_letters has no tenant column)."""
        from emofleet.schemas.codec import make_codec

        data = payload.encode("latin-1") if isinstance(payload, str) else payload
        if not data:
            return None
        try:
            codec = make_codec(self._settings.kafka.schema_registry_url, self._settings.kafka.registry_config)
            return codec.decode("audio_reference", bytes(data), topic=self._settings.kafka.audio_topic).get("tenant")
        except Exception:  # noqa: BLE001 - an unreadable payload proves no ownership
            return None

    def by_call(self, tenant: str, call_id: str, limit: int) -> list[dict[str, Any]] | None:
        """Whole-clip answers of one call, oldest first; None while the store is unreachable."""
        run = self._runner()
        if run is None:
            return None
        rows = run(f"SELECT * FROM {self._db}.emotion_events FINAL WHERE tenant = {{tenant:String}} "
                   f"AND call_id = {{call:String}} AND segment_index = -1 ORDER BY reference_produced_at "
                   f"LIMIT {{limit:UInt32}}", {"tenant": tenant, "call": call_id, "limit": limit})
        return [answer_from_events(row["audio_id"], events_from_rows([row]), granularity="utterance",
                                   extract_embedding=False) for row in rows]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
