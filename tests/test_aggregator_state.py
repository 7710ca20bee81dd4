"""The aggregate step (ScopeAggregator) over a plain dict, no broker: exact against an independent model, and
exact after a crash at every possible point of its state writes followed by a replay (the at-least-once
contract faust gives it: the restored state is a prefix of the writes, the input replays from the last
commit, and a commit implies everything before it was flushed)."""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from typing import Any

import pytest

from emofleet.core.metrics import OBSERVATION_OUTCOMES, Metrics
from emofleet.schemas.emotions import EMOTIONS, NEGATIVE_LABELS
from emofleet.streams.aggregator import LaneTracker, Outputs, ScopeAggregator
from emofleet.streams.windows import (
    AggregateConfig,
    NegativityRule,
    Observation,
    Scope,
    window_specs,
)

from metrics_helpers import metric

S = 1000
T0 = 1_764_000_000_000 - 1_764_000_000_000 % (300 * S)
GRACE = 30 * S


def config(lanes: int = 1, min_clips: int = 3) -> AggregateConfig:
    return AggregateConfig(window_specs(60, 300, 60), GRACE, NegativityRule(0.6, min_clips, "hopping"), 3, lanes)


class Recorder:
    """A dict that logs every write, plus outputs that log sends and flushes into the same log."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.store = _LoggingDict(self.log)

    def outputs(self) -> Outputs:
        async def aggregate(key: str, record: dict) -> None:
            self.log.append(("aggregate", key, json.dumps(record, sort_keys=True)))

        async def alert(key: str, record: dict) -> None:
            self.log.append(("alert", key, json.dumps(record, sort_keys=True)))

        async def flush() -> None:
            self.log.append(("flush",))

        return Outputs(aggregate, alert, flush)


class _LoggingDict(dict):
    def __init__(self, log: list) -> None:
        super().__init__()
        self._log = log

    def __setitem__(self, key: str, value: Any) -> None:
        self._log.append(("set", key, json.dumps(value)))  # what the changelog would carry
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._log.append(("del", key))
        super().__delitem__(key)


Message = tuple  # ("obs", partition, Observation) | ("beat", partition, lane, t, idle)


async def feed(aggregator: ScopeAggregator, messages: list[Message], log: list | None = None) -> None:
    for index, message in enumerate(messages):
        if log is not None:
            log.append(("message", index))
        if message[0] == "obs":
            await aggregator.handle(message[1], message[2])
        else:
            await aggregator.heartbeat(*message[1:])


def outputs_of(entries: list[tuple[Any, ...]]) -> dict[str, dict[str, list[str]]]:
    found: dict[str, dict[str, list[str]]] = {"aggregate": defaultdict(list), "alert": defaultdict(list)}
    for entry in entries:
        if entry[0] in found:
            found[entry[0]][entry[1]].append(entry[2])
    return found


def partition_of(scope: Scope) -> int:
    return sum(scope.key.encode()) % 2


def stream(seed: int, lanes: int) -> list[Message]:
    """Observations on lane 0 (heartbeats keep the other lanes level with it), with out-of-order events in grace,
    late events, re-sent duplicates, negativity bursts, angry runs in calls, and windows closing mid-stream."""
    rng = random.Random(seed)
    scopes = [Scope("source", "acme", "s1"), Scope("source", "acme", "s2"), Scope("call", "acme", "c1"),
              Scope("call", "acme", "c2"), Scope("channel", "acme", "web")]
    messages: list[Message] = []
    sent: list[Observation] = []
    top = T0
    for i in range(70):
        top += rng.randrange(0, 15 * S)
        t = top
        roll = rng.random()
        if roll < 0.15:
            t = top - rng.randrange(1, GRACE)  # out of order, inside the grace period
        elif roll < 0.22:
            t = top - GRACE - rng.randrange(1, 200 * S)  # too late
        if sent and rng.random() < 0.12:
            again = rng.choice(sent)  # a duplicate (processor replay, or routed twice)
            messages.append(("obs", partition_of(again.scope), again))
        scope = rng.choice(scopes)
        label = rng.choice(["angry", "angry", "sad", "neutral", "happy"] if i % 20 < 8 else ["neutral", "happy", "angry"])
        if scope.kind == "call" and i % 20 < 8:
            label = "angry"  # angry runs
        item = Observation(scope, f"e{i}", t, label, rng.choice([0.5, 0.625, 0.75, 0.875]), 0)
        sent.append(item)
        messages.append(("obs", partition_of(scope), item))
        if lanes > 1 and rng.random() < 0.3:
            for p in (0, 1):
                messages.append(("beat", p, 1, top, False))
    closer = T0 + 10_000 * S  # one event far ahead in each partition closes every window above
    for p in (0, 1):
        scope = next(sc for i in range(100) if partition_of(sc := Scope("source", "acme", f"closer-{i}")) == p)
        messages.append(("obs", p, Observation(scope, f"closer-{p}", closer, "neutral", 0.5, 0)))
        for lane in range(1, lanes):
            messages.append(("beat", p, lane, closer, True))
    return messages


def model(messages: list[Message], lanes_: int = 1) -> dict[str, dict[str, Any]]:
    """Independent expectation for one lane: per partition watermark = largest event time seen there; an event
    counts once per scope unless it is more than grace behind. Returns {(scope, kind, start): counts}."""
    assert lanes_ == 1
    watermark: dict[int, int] = {}
    counted: set[tuple[str, str]] = set()
    windows: dict[tuple[str, str, int], list[Observation]] = defaultdict(list)
    for message in messages:
        _, p, o = message
        if (o.scope.key, o.event_id) in counted:
            continue
        if p in watermark and o.t + GRACE < watermark[p]:
            continue
        counted.add((o.scope.key, o.event_id))
        watermark[p] = max(watermark.get(p, o.t), o.t)
        for kind, size in (("tumbling", 60 * S), ("hopping", 300 * S)):
            for start in range((o.t // (60 * S) - 5) * 60 * S, o.t + 1, 60 * S):
                if start <= o.t < start + size:
                    windows[(o.scope.key, kind, start)].append(o)
    expected = {}
    for (scope, kind, start), items in windows.items():
        if items[0].event_id.startswith("closer"):
            continue  # never closed
        counts = [sum(1 for o in items if o.label == name) for name in EMOTIONS]
        expected[(scope, kind, start)] = {
            "clips": len(items), "counts": counts,
            "negativity": sum(1 for o in items if o.label in NEGATIVE_LABELS) / len(items),
            "mean_confidence": sum(o.confidence for o in items) / len(items),
            "first": min(o.t for o in items), "last": max(o.t for o in items)}
    return expected


@pytest.mark.parametrize("seed", range(6))
def test_emitted_windows_match_an_independent_model(seed: int) -> None:
    messages = [m for m in stream(seed, lanes=1) if m[0] == "obs"]
    recorder = Recorder()
    metrics = Metrics("aggregator")
    aggregator = ScopeAggregator(recorder.store, config(lanes=1), recorder.outputs(), metrics)
    asyncio.run(feed(aggregator, messages))
    emitted = outputs_of(recorder.log)["aggregate"]
    assert all(len(copies) == 1 for copies in emitted.values()), "a window was emitted twice"
    got = {}
    for (record,) in emitted.values():
        r = json.loads(record)
        scope = Scope(r["scope"], r["tenant"], r["scope_value"]).key
        got[(scope, r["window_type"], r["window_start"])] = {
            "clips": r["clips"], "counts": [r["label_counts"][name] for name in EMOTIONS],
            "negativity": r["negativity"], "mean_confidence": r["mean_confidence"],
            "first": r["first_event_at"], "last": r["last_event_at"]}
    expected = model(messages)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == value, key  # confidences are multiples of 1/8: sums are exact
    outcomes = {o: metric(metrics, "emofleet_aggregator_observations_total", outcome=o) for o in OBSERVATION_OUTCOMES}
    assert outcomes["late"] > 0 and outcomes["duplicate"] > 0, outcomes
    assert sum(outcomes.values()) == len(messages), "every observation has exactly one outcome"
    # Emitted windows are deleted from the state: only the closers' windows are left.
    assert {json.loads(v["scope"])[2] for k, v in recorder.store.items() if ":w:" in k} <= {"closer-0", "closer-1"}

def replay_after_crash(messages: list[Message], cfg: AggregateConfig, log: list[tuple[Any, ...]],
                       durable_writes: int, committed: str) -> tuple[list, list, list]:
    """Restore the first ``durable_writes`` writes, replay from the commit point; returns
    (outputs that surely landed, outputs that may have landed, outputs after the restart)."""
    writes = [i for i, entry in enumerate(log) if entry[0] in ("set", "del")]
    store: dict[str, Any] = {}
    for i in writes[:durable_writes]:
        entry = log[i]
        if entry[0] == "set":
            store[entry[1]] = json.loads(entry[2])
        else:
            store.pop(entry[1], None)
    lost_at = writes[durable_writes] if durable_writes < len(writes) else len(log)
    flushes = [i for i, entry in enumerate(log) if entry[0] == "flush"]
    completed = max([i for i in flushes if i < lost_at], default=-1)
    pending_until = min([i for i in flushes if i > lost_at], default=len(log))
    sure = [e for e in log[:completed + 1] if e[0] in ("aggregate", "alert")]
    maybe = [e for e in log[:pending_until] if e[0] in ("aggregate", "alert")]
    # Faust commits offset c only after flushing, so every message before c had all its writes durable.
    complete = [index for i, (kind, *rest) in enumerate(log) if kind == "message" and i <= lost_at
                for index in rest]
    resume = (max(complete) if complete else 0) if committed == "latest" else 0
    recorder = Recorder()
    restarted = ScopeAggregator(store, cfg, recorder.outputs(), Metrics("aggregator"))
    asyncio.run(feed(restarted, messages[resume:]))
    return sure, maybe, [e for e in recorder.log if e[0] in ("aggregate", "alert")]


@pytest.mark.parametrize("seed", range(2))
def test_kill_at_any_write_then_replay_counts_nothing_twice(seed: int) -> None:
    messages = stream(seed, lanes=2)
    cfg = config(lanes=2)
    reference = Recorder()
    aggregator = ScopeAggregator(reference.store, cfg, reference.outputs(), Metrics("aggregator"))
    asyncio.run(feed(aggregator, messages, reference.log))
    truth = outputs_of(reference.log)
    assert truth["aggregate"] and truth["alert"], "the stream should emit windows and alerts"
    assert all(len(c) == 1 for kind in truth.values() for c in kind.values())
    kinds = {json.loads(c[0])["rule"] for c in truth["alert"].values()}
    assert kinds == {"negativity", "angry_streak"}
    writes = sum(1 for entry in reference.log if entry[0] in ("set", "del"))
    for durable in range(writes + 1):
        # Resume at the latest possible commit at every point, and replay everything at every 4th (slower).
        for committed in ("latest", "start") if durable % 4 == 0 else ("latest",):
            sure, maybe, after = replay_after_crash(messages, cfg, reference.log, durable, committed)
            landed_min, landed_max = outputs_of(sure + after), outputs_of(maybe + after)
            for kind in ("aggregate", "alert"):
                # nothing lost ...
                assert landed_min[kind].keys() == truth[kind].keys(), (durable, committed, kind)
                # ... and every copy of an id is the same record: downstream keeps one per id
                for key, copies in landed_max[kind].items():
                    assert set(copies) == set(truth[kind][key]), (durable, committed, kind, key)


def test_lane_tracker_reports_progress_and_idleness_only_when_changed() -> None:
    tracker = LaneTracker()
    assert tracker.report(0, highwater=0, committed=None) == (None, True)  # empty partition: idle
    assert tracker.report(0, highwater=0, committed=None) is None  # unchanged: no heartbeat
    assert tracker.report(1, highwater=5, committed=None) == (None, False)
    tracker.saw(1, 3, T0 + 7)
    assert tracker.report(1, highwater=5, committed=None) == (T0 + 7, False)
    tracker.saw(1, 4, T0 + 2)
    assert tracker.report(1, highwater=5, committed=None) == (T0 + 7, True)
    assert tracker.report(2, highwater=10, committed=10) == (None, True)  # resumed at the end: idle
    tracker.forget_reports()
    assert tracker.report(1, highwater=5, committed=None) == (T0 + 7, True)
