"""The aggregator's pure window math, aggregates, watermark, close decisions and alert rules (no broker)."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from emofleet.schemas.codec import make_codec
from emofleet.schemas.emotions import EMOTIONS
from emofleet.core.config import AggregateSettings
from emofleet.streams.windows import (
    AggregateConfig,
    CallRun,
    NegativityRule,
    Observation,
    Progress,
    Scope,
    WindowAgg,
    WindowSpec,
    closes_at,
    is_late,
    observations,
    scopes_of,
    window_specs,
)

S = 1000
T0 = 1_764_000_000_000 - 1_764_000_000_000 % (300 * S)  # aligned to 5 minutes
TUMBLING = WindowSpec("tumbling", 60 * S, 60 * S)
HOPPING = WindowSpec("hopping", 300 * S, 60 * S)
SOURCE = Scope("source", "acme", "line-1")
CALL = Scope("call", "acme", "call-1")


def obs(event_id: str, t: int, label: str = "neutral", confidence: float = 0.75, scope: Scope = SOURCE,
        lane: int = 0) -> Observation:
    return Observation(scope, event_id, t, label, confidence, lane)


# ------------------------------------------------------------------------------------ windows


def brute_force_windows(spec: WindowSpec, t: int) -> list[tuple[int, int]]:
    starts = range((t // spec.hop_ms - spec.size_ms // spec.hop_ms - 2) * spec.hop_ms, t + 1, spec.hop_ms)
    return [(s, s + spec.size_ms) for s in starts if s <= t < s + spec.size_ms]


@pytest.mark.parametrize("spec", [TUMBLING, HOPPING, WindowSpec("hopping", 90 * S, 60 * S),
                                  WindowSpec("hopping", 7, 3), WindowSpec("tumbling", 1, 1)], ids=str)
def test_windows_are_exactly_those_containing_t(spec: WindowSpec) -> None:
    rng = random.Random(7)
    edges = [0, -1, 1, T0, T0 - 1, T0 + spec.size_ms, T0 + spec.hop_ms - 1, -spec.size_ms - 3]
    for t in edges + [rng.randrange(-10**9, 10**13) for _ in range(2000)]:
        assert spec.windows(t) == brute_force_windows(spec, t), t


def test_default_windows() -> None:
    assert TUMBLING.windows(T0 + 59_999) == [(T0, T0 + 60 * S)]
    assert TUMBLING.windows(T0 + 60 * S) == [(T0 + 60 * S, T0 + 120 * S)]
    assert [start - T0 for start, _ in HOPPING.windows(T0 + 130 * S)] == [-120 * S, -60 * S, 0, 60 * S, 120 * S]
    assert window_specs(60, 300, 60) == (TUMBLING, HOPPING)
    assert window_specs(0, 300, 60) == (HOPPING,)
    with pytest.raises(ValueError):
        window_specs(0, 0, 60)
    with pytest.raises(ValueError):
        WindowSpec("hopping", 60, 120)  # hop > size leaves gaps
    with pytest.raises(ValueError):
        WindowSpec("sliding", 60, 60)


def test_an_event_that_is_not_late_never_falls_into_a_closed_window() -> None:
    """The invariant that makes emitted windows final: for random t, watermark and grace."""
    rng = random.Random(11)
    for _ in range(20_000):
        spec = rng.choice([TUMBLING, HOPPING, WindowSpec("hopping", 90, 60)])
        grace = rng.choice([0, 1, 30 * S, rng.randrange(0, 400 * S)])
        watermark = T0 + rng.randrange(0, 1000 * S)
        t = watermark - rng.randrange(-100 * S, 1000 * S)
        if not is_late(t, watermark, grace):
            assert all(watermark < closes_at(end, grace) for _, end in spec.windows(t))
    assert not is_late(T0, None, 0)  # no watermark yet: nothing is late
    assert not is_late(T0 - 30 * S, T0, 30 * S) and is_late(T0 - 30 * S - 1, T0, 30 * S)


# ------------------------------------------------------------------------------------ scopes


def test_scopes_and_observations_skip_missing_fields_and_window_events() -> None:
    event = {"event_id": "e1", "segment_index": -1, "reference_produced_at": T0, "label": "sad", "confidence": 0.5,
             "tenant": "acme", "source": "line-1", "channel": None, "call_id": "c9"}
    assert scopes_of(event) == [SOURCE, Scope("call", "acme", "c9")]
    assert scopes_of(event | {"tenant": None}) == [] and scopes_of(event | {"tenant": ""}) == []
    assert scopes_of(event | {"channel": "web", "source": ""}) == [Scope("channel", "acme", "web"),
                                                                   Scope("call", "acme", "c9")]
    assert observations(event | {"segment_index": 0}) == []
    assert observations(event, lane=3) == [Observation(SOURCE, "e1", T0, "sad", 0.5, 3),
                                           Observation(Scope("call", "acme", "c9"), "e1", T0, "sad", 0.5, 3)]
    odd = Scope("source", 'a"b', "x/y|z")
    assert Scope.from_key(odd.key) == odd
    assert Observation.from_dict(obs("e", T0, scope=odd).to_dict()) == obs("e", T0, scope=odd)


# ------------------------------------------------------------------------------------ aggregates


def test_window_aggregate_counts_and_is_independent_of_arrival_order() -> None:
    items = [obs("a", T0 + 1, "angry", 0.875), obs("b", T0 + 5, "neutral", 0.5), obs("c", T0 + 2, "sad", 0.625),
             obs("d", T0 + 59_999, "happy", 0.3), obs("e", T0 + 7, "unknown", 0.2)]
    records = set()
    for order in itertools.permutations(items):
        agg = WindowAgg(SOURCE, TUMBLING, T0, T0 + 60 * S)
        for item in order:
            agg = agg.add(item)
        record = agg.record()
        records.add(repr(record))
    assert len(records) == 1
    assert record["clips"] == 5
    assert record["label_counts"] == dict(zip(EMOTIONS, [1, 0, 0, 1, 1, 0, 1, 0, 1], strict=True))
    assert record["negativity"] == 2 / 5
    assert record["mean_confidence"] == pytest.approx((0.875 + 0.5 + 0.625 + 0.3 + 0.2) / 5, abs=1e-8)
    assert (record["first_event_at"], record["last_event_at"]) == (T0 + 1, T0 + 59_999)
    assert record["aggregate_id"] == agg.aggregate_id != WindowAgg(SOURCE, HOPPING, T0, T0 + 300 * S).aggregate_id
    assert WindowAgg.from_dict(agg.to_dict()) == agg
    decoded = make_codec().decode("emotion_aggregate", make_codec().encode("emotion_aggregate", record, topic="t"),
                                  topic="t")
    assert decoded == record
    with pytest.raises(ValueError):
        agg.add(obs("late", T0 + 60 * S))


def test_confidence_sum_is_exact_for_float32_confidences() -> None:
    import numpy as np

    rng = np.random.default_rng(3)
    values = [float(np.float32(v)) for v in rng.uniform(1 / 9, 1, 500)]
    forward = WindowAgg(SOURCE, TUMBLING, T0, T0 + 60 * S)
    backward = forward
    for i, value in enumerate(values):
        forward = forward.add(obs(f"f{i}", T0 + i, confidence=value))
    for i, value in reversed(list(enumerate(values))):
        backward = backward.add(obs(f"f{i}", T0 + i, confidence=value))
    assert forward.mean_confidence == backward.mean_confidence
    assert forward.mean_confidence == pytest.approx(sum(values) / len(values), rel=1e-12)


# ------------------------------------------------------------------------------------ watermark


def test_watermark_waits_for_every_lane_skips_idle_lanes_and_never_decreases() -> None:
    p = Progress(lanes=3)
    p = p.observe(0, T0 + 100)
    assert p.watermark is None  # lanes 1 and 2 have not reported
    p = p.observe(2, T0 + 50)
    assert p.watermark is None
    p = p.heartbeat(1, None, idle=True)  # lane 1 is empty
    assert p.watermark == T0 + 50  # the slowest busy lane
    p = p.observe(2, T0 + 500)
    assert p.watermark == T0 + 100
    p = p.heartbeat(0, T0 + 100, idle=True)
    assert p.watermark == T0 + 500
    p = p.heartbeat(2, T0 + 500, idle=True)
    assert p.watermark == T0 + 500  # all idle: the largest
    p = p.observe(1, T0 + 10)  # lane 1 wakes up far behind: the watermark does not go back
    assert p.watermark == T0 + 500 and 1 not in p.idle
    assert Progress.from_dict(p.to_dict()) == p
    assert Progress(lanes=1).heartbeat(0, None, idle=True).watermark is None  # nothing seen anywhere


# ------------------------------------------------------------------------------------ rule (a)


def test_negativity_rule_fires_at_threshold_over_enough_clips_once_per_window() -> None:
    rule = NegativityRule(threshold=0.6, min_clips=5, window_kind="hopping")
    agg = WindowAgg(SOURCE, HOPPING, T0, T0 + 300 * S)
    labels = ["angry", "neutral", "sad", "fearful"]  # 3 of 4 negative: not enough clips yet
    for i, label in enumerate(labels):
        agg = agg.add(obs(f"e{i}", T0 + i, label))
        assert not rule.breached(agg)
    agg = agg.add(obs("e4", T0 + 4, "happy"))  # 3/5 = 0.6 >= 0.6 over 5 clips
    assert rule.breached(agg)
    alert = rule.alert(agg)
    assert (alert["rule"], alert["clips"], alert["value"], alert["min_clips"]) == ("negativity", 5, 0.6, 5)
    assert rule.alert(agg.add(obs("e5", T0 + 5)))["alert_id"] == alert["alert_id"]  # one id per window
    assert not rule.breached(replace(agg, alerted=True))
    assert not rule.breached(replace(agg, spec=TUMBLING))  # watches the hopping windows
    assert not rule.breached(replace(agg, scope=Scope("channel", "acme", "web")))  # and sources only
    assert not rule.breached(agg.add(obs("e5", T0 + 5, "neutral")).add(obs("e6", T0 + 6, "neutral")))  # 3/7
    make_codec().encode("emotion_alert", alert, topic="t")


# ------------------------------------------------------------------------------------ rule (b)


def run_streaks(events: list[tuple[int, str]], k: int = 3, grace: int = 30 * S) -> list[list[str]]:
    """Feed (t, label) events in the given arrival order, finalise at the end; streak event ids."""
    run = CallRun(CALL)
    found = []
    for i, (t, label) in enumerate(events):
        run = run.add(obs(f"{t}-{label}-{i}", t, label, scope=CALL))
        run, streaks = run.finalize(max(t for t, _ in events[: i + 1]), grace, k)
        found += streaks
    run, streaks = run.finalize(T0 + 10**9, grace, k)
    found += streaks
    assert not run.pending
    return [[event_id for _, event_id in streak.clips] for streak in found]


def test_angry_streak_is_judged_in_event_time_order_once_per_streak() -> None:
    a, n = "angry", "neutral"
    in_order = [(T0 + i * S, label) for i, label in enumerate([a, a, n, a, a, a, a, a, n, a, a])]
    streaks = run_streaks(in_order)
    assert len(streaks) == 1 and [e.split("-")[0] for e in streaks[0]] == [str(T0 + i * S) for i in (3, 4, 5)]
    shuffled = in_order[:]
    random.Random(5).shuffle(shuffled)  # arrival order does not matter once everything is final
    assert [[e.split("-")[0] for e in s] for s in run_streaks(shuffled)] == [[str(T0 + i * S) for i in (3, 4, 5)]]
    assert run_streaks([(T0 + i, label) for i, label in enumerate([a, a, n, a, a])]) == []
    two = run_streaks([(T0 + i, label) for i, label in enumerate([a, a, a, n, a, a, a, a])])
    assert len(two) == 2


def test_angry_streak_waits_until_its_clips_are_final() -> None:
    run = CallRun(CALL)
    for i in range(3):
        run = run.add(obs(f"a{i}", T0 + i * S, "angry", scope=CALL))
    grace = 30 * S
    run, streaks = run.finalize(T0 + 2 * S + grace, grace, 3)  # t + grace == watermark: not final yet
    assert streaks == [] and len(run.pending) == 1 and run.run_length == 2
    assert run.due(grace, 300 * S) == T0 + 2 * S + grace + 1
    run = run.add(obs("n", T0 + 2 * S + 1, "neutral", scope=CALL))  # arrives in grace, after the last angry
    run, streaks = run.finalize(T0 + 2 * S + grace + 1, grace, 3)
    assert [s.alert(3)["event_ids"] for s in streaks] == [["a0", "a1", "a2"]]
    assert run.fired and CallRun.from_dict(run.to_dict()) == run
    alert = streaks[0].alert(3)
    assert alert["alert_id"] == streaks[0].alert(3)["alert_id"] and alert["window_start"] == T0
    make_codec().encode("emotion_alert", alert, topic="t")
    run, _ = run.finalize(T0 + 10**6, grace, 3)
    assert run.expired(T0 + 2 * S + 1 + grace + 300 * S, grace, 300 * S)


# ------------------------------------------------------------------------------------ configuration


def test_config_from_settings_and_validation() -> None:
    config = AggregateConfig.from_settings(AggregateSettings(), lanes=8)
    assert config.specs == (TUMBLING, HOPPING) and config.grace_ms == 30 * S and config.lanes == 8
    assert config.negativity == NegativityRule(0.6, 5, "hopping") and config.angry_streak == 3
    assert config.retention_ms == 300 * S
    with pytest.raises(ValueError, match="negativity_window"):
        AggregateConfig.from_settings(AggregateSettings(hopping_seconds=0))
    assert AggregateConfig.from_settings(AggregateSettings(hopping_seconds=0, negativity_window="tumbling")).specs \
        == (TUMBLING,)
