"""DeadLetter records: pure construction, shared by every stage that can reject a message."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Lineage:
    """Where a message came from."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Failure:
    """Why a message could not produce results."""

    reason: str  # short machine code, e.g. "not_found", "malformed"
    stage: str  # decode | fetch | audio | model | produce | sink
    error_class: str
    message: str
    attempts: int = 1


def dead_letter(*, key: bytes | None, payload: bytes, headers: Sequence[tuple[str, bytes | None]] | None,
                lineage: Lineage, failure: Failure, reference: Mapping[str, Any] | None, processor: str,
                failed_at_ms: int) -> dict[str, Any]:
    """A DeadLetter record carrying the original bytes and headers, so the message can be replayed.

    Its id is the same whenever the same message fails the same way (a redelivery collapses into one row)
    and differs for another message at the same position: offsets start again from 0 when a topic is
    recreated, so the position alone would make a new log's failure look like an old one's.
    """
    identity = f"{lineage.topic}|{lineage.partition}|{lineage.offset}|{failure.reason}|"
    digest = hashlib.sha256(identity.encode())
    digest.update(key or b"")
    digest.update(b"|")
    digest.update(payload)
    return {
        "dead_letter_id": digest.hexdigest()[:32],
        "source_topic": lineage.topic,
        "source_partition": lineage.partition,
        "source_offset": lineage.offset,
        "key": key,
        "payload": payload,
        "headers": [{"key": k, "value": v} for k, v in headers or []],
        "error_class": failure.error_class,
        "error_message": failure.message[:2000],
        "reason": failure.reason,
        "stage": failure.stage,
        "attempts": failure.attempts,
        "audio_id": (reference or {}).get("audio_id"),
        "uri": (reference or {}).get("uri"),
        "failed_at": failed_at_ms,
        "processor": processor,
    }
