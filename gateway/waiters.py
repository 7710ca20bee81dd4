"""Accepted requests waiting for their result on this replica: bounded, indexed by the Kafka message key.

The results reader (reader.py, its own thread) asks :meth:`Waiters.wanted` for every message key it reads;
only messages of a waiting request are decoded. A request's waiter lives until its result or dead letter is
read or ``async_wait_seconds`` pass; an HTTP handler awaiting it may give up earlier (504 / 202) without
removing it, so a late result is still stored for ``GET /v1/results/{id}``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Full(Exception):
    """As many requests are waiting as this replica holds (``max_waiting``)."""


@dataclass(eq=False)
class Waiter:
    result_id: str
    key: bytes
    tenant: str
    granularity: str
    extract_embedding: bool
    expires: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)  # window events before the summary

    def resolve(self, record: Mapping[str, Any]) -> None:
        """Hand the outcome to the awaiting handler (from any thread)."""
        self.loop.call_soon_threadsafe(_set_result, self.future, dict(record))


def _set_result(future: asyncio.Future[dict[str, Any]], record: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(record)


class Waiters:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._by_id: dict[str, Waiter] = {}
        self._by_key: dict[bytes, set[str]] = defaultdict(set)
        self._lock = threading.Lock()

    def add(self, waiter: Waiter) -> None:
        with self._lock:
            if len(self._by_id) >= self._capacity:
                raise Full(f"{self._capacity} requests are waiting for results on this replica")
            self._by_id[waiter.result_id] = waiter
            self._by_key[waiter.key].add(waiter.result_id)

    def wanted(self, key: bytes | None) -> bool:
        return key is not None and key in self._by_key  # a dict lookup: safe without the lock

    def get(self, result_id: str) -> Waiter | None:
        with self._lock:
            return self._by_id.get(result_id)

    def remove(self, result_id: str) -> Waiter | None:
        with self._lock:
            waiter = self._by_id.pop(result_id, None)
            if waiter is not None:
                ids = self._by_key[waiter.key]
                ids.discard(result_id)
                if not ids:
                    del self._by_key[waiter.key]
            return waiter

    def expire(self, now: float | None = None) -> list[Waiter]:
        """Remove and return the waiters whose time is up."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [w.result_id for w in self._by_id.values() if w.expires <= now]
        return [w for w in map(self.remove, gone) if w is not None]

    def __len__(self) -> int:
        return len(self._by_id)
