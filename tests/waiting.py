"""Waiting for a condition with a deadline: the tests' one way to wait for something to happen (never a bare
sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(condition: Callable[[], Any], what: str | Callable[[], str], timeout: float = 30.0,
             interval: float = 0.05) -> Any:
    """Poll ``condition`` until it is truthy and return that value; fail naming ``what`` after ``timeout``
    seconds. ``what`` may be a callable, read only on failure, to say how far things got."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)
    return value
