"""Event-time windows, aggregates, close decisions and alert rules of `emofleet aggregate`, as pure values.

No faust and no Kafka here: :mod:`emofleet.streams.aggregator` stores these values in faust tables and
publishes what they produce. Every function is deterministic, so replaying the same input gives the
same state and the same output records (the basis of exactness under at-least-once, see the
aggregator's module docstring).

Definitions (times are epoch milliseconds, event time = ``EmotionEvent.reference_produced_at``):

* **Scopes**: ``source`` (tenant + source), ``channel`` (tenant + channel), ``call`` (tenant + call_id).
  An event without a tenant, or without the scope's field, is not part of that scope. Only whole-clip
  events (``segment_index == -1``) are aggregated.
* **Windows**: tumbling (``size``) and hopping (``size`` every ``hop``), aligned to the epoch; an event at
  ``t`` belongs to every window with ``start <= t < end``.
* **Lanes and watermark**: the results topic's partitions are the *lanes*. Each aggregator partition
  tracks every lane's largest event time (from its observations, and from heartbeats the router sends
  to every aggregator partition) and whether the lane is idle (read to its end). The watermark is the
  smallest maximum over the non-idle lanes (the largest maximum when all are idle), never decreasing,
  and unknown until every lane has reported. So a lane that lags (catch-up after downtime, a slow
  processor) holds the watermark back instead of having its events dropped as late.
* **Late**: an event is late when ``t + grace < watermark``. Late events are dropped from *all* their
  windows (never half-counted) and counted as late.
* **Close**: a window closes when ``watermark >= end + grace``. No event that is not late can fall into a
  closed window (``t < end`` and ``end + grace <= watermark`` give ``t + grace < watermark``), so a
  closed window's counts are final and it is emitted once, under a deterministic ``aggregate_id``.
* **Rule (a) "negativity"**: a window of a source (hopping by default) with ``clips >= min_clips`` and
  ``negativity >= threshold``. Evaluated on every update while the window is open, fires at most once
  per window (flag in the window's state, deterministic ``alert_id``).
* **Rule (b) "angry_streak"**: ``k`` clips in a row labelled angry within one call, in event-time order
  (ties by event_id). Judged only on the *final* prefix of the call's clips (``t + grace < watermark``:
  no later event can still be inserted before them), so out-of-order arrival cannot create or break a
  streak after the fact. Fires once per streak (a streak longer than ``k`` is one breach).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from emofleet.schemas.emotions import EMOTIONS, NEGATIVE_LABELS

_NEGATIVE_INDEXES = tuple(i for i, name in enumerate(EMOTIONS) if name in NEGATIVE_LABELS)
_LABEL_INDEX = {name: i for i, name in enumerate(EMOTIONS)}

CONFIDENCE_UNITS = 2**27
"""Confidences are summed as integers of 2**-27: exact for every float32 in [1/16, 1] (a top score of
nine classes is >= 1/9), so sums, and the mean, do not depend on the order events arrive in."""

SCOPE_KINDS: tuple[str, ...] = ("source", "channel", "call")
_SCOPE_FIELD = {"source": "source", "channel": "channel", "call": "call_id"}


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------ windows


@dataclass(frozen=True)
class WindowSpec:
    """A family of windows: ``kind`` "tumbling" (hop == size) or "hopping"; sizes in milliseconds."""

    kind: str
    size_ms: int
    hop_ms: int

    def __post_init__(self) -> None:
        if self.kind not in ("tumbling", "hopping"):
            raise ValueError(f"window kind must be tumbling or hopping, not {self.kind!r}")
        if self.size_ms <= 0 or self.hop_ms <= 0 or self.hop_ms > self.size_ms:
            raise ValueError(f"{self.kind} window needs 0 < hop <= size (size {self.size_ms} ms, hop {self.hop_ms} ms)")
        if self.kind == "tumbling" and self.hop_ms != self.size_ms:
            raise ValueError("a tumbling window's hop equals its size")

    def windows(self, t: int) -> list[tuple[int, int]]:
        """``(start, end)`` of every window containing ``t``, oldest first."""
        last = (t // self.hop_ms) * self.hop_ms
        first = last - ((self.size_ms - 1) // self.hop_ms) * self.hop_ms
        return [(start, start + self.size_ms) for start in range(first, last + 1, self.hop_ms) if start + self.size_ms > t]

    def to_list(self) -> list[Any]:
        return [self.kind, self.size_ms, self.hop_ms]

    @classmethod
    def from_list(cls, value: Iterable[Any]) -> WindowSpec:
        kind, size, hop = value
        return cls(str(kind), int(size), int(hop))


def window_specs(tumbling_seconds: int, hopping_seconds: int, hop_seconds: int) -> tuple[WindowSpec, ...]:
    """The configured window families (a size of 0 disables a family); at least one is required."""
    specs = []
    if tumbling_seconds:
        specs.append(WindowSpec("tumbling", tumbling_seconds * 1000, tumbling_seconds * 1000))
    if hopping_seconds:
        specs.append(WindowSpec("hopping", hopping_seconds * 1000, hop_seconds * 1000))
    if not specs:
        raise ValueError("configure at least one window (tumbling_seconds or hopping_seconds > 0)")
    return tuple(specs)


def is_late(t: int, watermark: int | None, grace_ms: int) -> bool:
    """Late = more than ``grace_ms`` behind the watermark (see the module docstring)."""
    return watermark is not None and t + grace_ms < watermark


def closes_at(end: int, grace_ms: int) -> int:
    """The watermark at which a window ending at ``end`` is closed (``watermark >= closes_at``)."""
    return end + grace_ms


@dataclass(frozen=True)
class Progress:
    """Event-time progress of the lanes feeding one aggregator partition, and the resulting watermark."""

    lanes: int
    maxima: tuple[tuple[int, int], ...] = ()  # (lane, largest event time seen), sorted by lane
    idle: frozenset[int] = frozenset()
    watermark: int | None = None

    def observe(self, lane: int, t: int) -> Progress:
        """An observation from ``lane`` at event time ``t`` (the lane is busy again if it was idle)."""
        return self.heartbeat(lane, t, idle=False)

    def heartbeat(self, lane: int, t: int | None, idle: bool) -> Progress:
        """The router's report: ``lane`` has reached ``t`` (None: nothing read yet) and is or is not idle."""
        maxima = dict(self.maxima)
        if t is not None:
            maxima[lane] = max(t, maxima.get(lane, t))
        idle_lanes = self.idle | {lane} if idle else self.idle - {lane}
        return Progress(self.lanes, tuple(sorted(maxima.items())), frozenset(idle_lanes),
                        _combine(self.watermark, self.lanes, maxima, idle_lanes))

    def to_dict(self) -> dict[str, Any]:
        return {"lanes": self.lanes, "maxima": [list(m) for m in self.maxima], "idle": sorted(self.idle),
                "wm": self.watermark}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Progress:
        return cls(int(value["lanes"]), tuple((int(q), int(t)) for q, t in value["maxima"]),
                   frozenset(int(q) for q in value["idle"]), None if value["wm"] is None else int(value["wm"]))


def _combine(previous: int | None, lanes: int, maxima: Mapping[int, int], idle: frozenset[int]) -> int | None:
    busy = [q for q in set(range(lanes)) | set(maxima) if q not in idle]
    if any(q not in maxima for q in busy):
        return previous  # a lane has not reported yet: it may still bring anything
    candidate = min(maxima[q] for q in busy) if busy else max(maxima.values(), default=None)
    if candidate is None:
        return previous
    return candidate if previous is None else max(previous, candidate)


# ------------------------------------------------------------------------------------ scopes, observations


@dataclass(frozen=True, order=True)
class Scope:
    kind: str
    tenant: str
    value: str

    @property
    def key(self) -> str:
        """Unambiguous string form (the Kafka key of the scope's observations)."""
        return json.dumps([self.kind, self.tenant, self.value], separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_key(cls, key: str) -> Scope:
        kind, tenant, value = json.loads(key)
        return cls(kind, tenant, value)


def scopes_of(event: Mapping[str, Any]) -> list[Scope]:
    """The scopes an EmotionEvent counts in; empty or missing tenant/field skips the scope."""
    tenant = event.get("tenant")
    if not tenant:
        return []
    return [Scope(kind, tenant, event[name]) for kind, name in _SCOPE_FIELD.items() if event.get(name)]


@dataclass(frozen=True)
class Observation:
    """One whole-clip event as one scope sees it: what the aggregation needs, nothing more."""

    scope: Scope
    event_id: str
    t: int
    label: str
    confidence: float
    lane: int = 0  # the results-topic partition the event came from

    def to_dict(self) -> dict[str, Any]:
        return {"scope": self.scope.key, "event_id": self.event_id, "t": self.t, "label": self.label,
                "confidence": self.confidence, "lane": self.lane}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Observation:
        return cls(Scope.from_key(value["scope"]), value["event_id"], int(value["t"]), value["label"],
                   float(value["confidence"]), int(value["lane"]))


def observations(event: Mapping[str, Any], lane: int = 0) -> list[Observation]:
    """One observation per scope of a whole-clip EmotionEvent; window events (segment_index >= 0) give none."""
    if event["segment_index"] != -1:
        return []
    return [Observation(scope, event["event_id"], int(event["reference_produced_at"]), event["label"],
                        float(event["confidence"]), lane) for scope in scopes_of(event)]


# ------------------------------------------------------------------------------------ window aggregates


@dataclass(frozen=True)
class WindowAgg:
    """Running aggregate of one scope in one window; ``alerted``: rule (a) already fired for it."""

    scope: Scope
    spec: WindowSpec
    start: int
    end: int
    counts: tuple[int, ...] = (0,) * len(EMOTIONS)
    clips: int = 0
    confidence_units: int = 0
    first_event_at: int = 0
    last_event_at: int = 0
    alerted: bool = False

    def add(self, obs: Observation) -> WindowAgg:
        if not self.start <= obs.t < self.end:
            raise ValueError(f"event at {obs.t} is outside window [{self.start}, {self.end})")
        counts = list(self.counts)
        counts[_LABEL_INDEX.get(obs.label, len(EMOTIONS) - 1)] += 1
        first = obs.t if self.clips == 0 else min(self.first_event_at, obs.t)
        return replace(self, counts=tuple(counts), clips=self.clips + 1,
                       confidence_units=self.confidence_units + round(obs.confidence * CONFIDENCE_UNITS),
                       first_event_at=first, last_event_at=max(self.last_event_at, obs.t) if self.clips else obs.t)

    @property
    def negative_clips(self) -> int:
        return sum(self.counts[i] for i in _NEGATIVE_INDEXES)

    @property
    def negativity(self) -> float:
        return self.negative_clips / self.clips if self.clips else 0.0

    @property
    def mean_confidence(self) -> float:
        return self.confidence_units / CONFIDENCE_UNITS / self.clips if self.clips else 0.0

    @property
    def aggregate_id(self) -> str:
        return aggregate_id(self.scope, self.spec, self.start)

    def record(self) -> dict[str, Any]:
        """The EmotionAggregate Avro record (schemas/emotion_aggregate.avsc)."""
        return {
            "aggregate_id": self.aggregate_id, "scope": self.scope.kind, "tenant": self.scope.tenant,
            "scope_value": self.scope.value, "window_type": self.spec.kind,
            "window_size_seconds": self.spec.size_ms // 1000, "window_hop_seconds": self.spec.hop_ms // 1000,
            "window_start": self.start, "window_end": self.end, "clips": self.clips,
            "label_counts": dict(zip(EMOTIONS, self.counts, strict=True)),
            "mean_confidence": self.mean_confidence, "negativity": self.negativity,
            "first_event_at": self.first_event_at, "last_event_at": self.last_event_at,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"scope": self.scope.key, "spec": self.spec.to_list(), "start": self.start, "end": self.end,
                "counts": list(self.counts), "clips": self.clips, "confidence_units": self.confidence_units,
                "first": self.first_event_at, "last": self.last_event_at, "alerted": self.alerted}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> WindowAgg:
        return cls(Scope.from_key(value["scope"]), WindowSpec.from_list(value["spec"]), int(value["start"]),
                   int(value["end"]), tuple(int(c) for c in value["counts"]), int(value["clips"]),
                   int(value["confidence_units"]), int(value["first"]), int(value["last"]), bool(value["alerted"]))


def aggregate_id(scope: Scope, spec: WindowSpec, start: int) -> str:
    return _digest("aggregate", scope.kind, scope.tenant, scope.value, spec.kind, spec.size_ms, spec.hop_ms, start)


# ------------------------------------------------------------------------------------ rule (a): negativity


@dataclass(frozen=True)
class NegativityRule:
    threshold: float = 0.6
    min_clips: int = 5
    window_kind: str = "hopping"

    def applies(self, agg: WindowAgg) -> bool:
        return agg.scope.kind == "source" and agg.spec.kind == self.window_kind

    def breached(self, agg: WindowAgg) -> bool:
        """True when the rule should fire now: breach and no alert for this window yet."""
        return (not agg.alerted and self.applies(agg) and agg.clips >= self.min_clips
                and agg.negativity >= self.threshold)

    def alert(self, agg: WindowAgg) -> dict[str, Any]:
        """The EmotionAlert record (schemas/emotion_alert.avsc); one alert_id per source and window."""
        scope = agg.scope
        return {
            "alert_id": _digest("negativity", scope.kind, scope.tenant, scope.value, agg.spec.kind,
                                agg.spec.size_ms, agg.spec.hop_ms, agg.start),
            "rule": "negativity", "scope": scope.kind, "tenant": scope.tenant, "scope_value": scope.value,
            "window_start": agg.start, "window_end": agg.end, "clips": agg.clips, "value": agg.negativity,
            "threshold": self.threshold, "min_clips": self.min_clips, "event_ids": [],
            "message": f"negativity {agg.negativity:.2f} >= {self.threshold:g} over {agg.clips} clips of source "
                       f"{scope.tenant}/{scope.value} in the {agg.spec.kind} window starting {agg.start}",
        }


# ------------------------------------------------------------------------------------ rule (b): angry streaks


@dataclass(frozen=True)
class Streak:
    """A breach of rule (b): the first ``k`` clips, ``(t, event_id)`` in event-time order, of an angry run."""

    scope: Scope
    clips: tuple[tuple[int, str], ...]

    def alert(self, k: int) -> dict[str, Any]:
        scope = self.scope
        return {
            "alert_id": _digest("angry_streak", scope.kind, scope.tenant, scope.value, self.clips[0][1]),
            "rule": "angry_streak", "scope": scope.kind, "tenant": scope.tenant, "scope_value": scope.value,
            "window_start": self.clips[0][0], "window_end": self.clips[-1][0], "clips": len(self.clips),
            "value": float(len(self.clips)), "threshold": float(k), "min_clips": k,
            "event_ids": [event_id for _, event_id in self.clips],
            "message": f"{len(self.clips)} angry clips in a row in call {scope.tenant}/{scope.value}",
        }


@dataclass(frozen=True)
class CallRun:
    """Rule (b) state of one call: clips not final yet (sorted by ``(t, event_id)``), and the angry run at
    the end of the final prefix (its first ``k`` clips, its length, whether it already fired)."""

    scope: Scope
    pending: tuple[tuple[int, str, bool], ...] = ()
    run: tuple[tuple[int, str], ...] = ()
    run_length: int = 0
    fired: bool = False
    last_final_t: int | None = None
    last_event: str = ""

    def add(self, obs: Observation) -> CallRun:
        item = (obs.t, obs.event_id, obs.label == "angry")
        pending = list(self.pending)
        if any(p[1] == obs.event_id for p in pending):
            return replace(self, last_event=obs.event_id)
        bisect.insort(pending, item)
        return replace(self, pending=tuple(pending), last_event=obs.event_id)

    def finalize(self, watermark: int, grace_ms: int, k: int) -> tuple[CallRun, list[Streak]]:
        """Move the clips that became final (``t + grace < watermark``) into the run; streaks that reach ``k``."""
        final = [p for p in self.pending if p[0] + grace_ms < watermark]
        if not final:
            return self, []
        run, length, fired = list(self.run), self.run_length, self.fired
        streaks = []
        for t, event_id, angry in final:
            if not angry:
                run, length, fired = [], 0, False
                continue
            length += 1
            if len(run) < k:
                run.append((t, event_id))
            if length >= k and not fired:
                streaks.append(Streak(self.scope, tuple(run[:k])))
                fired = True
        return replace(self, pending=self.pending[len(final):], run=tuple(run), run_length=length, fired=fired,
                       last_final_t=final[-1][0]), streaks

    def due(self, grace_ms: int, idle_ms: int) -> int:
        """The watermark at which this state needs attention: its first pending clip becomes final, or
        (nothing pending) the call has been silent for ``idle_ms`` and the state can be dropped."""
        if self.pending:
            return self.pending[0][0] + grace_ms + 1
        return (self.last_final_t or 0) + grace_ms + idle_ms

    def expired(self, watermark: int, grace_ms: int, idle_ms: int) -> bool:
        return not self.pending and watermark >= self.due(grace_ms, idle_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"scope": self.scope.key, "pending": [list(p) for p in self.pending], "run": [list(r) for r in self.run],
                "run_length": self.run_length, "fired": self.fired, "last_final_t": self.last_final_t,
                "last_event": self.last_event}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> CallRun:
        return cls(Scope.from_key(value["scope"]),
                   tuple((int(t), str(e), bool(a)) for t, e, a in value["pending"]),
                   tuple((int(t), str(e)) for t, e in value["run"]), int(value["run_length"]), bool(value["fired"]),
                   None if value["last_final_t"] is None else int(value["last_final_t"]), value["last_event"])


# ------------------------------------------------------------------------------------ state of one scope


@dataclass(frozen=True)
class ScopeState:
    """Everything the aggregator keeps for one scope, stored as one value (so updated atomically): its open
    windows, its streak state (calls only), and the event applied last (tells a replayed event that already
    counted from a new one when the crash came between this write and the event's "seen" marker)."""

    scope: Scope
    windows: tuple[WindowAgg, ...] = ()
    run: CallRun | None = None
    last_event: str = ""

    def add(self, obs: Observation, specs: Iterable[WindowSpec]) -> ScopeState:
        """Count ``obs`` in each of its windows (created as needed) and in the streak state."""
        by_key = {(w.spec, w.start): w for w in self.windows}
        for spec in specs:
            for start, end in spec.windows(obs.t):
                window = by_key.get((spec, start)) or WindowAgg(self.scope, spec, start, end)
                by_key[(spec, start)] = window.add(obs)
        run = self.run
        if self.scope.kind == "call":
            run = (run or CallRun(self.scope)).add(obs)
        windows = tuple(sorted(by_key.values(), key=lambda w: (w.spec.kind, w.start)))
        return ScopeState(self.scope, windows, run, obs.event_id)

    def closed(self, watermark: int, grace_ms: int) -> list[WindowAgg]:
        return [w for w in self.windows if watermark >= closes_at(w.end, grace_ms)]

    def without(self, windows: Iterable[WindowAgg]) -> ScopeState:
        gone = {(w.spec, w.start) for w in windows}
        return replace(self, windows=tuple(w for w in self.windows if (w.spec, w.start) not in gone))

    def with_alerted(self, windows: Iterable[WindowAgg]) -> ScopeState:
        flagged = {(w.spec, w.start) for w in windows}
        return replace(self, windows=tuple(replace(w, alerted=True) if (w.spec, w.start) in flagged else w
                                           for w in self.windows))

    def due(self, grace_ms: int, idle_ms: int) -> int | None:
        """The watermark at which this scope needs attention (a window closes, a clip becomes final, an idle
        call's streak state can go), or None when nothing is left (the state can be deleted)."""
        times = [closes_at(w.end, grace_ms) for w in self.windows]
        if self.run is not None:
            times.append(self.run.due(grace_ms, idle_ms))
        return min(times, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"scope": self.scope.key, "last_event": self.last_event,
                "windows": [[w.spec.kind, w.spec.size_ms, w.spec.hop_ms, w.start, w.end, list(w.counts), w.clips,
                             w.confidence_units, w.first_event_at, w.last_event_at, w.alerted] for w in self.windows],
                "run": None if self.run is None else self.run.to_dict()}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> ScopeState:
        scope = Scope.from_key(value["scope"])
        windows = tuple(
            WindowAgg(scope, WindowSpec(kind, int(size), int(hop)), int(start), int(end), tuple(counts), int(clips),
                      int(units), int(first), int(last), bool(alerted))
            for kind, size, hop, start, end, counts, clips, units, first, last, alerted in value["windows"])
        run = None if value["run"] is None else CallRun.from_dict(value["run"])
        return cls(scope, windows, run, value["last_event"])


# ------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class AggregateConfig:
    """What the aggregation needs from :class:`emofleet.core.config.AggregateSettings`, in milliseconds."""

    specs: tuple[WindowSpec, ...]
    grace_ms: int
    negativity: NegativityRule = field(default_factory=NegativityRule)
    angry_streak: int = 3
    lanes: int = 1  # partitions of the results topic

    def __post_init__(self) -> None:
        if self.grace_ms < 0:
            raise ValueError("grace must be >= 0")
        if self.lanes < 1:
            raise ValueError("lanes (results topic partitions) must be >= 1")
        if self.angry_streak < 1 or self.negativity.min_clips < 1:
            raise ValueError("angry_streak and negativity_min_clips must be >= 1")
        if self.negativity.window_kind not in {s.kind for s in self.specs}:
            raise ValueError(f"negativity_window {self.negativity.window_kind!r} is not a configured window "
                             f"(configured: {', '.join(s.kind for s in self.specs)})")

    @property
    def retention_ms(self) -> int:
        """How long (event time, beyond grace) duplicates are still recognised as duplicates rather than late
        events, and how long a silent call keeps its streak state: the longest window."""
        return max(s.size_ms for s in self.specs)

    @classmethod
    def from_settings(cls, settings: Any, lanes: int = 1) -> AggregateConfig:
        """From an ``AggregateSettings`` (seconds) or anything with the same attributes."""
        return cls(
            lanes=lanes,
            specs=window_specs(settings.tumbling_seconds, settings.hopping_seconds, settings.hop_seconds),
            grace_ms=int(settings.grace_seconds * 1000),
            negativity=NegativityRule(settings.negativity_threshold, settings.negativity_min_clips,
                                      settings.negativity_window),
            angry_streak=settings.angry_streak,
        )
