"""Replaying dead letters onto the audio topic: what to replay, with which lineage. Pure; I/O is the caller's.

A replay re-publishes the dead letter's AudioReference with its key and headers, and with its ``produced_at``
and ``audio_id`` unchanged: the processor then derives the same ``event_id`` and the sink the same sort key, so
however often one reference is processed, ClickHouse keeps one row per event (read with ``FINAL``). The lineage
travels in the reference's ``attributes``, which the processor copies onto every EmotionEvent and the sink into
``emotion_events.attributes``:

* ``emofleet.replay.dead_letter_id`` - the dead letter this replay resolves
* ``emofleet.replay.count`` - how many times this reference was replayed (1 on the first replay)
* ``emofleet.replay.attempts`` - processing attempts that failed before, summed over the replays
* ``emofleet.replay.origin`` - ``topic/partition/offset`` of the first failed message (kept across replays)
* ``emofleet.replay.reason`` - the reason of the dead letter replayed

A reference that fails again becomes a new dead letter (a new offset gives a new id) carrying this lineage in
its payload, and can be replayed in turn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

REPLAY_ATTRIBUTE = "emofleet.replay."


@dataclass(frozen=True)
class Verdict:
    """What a replay does with one dead letter: ``replay`` it, or skip it and why."""

    replay: bool
    why: str


def replay_reference(reference: Mapping[str, Any], dead_letter: Mapping[str, Any]) -> dict[str, Any]:
    """``reference`` (the dead letter's decoded payload) with the replay lineage added to its attributes."""
    attributes = dict(reference.get("attributes") or {})
    previous_count = int(attributes.get(f"{REPLAY_ATTRIBUTE}count", "0"))
    previous_attempts = int(attributes.get(f"{REPLAY_ATTRIBUTE}attempts", "0"))
    origin = (attributes.get(f"{REPLAY_ATTRIBUTE}origin")
              or f"{dead_letter['source_topic']}/{dead_letter['source_partition']}/{dead_letter['source_offset']}")
    attributes |= {
        f"{REPLAY_ATTRIBUTE}dead_letter_id": dead_letter["dead_letter_id"],
        f"{REPLAY_ATTRIBUTE}count": str(previous_count + 1),
        f"{REPLAY_ATTRIBUTE}attempts": str(previous_attempts + int(dead_letter["attempts"])),
        f"{REPLAY_ATTRIBUTE}origin": origin,
        f"{REPLAY_ATTRIBUTE}reason": dead_letter["reason"],
    }
    return {**reference, "attributes": attributes}


def verdict(dead_letter: Mapping[str, Any], reference: Mapping[str, Any] | None, decode_error: str | None, *,
            audio_topic: str, stored: bool, replayed_before: bool) -> Verdict:
    """Replay or skip. ``stored``: ClickHouse already has a result for this reference (``audio_id`` and
    ``produced_at``); ``replayed_before``: the replay log holds this dead letter."""
    if dead_letter["source_topic"] != audio_topic:
        return Verdict(False, f"came from {dead_letter['source_topic']}, not the audio topic {audio_topic}")
    if reference is None:
        return Verdict(False, f"payload is no AudioReference ({decode_error})")
    if stored:
        return Verdict(False, "already has a result")
    if replayed_before:
        return Verdict(False, "already replayed")
    return Verdict(True, "replay")


def replay_log_key(key_prefix: str, dead_letter_id: str) -> str:
    """The Redis key that marks a dead letter replayed (SET NX: a second replay of it is a no-op)."""
    return f"{key_prefix}:replayed:{dead_letter_id}"
