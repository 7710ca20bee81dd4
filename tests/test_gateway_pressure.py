"""The gateway's overload predictor: how fast the fleet drains its backlog (pure)."""

from __future__ import annotations

import pytest

from emofleet.gateway.pressure import drain_rate


def test_the_first_busy_interval_sets_the_rate_and_later_ones_are_smoothed_in() -> None:
    rate = drain_rate(None, 100, 2.0, backlog=300)
    assert rate == 50.0
    assert drain_rate(rate, 20, 2.0, backlog=300) == pytest.approx(0.7 * 50 + 0.3 * 10)


def test_an_idle_fleet_keeps_the_rate_it_showed_when_busy() -> None:
    assert drain_rate(None, 0, 1.0, backlog=0) is None
    assert drain_rate(40.0, 0, 1.0, backlog=0) == 40.0


def test_a_stalled_fleet_with_a_backlog_drains_towards_zero() -> None:
    rate = 40.0
    for _ in range(10):
        rate = drain_rate(rate, 0, 1.0, backlog=500)  # type: ignore[assignment]
    assert rate < 2.0
